"""Command line: `tcprio scan` for a one-shot report, `tcprio serve` for the daemon,
`tcprio self-test` to prove the detection on this node, `tcprio bundle` for support.
`tcprio --scan` and `tcprio --config FILE` (the daemon) are the older spellings, still read."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from tcprio import __version__
from tcprio.inputs import label_of, parse_version
from tcprio.kernel import privileges
from tcprio.kernel.containers import NodeContainers, read_containers
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import NetNamespace
from tcprio.service.config import DEFAULT_CONFIG_PATH

EXIT_OK, EXIT_FIXABLE, EXIT_CRITICAL, EXIT_FAILED = 0, 1, 2, 3
EXIT_USAGE = 64  # sysexits.h EX_USAGE: argparse's own 2 would read as "critical"
FAIL_ON = ("warning", "error", "critical")
LEGACY_DAEMON_OPTIONS = ("--config", "--listen-address")

SCAN_EXAMPLES = """\
examples:
  tcprio scan                          # the node: verdict, what hides Datadog, what to change
  tcprio scan --detail                 # ... and every interface, every remedy in full
  tcprio scan --explain --netns 'pod:shop/*'  # exit paths of each classifier in some pods
  tcprio scan --format json --pretty   # for scripts (schema tcprio.scan v1)
  tcprio scan --fail-on critical       # CI: non-zero only when a conflict is critical

exit status: 0 no conflict, 1 fixable conflicts only, 2 a critical conflict, 3 the scan
failed, 64 usage error. Conflicts are critical or errors only where Datadog's network
detection is active (its classifiers attached, or a verified system-probe running it) or
--assume-datadog; elsewhere they are info."""

SERVE_EXAMPLES = """\
examples:
  tcprio serve                                   # /etc/tcprio/tcprio.yaml, or built-in defaults
  tcprio serve --config /etc/tcprio/tcprio.yaml --web.listen-address 127.0.0.1:9877
  tcprio serve --web.config.file /etc/tcprio/web-config.yml --log.format logfmt

/healthz and /readyz answer without credentials (for kubelet probes); the telemetry path and /
need them when the web config file has basic_auth_users.

exit status: 0 stopped by SIGTERM/SIGINT, 3 could not start, 64 usage error."""

SELFTEST_EXAMPLES = """\
examples:
  tcprio self-test                          # scene, traffic, every detection step
  tcprio self-test --classifier-priority 5  # the scene for another classifier_priority
  tcprio self-test --no-daemon-check --format json

exit status: 0 OK, 1 FAILED, 3 cannot run here, 64 usage error."""

BUNDLE_EXAMPLES = """\
examples:
  tcprio bundle                            # list the files, ask, write /var/tmp/tcprio-bundle-*
  tcprio bundle --yes --output /tmp/b.tar.gz --netns 'pod:shop/*'

exit status: 0 written, 1 declined, 2 cannot ask (no terminal: use --yes), 3 not written,
64 usage error."""

MAIN_EXAMPLES = """\
examples:
  tcprio scan                 # one-shot report of this node (tcprio --scan works too)
  tcprio scan --format json   # the same for scripts
  tcprio serve                # the daemon: Prometheus metrics (systemd runs this)
  tcprio self-test            # prove the detection works on this node
  tcprio bundle               # what support needs, in one tar.gz

`tcprio COMMAND --help` for each command's options and exit statuses."""


class UsageError(Exception):
    """Bad input found after parsing: one line on stderr, exit 64."""


