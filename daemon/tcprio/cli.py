"""Command line: `tcprio --scan` for a one-shot report, `tcprio` alone for the daemon."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tcprio import __version__, privileges
from tcprio.config import DEFAULT_CONFIG_PATH
from tcprio.model import NetNamespace
from tcprio.namespaces import discover_namespaces

EXIT_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcprio",
        description="Find every TC classifier on this node, what it can return, and what hides "
        "Datadog Workload Protection's network classifier.",
        epilog="Exit status of --scan: 0 no conflict, 1 fixable conflicts only, 2 a critical "
        "conflict, 3 the scan itself failed.",
    )
    parser.add_argument("--version", action="version", version=f"tcprio {__version__}")
    parser.add_argument(
        "--scan", action="store_true", help="scan this node once and report (else: run the daemon)"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=str(DEFAULT_CONFIG_PATH),
        help=f"daemon configuration (default {DEFAULT_CONFIG_PATH}; built-in defaults if absent)",
    )
    parser.add_argument(
        "--listen-address",
        metavar="HOST:PORT",
        help="daemon: where to serve /metrics, /healthz and /readyz (overrides the file)",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default text)"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="show each classifier's exit paths and the values it returns there",
    )
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="highlighting"
    )
    parser.add_argument(
        "--netns",
        action="append",
        metavar="GLOB",
        help="only scan namespaces whose name matches GLOB (repeatable; default: all)",
    )
    parser.add_argument(
        "--datadog-config",
        action="append",
        metavar="FILE",
        help="Datadog system-probe.yaml / security-agent.yaml to read instead of the ones in "
        "/etc/datadog-agent (repeatable; a running system-probe's own config still wins)",
    )
    parser.add_argument(
        "--no-agent-process",
        action="store_true",
        help="do not read a running system-probe's own environment and config file",
    )
    parser.add_argument(
        "--cilium-version",
        metavar="VERSION",
        help="Cilium's version, to check the known incompatible Cilium/agent pair",
    )
    return parser


def _namespace_filter(patterns: Sequence[str] | None):
    def discover() -> list[NetNamespace]:
        found = discover_namespaces()
        if not patterns:
            return found
        return [ns for ns in found if any(fnmatch.fnmatchcase(ns.name, p) for p in patterns)]

    return discover


def run_scan_command(args: argparse.Namespace) -> int:
    problem = privileges.missing_privileges()
    if problem:
        print(f"tcprio: {problem}", file=sys.stderr)
        return EXIT_FAILED
    # Imported here so that `--help` and the privilege check stay fast and dependency-light.
    from tcprio.datadog_config import DEFAULT_FILES, resolve_settings
    from tcprio.report import exit_status, render_text, scan_json
    from tcprio.scan import run_scan

    files = [Path(f) for f in args.datadog_config] if args.datadog_config else DEFAULT_FILES
    settings = resolve_settings(files=files, scan_processes=not args.no_agent_process)
    for error in settings.errors:
        print(f"tcprio: bad Datadog setting ignored: {error}", file=sys.stderr)
    try:
        scan = run_scan(
            discover=_namespace_filter(args.netns),
            settings=settings,
            cilium_version=args.cilium_version,
        )
    except Exception as exc:  # the one place a failed scan becomes exit status 3
        print(f"tcprio: scan failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.format == "json":
        json.dump(scan_json(scan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        color = {"always": True, "never": False}.get(args.color)
        sys.stdout.write(render_text(scan, color=color, explain_terminal=args.explain))
    return exit_status(scan)


def run_daemon_command(args: argparse.Namespace) -> int:
    problem = privileges.missing_privileges()
    if problem:
        print(f"tcprio: {problem}", file=sys.stderr)
        return EXIT_FAILED
    from tcprio.daemon import run_daemon

    return run_daemon(Path(args.config), args.listen_address)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scan:
        return run_scan_command(args)
    return run_daemon_command(args)
