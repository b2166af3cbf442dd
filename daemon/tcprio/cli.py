"""Command line: `tcprio --scan` (one-shot report)."""

from __future__ import annotations

import argparse
import sys

from tcprio import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcprio", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tcprio {__version__}")
    parser.add_argument("--scan", action="store_true", help="scan this node once and report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.scan:
        print("tcprio: only --scan is implemented yet", file=sys.stderr)
        return 3
    print("tcprio: scan not implemented yet", file=sys.stderr)
    return 3
