"""The long-lived daemon (`tcprio` without --scan): watch, re-analyse, export.

See docs/architecture.md for what it may import.
"""
