"""Command line: `tcprio --scan` for a one-shot report, `tcprio` alone for the daemon,
`tcprio self-test` to prove the detection on this node, `tcprio bundle` for support."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tcprio import __version__
from tcprio.kernel import privileges
from tcprio.kernel.containers import NodeContainers, read_containers
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import NetNamespace
from tcprio.service.config import DEFAULT_CONFIG_PATH

EXIT_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcprio",
        description="Find every TC classifier on this node, what it can return, and what hides "
        "Datadog Workload Protection's network classifier.",
        epilog="Exit status of --scan: 0 no conflict, 1 fixable conflicts only, 2 a critical "
        "conflict, 3 the scan itself failed. Conflicts are critical or errors only where "
        "Datadog's network detection is active (its classifiers attached, or a verified "
        "system-probe running it) or --assume-datadog; elsewhere they are info. Other "
        "commands: `tcprio self-test --help`, `tcprio bundle --help`.",
    )
    parser.add_argument("--version", action="version", version=f"tcprio {__version__}")
    parser.add_argument(
        "--scan", action="store_true", help="scan this node once and report (else: run the daemon)"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=str(DEFAULT_CONFIG_PATH),
        help=f"daemon configuration (default {DEFAULT_CONFIG_PATH}; built-in defaults if absent); "
        "--scan also reports the classifiers hidden from the observers it names",
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
        "--pretty",
        action="store_true",
        help="indent the JSON (it is compact by default, like `ip -j`; -p there, --pretty here)",
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
    _add_datadog_arguments(parser)
    _add_assume_argument(parser, " (the daemon: datadog.assume_active in its configuration)")
    parser.add_argument(
        "--cilium-version",
        metavar="VERSION",
        help="Cilium's version, to check the known Cilium/agent incompatibilities (default: "
        "the version in the image of the cilium-agent container running on the node)",
    )
    return parser


def _namespace_filter(patterns: Sequence[str] | None, containers: NodeContainers | None = None):
    """Discovery limited to the namespaces whose name (or raw netns name) matches a pattern;
    `containers`: the runtimes' bundles when already read."""

    def discover() -> list[NetNamespace]:
        found = discover_namespaces(containers=containers)
        if not patterns:
            return found
        return [ns for ns in found if any(ns.matches(p) for p in patterns)]

    return discover


def _refused(command: str) -> bool:
    """True, after one line on stderr saying what is needed, when this process may not read
    what tcprio needs (root's capabilities, BPF access)."""
    problem = privileges.missing_privileges()
    if problem:
        print(f"{command}: {problem}", file=sys.stderr)
    return problem is not None


def _configured_observers(path: Path) -> tuple:
    """The observers the daemon configuration names, as the analysis wants them. A bad file
    costs them only (one line on stderr per problem): the scan itself still runs."""
    from tcprio.service.config import ConfigError, load_config

    try:
        return load_config(path, missing_ok=True).observer_rules
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tcprio: configuration ignored, no extra observers: {problem}", file=sys.stderr)
        return ()