class Parser(argparse.ArgumentParser):
    """argparse with one line per usage error and exit status 64."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{label_of(text, 40)}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (0 or more)")
    return value


def _version_text(text: str) -> str:
    if parse_version(text) is None or not text.lstrip("v")[:1].isdigit():
        raise argparse.ArgumentTypeError(
            f"'{label_of(text, 40)}' is not a version (like 1.16.3 or v1.9.18)"
        )
    return text


def _add_datadog_arguments(parser: argparse.ArgumentParser, none_option: bool = True) -> None:
    parser.add_argument(
        "--datadog-config",
        action="append",
        metavar="FILE",
        help="Datadog system-probe.yaml / security-agent.yaml to read instead of the ones in "
        "/etc/datadog-agent (repeatable; a running system-probe's own config still wins)",
    )
    if none_option:
        parser.add_argument(
            "--no-datadog-config",
            action="store_true",
            help="read no Datadog configuration file (defaults and the environment only)",
        )
    parser.add_argument(
        "--no-agent-process",
        action="store_true",
        help="do not read a running system-probe's own environment and config file",
    )


def _add_assume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--assume-datadog",
        action="store_true",
        help="treat Datadog's network detection as active on this node even when no Datadog "
        "classifier is attached and no verified system-probe runs (conflicts then keep their "
        "severity; otherwise they are info there)",
    )


def _add_netns_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--netns",
        action="append",
        metavar="GLOB",
        help="only namespaces whose name (or raw netns name) matches GLOB (repeatable; "
        "default: all; a GLOB matching none is an error)",
    )


def _add_scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default text)"
    )
    p.add_argument("--pretty", action="store_true", help="json: indent (compact by default)")
    p.add_argument(
        "--detail",
        action="store_true",
        help="text: list every conflict and interface, and each remedy in every spelling",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="text: as --detail, with each classifier's exit paths and the values it returns",
    )
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        help="text: highlighting (default auto: on a terminal, unless NO_COLOR is set)",
    )
    p.add_argument(
        "--fail-on",
        choices=FAIL_ON,
        default="error",
        help="the least severe conflict that makes the exit status non-zero (default error)",
    )
    _add_netns_argument(p)
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"the daemon's configuration, for the observers it names (default "
        f"{DEFAULT_CONFIG_PATH} when present)",
    )
    _add_datadog_arguments(p)
    _add_assume_argument(p)
    p.add_argument(
        "--cilium-version",
        metavar="VERSION",
        type=_version_text,
        help="Cilium's version, to check the known Cilium/agent incompatibilities (default: "
        "the version in the image of the cilium-agent container running on the node)",
    )


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"the daemon's configuration (default {DEFAULT_CONFIG_PATH}; built-in defaults "
        "if that one is absent; a FILE given here must exist)",
    )
    p.add_argument(
        "--web.listen-address",
        dest="web_listen_address",
        metavar="HOST:PORT",
        help="where to serve the metrics, /healthz and /readyz (default 0.0.0.0:9842)",
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="TLS, client certificates and basic auth users, in the Prometheus exporter-toolkit "
        "web config format",
    )
    p.add_argument(
        "--web.telemetry-path",
        dest="web_telemetry_path",
        metavar="PATH",
        help="where the metrics are served (default /metrics)",
    )
    p.add_argument(
        "--log.level",
        dest="log_level",
        choices=("debug", "info", "warn", "error"),
        help="the least severe event logged (default info)",
    )
    p.add_argument(
        "--log.format",
        dest="log_format",
        choices=("logfmt", "json"),
        help="one line per event on stderr (default json)",
    )
    p.add_argument(
        "--listen-address",
        metavar="HOST:PORT",
        help="deprecated spelling of --web.listen-address, read for one more release",
    )


def _add_selftest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default text)"
    )
    p.add_argument(
        "--classifier-priority",
        type=int,
        metavar="N",
        help="build the scene for this classifier_priority instead of the node's configured one",
    )
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        help="the running daemon's /metrics to check propagation against (default: found from "
        "the tcprio daemon process running on this node)",
    )
    p.add_argument(
        "--no-daemon-check",
        action="store_true",
        help="do not check that the conflicts reach a running daemon's /metrics",
    )
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="highlighting"
    )
    _add_datadog_arguments(p)


def _add_bundle_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="write without asking")
    p.add_argument(
        "--output",
        metavar="FILE",
        help="archive to write (default /var/tmp/tcprio-bundle-<host>-<UTC time>.tar.gz)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"tcprio daemon configuration to include (default {DEFAULT_CONFIG_PATH})",
    )
    _add_netns_argument(p)
    p.add_argument(
        "--log-lines",
        type=_non_negative,
        default=2000,
        metavar="N",
        help="how many recent lines of the tcprio service's journal to include (default 2000)",
    )
    _add_datadog_arguments(p, none_option=False)
    _add_assume_argument(p)


COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "scan": (
        "scan this node once and report what hides Datadog's network classifier",
        SCAN_EXAMPLES,
        _add_scan_arguments,
    ),
    "serve": (
        "run the daemon: watch every namespace, serve Prometheus metrics",
        SERVE_EXAMPLES,
        _add_serve_arguments,
    ),
    "self-test": (
        "build a throw-away scene in namespaces of its own (veths, clsact, real BPF "
        "classifiers, tcx), send traffic through it and check every step of tcprio's "
        "detection; prints 'Self test: OK' or 'Self test: FAILED'",
        SELFTEST_EXAMPLES,
        _add_selftest_arguments,
    ),
    "bundle": (
        "collect what support needs into one tar.gz (secrets redacted), show the list of "
        "files and ask before writing it; nothing is uploaded",
        BUNDLE_EXAMPLES,
        _add_bundle_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tcprio",
        description="Find every TC classifier on this node, what it can return, and what hides "
        "Datadog Workload Protection's network classifier.",
        epilog=MAIN_EXAMPLES,
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"tcprio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (summary, examples, add_arguments) in COMMANDS.items():
        sub = commands.add_parser(
            name, help=summary.split(";")[0],
            description=textwrap.fill(summary[:1].upper() + summary[1:] + ".", 100),
            epilog=examples, formatter_class=_formatter,
        )  # fmt: skip
        add_arguments(sub)
    return parser


def build_bundle_parser() -> argparse.ArgumentParser:
    return _subparser("bundle")


def build_selftest_parser() -> argparse.ArgumentParser:
    return _subparser("self-test")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise LookupError(name)


def normalized_argv(argv: Sequence[str]) -> list[str]:
    """The older spellings as subcommands: `tcprio --scan ...` is `tcprio scan ...`, and
    `tcprio --config FILE ...` (systemd units of earlier versions) is `tcprio serve ...`."""
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        return argv
    if "--scan" in argv:
        argv.remove("--scan")
        return ["scan", *argv]
    if argv and argv[0].split("=", 1)[0] in LEGACY_DAEMON_OPTIONS:
        return ["serve", *argv]
    return argv


# --- checks after parsing --------------------------------------------------------------------


def _explicit_file(option: str, value: str | None) -> None:
    if value is not None and not os.path.lexists(value):
        raise UsageError(f"{option} {label_of(value)}: no such file")


def _check_scan_options(args: argparse.Namespace) -> None:
    if args.format == "json":
        for name, given in (("--detail", args.detail), ("--explain", args.explain),
                            ("--color", args.color is not None)):  # fmt: skip
            if given:
                raise UsageError(f"{name} only applies to the text report, not --format json")
    elif args.pretty:
        raise UsageError("--pretty only applies to --format json (the text report has no indent)")
    if args.datadog_config and args.no_datadog_config:
        raise UsageError("--datadog-config and --no-datadog-config cannot go together")
    for path in args.datadog_config or ():
        _explicit_file("--datadog-config", path)
    _explicit_file("--config", args.config)


def _use_color(choice: str | None) -> bool:
    if choice in ("always", "never"):
        return choice == "always"
    return os.isatty(1) and not os.environ.get("NO_COLOR")


class UnmatchedNetns(Exception):
    """A --netns GLOB that matched no namespace."""


def _namespace_filter(patterns: Sequence[str] | None, containers: NodeContainers | None = None):
    """Discovery limited to the namespaces whose name (or raw netns name) matches a pattern;
    UnmatchedNetns when a pattern matches none. `containers`: the runtimes' bundles when
    already read."""

    def discover() -> list[NetNamespace]:
        found = discover_namespaces(containers=containers)
        if not patterns:
            return found
        for pattern in patterns:
            if not any(ns.matches(pattern) for ns in found):
                raise UnmatchedNetns(
                    f"--netns {label_of(pattern)}: no network namespace on this node matches "
                    "(names as in the report: host, pod:<namespace>/<pod>, the netns name ...)"
                )
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


# --- the commands ----------------------------------------------------------------------------


def run_scan_command(args: argparse.Namespace) -> int:
    _check_scan_options(args)
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
    if args.no_datadog_config:
        files = []
    containers = read_containers()  # once: pods' names, versions, the agent's image
    settings = resolve_settings(
        files=files, scan_processes=not args.no_agent_process, containers=containers
    )
    for error in settings.errors:
        print(f"tcprio: Datadog configuration: {error}", file=sys.stderr)
    observers = _configured_observers(Path(args.config or DEFAULT_CONFIG_PATH))
    try:
        scan = run_scan(
            discover=_namespace_filter(args.netns, containers),
            settings=settings,
            cilium_version=args.cilium_version,
            observers=observers,
            assume_datadog=args.assume_datadog,
            containers=containers,
        )
    except UnmatchedNetns as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # the one place a failed scan becomes exit status 3
        print(f"tcprio: scan failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    status = exit_status(scan, fail_on=args.fail_on)
    if args.format == "json":
        # json.dumps without indent is the C encoder; json.dump and indent are pure Python
        # (5x slower on a big node): compact unless asked.
        document = scan_json(scan, fail_on=args.fail_on)
        sys.stdout.write(json.dumps(document, indent=2 if args.pretty else None) + "\n")
    else:
        sys.stdout.write(
            render_text(
                scan, color=_use_color(args.color), explain_terminal=args.explain,
                detail=args.detail or args.explain, status=status,
            )
        )  # fmt: skip
    return status


def run_serve_command(args: argparse.Namespace) -> int:
    _explicit_file("--config", args.config)
    _explicit_file("--web.config.file", args.web_config_file)
    if _refused("tcprio"):
        return EXIT_FAILED
    from tcprio.service.config import Overrides
    from tcprio.service.daemon import run_daemon

    overrides = Overrides(
        listen_address=args.web_listen_address,
        legacy_listen_address=args.listen_address,
        web_config_file=args.web_config_file,
        telemetry_path=args.web_telemetry_path,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    return run_daemon(Path(args.config or DEFAULT_CONFIG_PATH), overrides)


def run_bundle_command(args: argparse.Namespace) -> int:
    _explicit_file("--config", args.config)
    for path in args.datadog_config or ():
        _explicit_file("--datadog-config", path)
    if args.config is None:
        args.config = str(DEFAULT_CONFIG_PATH)
    if _refused("tcprio bundle"):
        return EXIT_FAILED
    from tcprio.bundle.cli import run_bundle

    discover = _namespace_filter(args.netns)
    if args.netns:
        try:
            discover()  # a GLOB matching nothing is refused before anything is collected
        except UnmatchedNetns as exc:
            raise UsageError(str(exc)) from None
    return run_bundle(args, discover=discover)


def run_selftest_command(args: argparse.Namespace) -> int:
    if args.datadog_config and args.no_datadog_config:
        raise UsageError("--datadog-config and --no-datadog-config cannot go together")
    for path in args.datadog_config or ():
        _explicit_file("--datadog-config", path)
    if _refused("tcprio self-test"):
        return EXIT_FAILED
    from tcprio.selftest.cli import run_selftest

    return run_selftest(args)


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scan": run_scan_command,
    "serve": run_serve_command,
    "self-test": run_selftest_command,
    "bundle": run_bundle_command,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(normalized_argv(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("tcprio: a command is needed: scan, serve, self-test or bundle "
              "(see `tcprio --help`)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        return RUNNERS[args.command](args)
    except UsageError as exc:
        print(f"tcprio {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
