"""`tcprio self-test` on the command line: live progress, the verdict, cleanup on signals."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from tcprio.selftest.runner import (
    SelfTestOptions,
    SelfTestReport,
    Status,
    StepResult,
    run_self_test,
)

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

MARKS = {Status.OK: " OK ", Status.FAILED: "FAIL", Status.SKIPPED: "SKIP"}
COLORS = {Status.OK: "32", Status.FAILED: "1;31", Status.SKIPPED: "33"}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: stop, removing the scene first."""


DEFER_S = 0.01  # a signal that lands in a finalizer is raised again this much later


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether the signal interrupted a `__del__` (a subprocess.Popen being collected): Python
    prints an exception raised there as "Exception ignored in ..." with its traceback, and
    drops it."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


class _StopOnce:
    """Raise Interrupted on the first stop signal only: more Ctrl-Cs must not cut the cleanup.
    A signal that lands in a finalizer is raised a moment later, outside it (SIGALRM)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._deferred: str | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        name = self._deferred if signum == signal.SIGALRM else signal.Signals(signum).name
        if name is None:
            return
        if _in_finalizer(frame):
            self._deferred = name
            signal.signal(signal.SIGALRM, self)
            signal.setitimer(signal.ITIMER_REAL, DEFER_S)
            return
        self.received = name
        raise Interrupted(name)


def step_lines(step: StepResult, color: bool) -> list[str]:
    mark = MARKS[step.status]
    if color:
        mark = f"\033[{COLORS[step.status]}m{mark}\033[0m"
    lines = [f"[{mark}] {step.name}: {step.summary}"]
    lines += [f"         - {problem}" for problem in step.problems]
    return lines


def verdict_line(report: SelfTestReport) -> str:
    if report.interrupted:
        return "Self test: FAILED (interrupted; the scene was removed)"
    return "Self test: OK" if report.ok else "Self test: FAILED"


def report_json(report: SelfTestReport) -> dict[str, Any]:
    return {
        "schema": "tcprio.self-test",
        "schema_version": 1,
        "ok": report.ok,
        "interrupted": report.interrupted,
        "classifier_priority": report.classifier_priority,
        "classifier_priority_source": report.priority_source,
        "steps": [
            {"name": s.name, "status": str(s.status), "summary": s.summary,
             "problems": list(s.problems)}
            for s in report.steps
        ],
    }  # fmt: skip


def _use_color(choice: str, stream: TextIO) -> bool:
    auto = stream.isatty() and not os.environ.get("NO_COLOR")
    return choice == "always" or (choice == "auto" and auto)


def _options(args: argparse.Namespace) -> SelfTestOptions:
    files = tuple(Path(f) for f in args.datadog_config) if args.datadog_config else None
    if getattr(args, "no_datadog_config", False):
        files = ()
    return SelfTestOptions(
        datadog_files=files,
        scan_processes=not args.no_agent_process,
        classifier_priority=args.classifier_priority,
        daemon_check=not args.no_daemon_check,
        metrics_url=args.metrics_url,
    )


def _node_settings(options: SelfTestOptions):
    from tcprio.datadog import resolve_settings
    from tcprio.kernel.datadog_agent import DEFAULT_FILES

    files = options.datadog_files if options.datadog_files is not None else DEFAULT_FILES
    settings = resolve_settings(files=files, scan_processes=options.scan_processes)
    for error in settings.errors:
        print(f"tcprio self-test: Datadog configuration: {error}", file=sys.stderr)
    return settings


def _check_priority(value: int | None) -> str:
    if value is not None and not 1 <= value <= 65535:
        return f"--classifier-priority {value}: a tc priority is 1..65535"
    return ""


def run_selftest(args: argparse.Namespace) -> int:
    problem = _check_priority(args.classifier_priority)
    if problem:
        print(f"tcprio self-test: {problem}", file=sys.stderr)
        return 2
    options = _options(args)
    text = args.format == "text"
    color = _use_color(args.color, sys.stdout)

    def show(step: StepResult) -> None:
        if text:
            print("\n".join(step_lines(step, color)), flush=True)

    # Kept until the process ends: a signal arriving after the run must not kill the report.
    stop = _StopOnce()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        settings = _node_settings(options)
        if text:
            print("tcprio self-test: a throw-away scene in namespaces of its own", flush=True)
        report = run_self_test(options, settings, on_step=show)
    except KeyboardInterrupt:
        report = SelfTestReport(0, "", interrupted=True)
    # A library may catch the KeyboardInterrupt on its way out (pyroute2's asyncio core turns
    # it into a netlink error): the signal itself says whether the run was interrupted.
    report.interrupted = report.interrupted or stop.received is not None
    if text:
        print(verdict_line(report))
    else:
        json.dump(report_json(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED
