"""Pure analysis: plain dataclasses in, findings out; no I/O, no kernel access.

Imports only `tcprio.model`, `tcprio.inputs` and its own modules; see docs/architecture.md.
"""
