"""Starvation as observed fact: run counters show Datadog's classifier idle behind busy ones.

BPF run statistics count per program, not per hook, so a verdict is only drawn where the
Datadog program and the program in its way are each attached to this one hook: then their
counters speak for this hook alone. Every classifier that runs before Datadog's counts, whatever
its conflict severity or verdict class: the counters are the evidence, so a blocker whose
verdict static analysis could not prove (`unknown`, a warning) is caught the same way as a
proven one. Pure: a scan result and counter samples in, hooks out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from tcprio.analysis.conflicts import execution_order
from tcprio.model import Classifier, HookKey, HookReport, RunStats, ScanResult

Samples = Sequence[tuple[float, Mapping[int, RunStats]]]
MIN_WINDOW_S = 5.0


def _attachments(result: ScanResult) -> Counter[int]:
    return Counter(
        c.prog_id for hook in result.hooks for c in hook.classifiers if c.prog_id is not None
    )


def _runs(samples: Samples, prog_id: int, min_window_s: float) -> int | None:
    """Runs over the window: from the oldest sample that knows the program to the newest.

    None when the program has not been sampled over at least `min_window_s` yet."""
    last_time, last = samples[-1][0], samples[-1][1].get(prog_id)
    if last is None:
        return None
    for taken, stats in samples:
        first = stats.get(prog_id)
        if first is not None:
            return last.run_cnt - first.run_cnt if last_time - taken >= min_window_s else None
    return None


@dataclass(frozen=True)
class Starvation:
    """One hook where Datadog's classifier did not run while classifiers before it did."""

    hook: HookKey
    datadog: Classifier
    busy: tuple[tuple[Classifier, int], ...]  # the ones before it that ran, with their runs

    def as_log(self) -> dict[str, object]:
        namespace, interface, direction = self.hook
        return {
            "event": "datadog-starved",
            "namespace": namespace,
            "interface": interface,
            "direction": direction,
            "datadog_prog_id": self.datadog.prog_id,
            "datadog_program": self.datadog.name,
            "blockers": [_blocker_log(c, runs) for c, runs in self.busy],
        }


def _blocker_log(c: Classifier, runs: int) -> dict[str, object]:
    return {
        "prog_id": c.prog_id,
        "name": c.name,
        "vendor": c.vendor,
        "hook": str(c.hook),
        "priority": c.priority,
        "verdict": str(c.verdict.verdict_class),
        "runs": runs,
    }


def _before_datadog(hook: HookReport, datadog: Classifier) -> list[Classifier]:
    """Every classifier that sees a packet on this hook before Datadog's does."""
    ordered = execution_order(hook.classifiers)
    return list(ordered[: ordered.index(datadog)])


@dataclass(frozen=True)
class Candidate:
    """A hook whose counters can show starvation: one Datadog classifier, its program attached
    to this hook alone, and the classifiers before it whose programs are attached here alone
    (another's counter would mix in other hooks' packets)."""

    hook: HookKey
    datadog: Classifier
    before: tuple[Classifier, ...]


def candidates(result: ScanResult) -> tuple[Candidate, ...]:
    """The hooks of `result` where run counters can tell: they change only with the result, so
    the daemon computes them once per analysis, not at every reading of the counters."""
    attached = _attachments(result)
    found = []
    for hook in result.hooks:
        datadog = [c for c in hook.classifiers if c.is_datadog and c.prog_id is not None]
        if len(datadog) != 1 or attached[datadog[0].prog_id] != 1:
            continue
        before = tuple(
            c for c in _before_datadog(hook, datadog[0])
            if c.prog_id is not None and attached[c.prog_id] == 1
        )  # fmt: skip
        if before:
            where = (hook.namespace, hook.interface, str(hook.direction))
            found.append(Candidate(where, datadog[0], before))
    return tuple(found)


def _starvation(found: Candidate, samples: Samples, min_window_s: float) -> Starvation | None:
    if _runs(samples, found.datadog.prog_id, min_window_s) != 0:  # type: ignore[arg-type]
        return None
    busy = []
    for c in found.before:
        runs = _runs(samples, c.prog_id, min_window_s) or 0  # type: ignore[arg-type]
        if runs > 0:
            busy.append((c, runs))
    return Starvation(found.hook, found.datadog, tuple(busy)) if busy else None


def starvations(
    result: ScanResult,
    samples: Samples,
    min_window_s: float = MIN_WINDOW_S,
    among: Sequence[Candidate] | None = None,
) -> Iterator[Starvation]:
    """Hooks where a classifier before Datadog's ran and Datadog's did not, over at least
    `min_window_s` (the daemon waits for MIN_WINDOW_S of evidence; the self-test sends its own
    traffic). `among`: `candidates(result)`, when the caller keeps them."""
    if len(samples) < 2:
        return
    for found in candidates(result) if among is None else among:
        starved = _starvation(found, samples, min_window_s)
        if starved is not None:
            yield starved


def starved_hooks(
    result: ScanResult, samples: Samples, min_window_s: float = MIN_WINDOW_S
) -> frozenset[HookKey]:
    """The hooks of `starvations`."""
    return frozenset(s.hook for s in starvations(result, samples, min_window_s))
