"""The daemon's state as scrapes see it: one immutable snapshot, swapped whole.

The event loop owns the counters and builds a new Snapshot after every change; the HTTP threads
only ever read the latest one, so every scrape is consistent.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from tcprio.analysis.churn import Change
from tcprio.model import DatadogSettings, HookKey, ProgramInfo, RunStats, ScanResult, VendorVersion

ChangeKey = tuple[str, str, str, int, str]  # namespace, interface, direction, priority, change
LiveKey = tuple[str, str, str, str, str]  # namespace, interface, direction, priority, verdict
RecentChange = tuple[float, HookKey, str]  # monotonic time, hook, "add_delete" or "replacement"
CHURN_WINDOW_S = 900.0  # what tcprio_hooks_churning looks back on
MAX_RECENT_CHANGES = 100_000  # a storm beyond this forgets its oldest changes first


@dataclass
class Counters:
    """Monotonic totals. The per-hook ones drop the series of vanished namespaces and
    interfaces; the per-direction ones (what /metrics exports by default) never shrink."""

    filter_changes: Counter[ChangeKey] = field(default_factory=Counter)
    replacements: Counter[tuple[str, str, str, int]] = field(default_factory=Counter)
    disappearances: Counter[HookKey] = field(default_factory=Counter)
    scans: Counter[str] = field(default_factory=Counter)
    scan_errors: Counter[str] = field(default_factory=Counter)
    reloads: Counter[str] = field(default_factory=Counter)
    # by (direction, change), by direction: every hook's, vanished ones included
    changes_by_direction: Counter[tuple[str, str]] = field(default_factory=Counter)
    replacements_by_direction: Counter[str] = field(default_factory=Counter)
    disappearances_by_direction: Counter[str] = field(default_factory=Counter)
    recent: deque[RecentChange] = field(default_factory=lambda: deque(maxlen=MAX_RECENT_CHANGES))

    def count_filter_event(
        self, hook: HookKey, priority: int, change: str, now: float | None = None
    ) -> None:
        """A filter added or deleted (`change`), as its netlink event said."""
        when = self._now(now)
        self.filter_changes[(*hook, priority, change)] += 1
        self.changes_by_direction[(hook[2], change)] += 1
        self.recent.append((when, hook, "add_delete"))

    def _now(self, now: float | None) -> float:
        """The time of a change, after forgetting the changes older than the window."""
        when = time.monotonic() if now is None else now
        while self.recent and self.recent[0][0] < when - CHURN_WINDOW_S:
            self.recent.popleft()
        return when

    def count_change(self, change: Change, now: float | None = None) -> None:
        hook = (change.namespace, change.interface, str(change.direction))
        when = self._now(now)
        if change.kind in ("add", "delete"):
            self.count_filter_event(hook, change.priority, change.kind, when)
        elif change.kind == "replace":
            self.replacements[(*hook, change.priority)] += 1
            self.replacements_by_direction[hook[2]] += 1
            self.recent.append((when, hook, "replacement"))
        elif change.kind == "datadog-disappeared":
            self.disappearances[hook] += 1
            self.disappearances_by_direction[hook[2]] += 1

    def churning_hooks(self, now: float, threshold: int = 4) -> Counter[tuple[str, str]]:
        """Hooks by (direction, cause) with more than `threshold` filter adds and deletes, or
        any replacement, in the last CHURN_WINDOW_S seconds."""
        add_delete: Counter[HookKey] = Counter()
        replaced: set[HookKey] = set()
        for when, hook, cause in self.recent:
            if when < now - CHURN_WINDOW_S:
                continue
            if cause == "add_delete":
                add_delete[hook] += 1
            else:
                replaced.add(hook)
        churning: Counter[tuple[str, str]] = Counter()
        for hook, n in add_delete.items():
            if n > threshold:
                churning[(hook[2], "add_delete")] += 1
        for hook in replaced:
            churning[(hook[2], "replacement")] += 1
        return churning

    def forget(self, namespace: str, interfaces: set[str] | None = None) -> None:
        """Drop the series of a namespace (or of some of its interfaces) that went away."""

        def gone(key: tuple) -> bool:
            return key[0] == namespace and (interfaces is None or key[1] in interfaces)

        for counter in (self.filter_changes, self.replacements, self.disappearances):
            for key in [k for k in counter if gone(k)]:
                del counter[key]

    def frozen(self) -> Counters:
        return Counters(
            Counter(self.filter_changes),
            Counter(self.replacements),
            Counter(self.disappearances),
            Counter(self.scans),
            Counter(self.scan_errors),
            Counter(self.reloads),
            Counter(self.changes_by_direction),
            Counter(self.replacements_by_direction),
            Counter(self.disappearances_by_direction),
            deque(self.recent, maxlen=MAX_RECENT_CHANGES),
        )


@dataclass(frozen=True)
class ProbeState:
    available: bool
    mode: str
    reason: str


@dataclass(frozen=True)
class Snapshot:
    ready: bool
    taken_at: float
    analysis_seconds: float
    result: ScanResult
    programs: Mapping[int, ProgramInfo]
    datadog: DatadogSettings | None
    namespaces: int
    interfaces: int
    counters: Counters
    run_stats: Mapping[int, RunStats] = field(default_factory=dict)
    starved: frozenset[HookKey] = frozenset()
    live_verdicts: Mapping[LiveKey, int] = field(default_factory=dict)
    probe: ProbeState = ProbeState(False, "none", "not started")
    config_ok: bool = True
    kernel: str = ""
    generation: int = 0  # bumped with each published analysis; run-counter polls keep it
    versions: Mapping[str, VendorVersion] = field(default_factory=dict)  # found in images

    @staticmethod
    def empty(kernel: str = "") -> Snapshot:
        return Snapshot(
            ready=False,
            taken_at=time.time(),
            analysis_seconds=0.0,
            result=ScanResult(),
            programs={},
            datadog=None,
            namespaces=0,
            interfaces=0,
            counters=Counters(),
            kernel=kernel,
        )
