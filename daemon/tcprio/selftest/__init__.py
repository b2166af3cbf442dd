"""`tcprio self-test`: build a throw-away scene in namespaces of its own and check every stage.

See docs/architecture.md for what it may import.
"""
