"""Starvation as observed fact: run counters show Datadog's classifier idle behind busy ones.

BPF run statistics count per program, not per hook, so a verdict is only drawn where the
Datadog program and the program in its way are each attached to this one hook: then their
counters speak for this hook alone. Pure: a scan result and counter samples in, hooks out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from tcprio.model import HookKey, RunStats, ScanResult, Severity

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


def starved_hooks(
    result: ScanResult, samples: Samples, min_window_s: float = MIN_WINDOW_S
) -> frozenset[HookKey]:
    """Hooks where a blocker ran and Datadog's classifier did not, over at least `min_window_s`
    (the daemon waits for MIN_WINDOW_S of evidence; the self-test sends its own traffic)."""
    if len(samples) < 2:
        return frozenset()
    attached = _attachments(result)
    starved = set()
    for hook in result.hooks:
        datadog = [c for c in hook.classifiers if c.is_datadog and c.prog_id is not None]
        if len(datadog) != 1 or attached[datadog[0].prog_id] != 1:
            continue
        blockers = [
            c.blocker.prog_id
            for c in hook.conflicts
            if c.severity in (Severity.CRITICAL, Severity.ERROR)
            and c.blocker.prog_id is not None
            and attached[c.blocker.prog_id] == 1
        ]
        busy = any((_runs(samples, p, min_window_s) or 0) > 0 for p in blockers)
        if busy and _runs(samples, datadog[0].prog_id, min_window_s) == 0:
            starved.add((hook.namespace, hook.interface, str(hook.direction)))
    return frozenset(starved)
