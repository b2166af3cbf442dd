"""Everything that talks to the kernel or reads the node: thin, typed, read-only.

Imports only `tcprio.model`, `tcprio.inputs` and its own modules; see docs/architecture.md.
"""
