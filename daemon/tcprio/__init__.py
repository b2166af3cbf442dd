"""tcprio: finds every TC classifier on a node and the Datadog classifier_priority conflicts."""

__version__ = "0.1.0"