def run_scan_command(args: argparse.Namespace) -> int:
    if _refused("tcprio"):
        return EXIT_FAILED
    # Imported here so that `--help` and the privilege check stay fast and dependency-light.
    from tcprio.datadog import resolve_settings
    from tcprio.kernel.datadog_agent import DEFAULT_FILES
    from tcprio.report import exit_status, render_text, scan_json
    from tcprio.scan import run_scan

    # A one-shot process: reference counting frees what the scan drops, and the cyclic
    # collector only walks the growing inventory over and over (~15% of a scan at N=800).
    gc.disable()
    files = [Path(f) for f in args.datadog_config] if args.datadog_config else DEFAULT_FILES
    containers = read_containers()  # once: pods' names, versions, the agent's image
    settings = resolve_settings(
        files=files, scan_processes=not args.no_agent_process, containers=containers
    )
    for error in settings.errors:
        print(f"tcprio: Datadog configuration: {error}", file=sys.stderr)
    observers = _configured_observers(Path(args.config))
    try:
        scan = run_scan(
            discover=_namespace_filter(args.netns, containers),
            settings=settings,
            cilium_version=args.cilium_version,
            observers=observers,
            assume_datadog=args.assume_datadog,
            containers=containers,
        )
    except Exception as exc:  # the one place a failed scan becomes exit status 3
        print(f"tcprio: scan failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.format == "json":
        # json.dumps without indent is the C encoder; json.dump and indent are pure Python
        # (5x slower on a big node): compact unless asked.
        sys.stdout.write(json.dumps(scan_json(scan), indent=2 if args.pretty else None) + "\n")
    else:
        color = {"always": True, "never": False}.get(args.color)
        sys.stdout.write(render_text(scan, color=color, explain_terminal=args.explain))
    return exit_status(scan)


def run_daemon_command(args: argparse.Namespace) -> int:
    if _refused("tcprio"):
        return EXIT_FAILED
    from tcprio.service.daemon import run_daemon

    return run_daemon(Path(args.config), args.listen_address)


def _add_datadog_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_assume_argument(parser: argparse.ArgumentParser, where: str = "") -> None:
    parser.add_argument(
        "--assume-datadog",
        action="store_true",
        help="treat Datadog's network detection as active on this node even when no Datadog "
        "classifier is attached and no verified system-probe runs (conflicts then keep their "
        f"severity; otherwise they are info there){where}",
    )


def build_bundle_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcprio bundle",
        description="Collect what support needs into one tar.gz (secrets redacted), show the "
        "list of files and ask before writing it. Nothing is uploaded.",
    )
    parser.add_argument("-y", "--yes", action="store_true", help="write without asking")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="archive to write (default /var/tmp/tcprio-bundle-<host>-<UTC time>.tar.gz)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=str(DEFAULT_CONFIG_PATH),
        help=f"tcprio daemon configuration to include (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--netns", action="append", metavar="GLOB", help="only these namespaces (repeatable)"
    )
    parser.add_argument(
        "--log-lines",
        type=int,
        default=2000,
        metavar="N",
        help="how many recent lines of the tcprio service's journal to include (default 2000)",
    )
    _add_datadog_arguments(parser)
    _add_assume_argument(parser)
    return parser


def run_bundle_command(argv: list[str]) -> int:
    args = build_bundle_parser().parse_args(argv)
    if _refused("tcprio bundle"):
        return EXIT_FAILED
    from tcprio.bundle.cli import run_bundle

    return run_bundle(args, discover=_namespace_filter(args.netns))


def build_selftest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcprio self-test",
        description="Build a throw-away scene in namespaces of its own (veths, clsact, real BPF "
        "classifiers, tcx), send traffic through it and check every step of tcprio's detection. "
        "Prints 'Self test: OK' (exit 0) or 'Self test: FAILED' (exit 1).",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default text)"
    )
    parser.add_argument(
        "--classifier-priority",
        type=int,
        metavar="N",
        help="build the scene for this classifier_priority instead of the node's configured one",
    )
    parser.add_argument(
        "--metrics-url",
        metavar="URL",
        help="the running daemon's /metrics to check propagation against (default: found from "
        "the tcprio daemon process running on this node)",
    )
    parser.add_argument(
        "--no-daemon-check",
        action="store_true",
        help="do not check that the conflicts reach a running daemon's /metrics",
    )
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="highlighting"
    )
    _add_datadog_arguments(parser)
    return parser


def run_selftest_command(argv: list[str]) -> int:
    args = build_selftest_parser().parse_args(argv)
    if _refused("tcprio self-test"):
        return EXIT_FAILED
    from tcprio.selftest.cli import run_selftest

    return run_selftest(args)


SUBCOMMANDS = {"bundle": run_bundle_command, "self-test": run_selftest_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    if args.scan:
        return run_scan_command(args)
    return run_daemon_command(args)
