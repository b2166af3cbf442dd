"""The machinery of `tcprio bundle`'s collectors. Each collector returns a list of archive
members. It runs guarded: an exception, a command that fails, times out or is missing is
recorded as `errors/<collector>.txt` (and in `manifest.json`), and the bundle is still
written."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from tcprio.bundle.commands import CommandResult, run_command
from tcprio.model import DatadogSettings, NetNamespace

# --- the pieces ------------------------------------------------------------------------------


class Item(NamedTuple):
    """One file of the archive as a collector returns it: (archive path, bytes), plus the
    command that produced it and what that command said on stderr, when it is an output."""

    path: str
    data: bytes
    command: str | None = None
    stderr: str | None = None


@dataclasses.dataclass(frozen=True)
class Collector:
    name: str  # also names errors/<name>.txt: [A-Za-z0-9._-] only
    collect: Callable[[], list[Item]]


class CollectorFailed(Exception):
    """A collector failed part-way: `items` still go into the bundle, `message` says why."""

    def __init__(self, message: str, items: Sequence[Item] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.items = list(items)


@dataclasses.dataclass(frozen=True)
class Member:
    path: str
    data: bytes
    collector: str
    command: str | None = None
    stderr: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    collector: str
    error: str | None
    duration_s: float
    files: int


def _to_bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")


# --- collecting ------------------------------------------------------------------------------


class Gather:
    """The items and the problems of one collector."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.problems: list[str] = []

    def add(self, path: str, data: bytes | str, command: str | None = None) -> None:
        self.items.append(Item(path, _to_bytes(data), command))

    def fail(self, problem: str) -> None:
        self.problems.append(problem)

    def command(
        self, path: str | None, argv: Sequence[str], netns: tuple[int, str] | None = None
    ) -> CommandResult:
        """Run `argv` (in the namespace (fd, path) when given); its output becomes `path`."""
        shown = " ".join(argv)
        if netns is not None:
            shown = f"nsenter --net={netns[1]} {shown}"
        result = run_command(argv, shown, netns_fd=netns[0] if netns else None)
        if path is not None and (result.error is None or result.stdout):
            stderr = result.stderr.strip() or None
            self.items.append(Item(path, result.stdout, result.shown, stderr))
        if result.error is not None:
            self.fail(f"{result.shown}: {result.error}")
        return result

    def done(self) -> list[Item]:
        if self.problems:
            raise CollectorFailed("\n".join(self.problems), self.items)
        return self.items


def run_collector(collector: Collector) -> tuple[list[Member], Outcome]:
    """Run one collector; whatever happens, its members and what went wrong."""
    started = time.monotonic()
    detail = ""
    try:
        items, error = collector.collect(), None
    except CollectorFailed as exc:
        items, error = exc.items, exc.message
    except Exception as exc:
        items, error = [], f"{type(exc).__name__}: {exc}"
        detail = traceback.format_exc()
    duration = time.monotonic() - started
    members = [Member(i.path, i.data, collector.name, i.command, i.stderr) for i in items]
    if error is not None:
        text = f"collector: {collector.name}\nerror:\n{error}\n"
        if detail:
            text += f"\nwhere (for tcprio's developers):\n{detail}"
        members.append(Member(f"errors/{collector.name}.txt", text.encode(), collector.name))
    return members, Outcome(collector.name, error, duration, len(members))


def run_collectors(
    collectors: Sequence[Collector], workers: int = 1
) -> list[tuple[list[Member], Outcome]]:
    """Results in the collectors' order; `workers` > 1 runs them on that many daemon threads
    (Ctrl-C returns at once: no new collector starts, none is waited for)."""
    if workers <= 1 or len(collectors) <= 1:
        return [run_collector(c) for c in collectors]
    results: list[tuple[list[Member], Outcome] | None] = [None] * len(collectors)
    todo: queue.SimpleQueue[tuple[int, Collector]] = queue.SimpleQueue()
    for index, collector in enumerate(collectors):
        todo.put((index, collector))

    def work() -> None:
        while True:
            try:
                index, collector = todo.get_nowait()
            except queue.Empty:
                return
            results[index] = run_collector(collector)

    threads = [
        threading.Thread(target=work, name=f"tcprio-bundle-{n}", daemon=True)
        for n in range(min(workers, len(collectors)))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        while not todo.empty():  # Ctrl-C: nothing new starts
            with contextlib.suppress(queue.Empty):
                todo.get_nowait()
        raise
    return [r for r in results if r is not None]


# --- what several collectors share -----------------------------------------------------------


class Context:
    """What several collectors share: the options, the namespaces, the Datadog settings."""

    def __init__(self, args: argparse.Namespace, discover: Callable[[], list[NetNamespace]]):
        self.args = args
        self.discover = discover
        self.namespaces: list[NetNamespace] | None = None  # None: discovery failed
        self._settings: DatadogSettings | None = None

    def datadog_files(self) -> list[Path]:
        from tcprio.kernel.datadog_agent import DEFAULT_FILES

        dd = self.args.datadog_config
        return [Path(f) for f in dd] if dd else list(DEFAULT_FILES)

    def settings(self) -> DatadogSettings:
        """Resolved once, shared by the scan and the Datadog collector."""
        from tcprio.datadog import resolve_settings

        if self._settings is None:
            self._settings = resolve_settings(
                files=self.datadog_files(), scan_processes=not self.args.no_agent_process
            )
        return self._settings
