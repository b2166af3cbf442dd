"""Self-test step: where the live verdict probe attaches, its counts of the scene's traffic equal
the BPF run counters, per namespace, interface, direction and priority, with the return code
each classifier was built to give.

The probe starts before the traffic step and is read around it, with run statistics on the whole
time; each reading is taken until two in a row agree, so that a stray packet (neighbour
discovery) cannot fall between the probe's counts and the run counters. tcx placements are not
cls_bpf: the probe does not see them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tcprio.analysis.semantics import TC_ACT_UNSPEC, action_name
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import entered_path
from tcprio.model import HookKind

if TYPE_CHECKING:
    from tcprio.selftest.scene import AttachedClassifier, Scene
    from tcprio.service.live_probe import LiveProbe, ProbeMode, ProbeTarget, VerdictKey

STEP = "live verdicts equal the run counters"
# What cls_bpf_classify hands on in direct-action mode: these end the chain, the rest is UNSPEC.
CHAIN_ENDING = frozenset({0, 2, 4, 7, 8})
READS = 100  # readings at most until two agree
READ_PAUSE_S = 0.05

Place = tuple[int, int, str, int]  # netns inode, ifindex, direction, priority
Reading = tuple[dict[Any, int], dict[int, int]]  # probe counts, run counts by program id


@dataclass(frozen=True)
class Outcome:
    """The step's result as plain values (the runner turns it into a StepResult)."""

    ok: bool | None  # None: skipped
    summary: str
    problems: tuple[str, ...] = ()


def _clsact(scene: Scene) -> list[AttachedClassifier]:
    return [c for c in scene.classifiers if c.placement.hook is HookKind.CLSACT]


def _place(scene: Scene, c: AttachedClassifier) -> Place:
    p = c.placement
    path = scene.path(p.namespace)
    with entered_path(path):
        ifindex = socket.if_nametoindex(p.interface)
    return os.stat(path).st_ino, ifindex, str(p.direction), int(p.priority or 0)


def targets(scene: Scene) -> list[ProbeTarget]:
    from tcprio.service.live_probe import ProbeTarget

    found = []
    for c in _clsact(scene):
        inode, ifindex, _, priority = _place(scene, c)
        found.append(ProbeTarget(c.prog_id, priority, inode, ifindex, c.placement.direction))
    return found


def start(scene: Scene) -> tuple[LiveProbe | None, Outcome | None]:
    """The probe counting, or None and why the step is skipped (never raises)."""
    try:
        from tcprio.service.live_probe import LiveProbe, probe_support

        scene_targets = targets(scene)
        support = probe_support(scene_targets)
        if not support.available:
            return None, Outcome(None, f"the live probe cannot attach here: {support.reason}")
        probe = LiveProbe(targets=scene_targets)
        status = probe.start()
    except Exception as exc:  # the probe is optional evidence: never fail the self-test on it
        return None, Outcome(None, f"the live probe could not start: {exc}")
    if not status.available:
        probe.close()
        return None, Outcome(None, status.reason)
    return probe, None


def read(probe: LiveProbe, prog_ids: list[int]) -> Reading:
    """Probe counts and run counts, read until two readings in a row agree."""

    def once() -> Reading:
        runs = {p: bpf_syscalls.prog_info(p, with_insns=False).run_cnt for p in prog_ids}
        return probe.counts(), runs

    last = once()
    for _ in range(READS):
        time.sleep(READ_PAUSE_S)
        again = once()
        if again == last:
            break
        last = again
    return last


def _by_place(counts: dict[VerdictKey, int]) -> dict[Place, dict[int, int]]:
    found: dict[Place, dict[int, int]] = {}
    for key, n in counts.items():
        if key.priority is None or key.direction is None:
            continue
        place = (key.netns_inode, key.ifindex, str(key.direction), key.priority)
        by_code = found.setdefault(place, {})
        by_code[key.retval] = by_code.get(key.retval, 0) + n
    return found


def _expected_codes(c: AttachedClassifier, raw: bool) -> set[int]:
    values = set(c.placement.expected_values)
    return values if raw else {v if v in CHAIN_ENDING else TC_ACT_UNSPEC for v in values}


def _problems(scene: Scene, before: Reading, after: Reading, raw: bool) -> list[str]:
    problems = []
    probe_before, probe_after = _by_place(before[0]), _by_place(after[0])
    for c in _clsact(scene):
        place = _place(scene, c)
        what = f"{c.placement.function} at {c.placement.place}"
        was = probe_before.get(place, {})
        delta = {
            code: n - was.get(code, 0)
            for code, n in probe_after.get(place, {}).items()
            if n != was.get(code, 0)
        }
        ran = after[1][c.prog_id] - before[1][c.prog_id]
        if sum(delta.values()) != ran:
            problems.append(f"{what}: the probe counted {sum(delta.values())}, it ran {ran} times")
        unexpected = set(delta) - _expected_codes(c, raw)
        if unexpected:
            names = ", ".join(action_name(code) for code in sorted(unexpected))
            problems.append(f"{what}: the probe saw {names}")
    return problems


def check(scene: Scene, probe: LiveProbe, before: Reading, after: Reading) -> Outcome:
    from tcprio.service.live_probe import ProbeMode

    mode: ProbeMode = probe.status.mode  # type: ignore[union-attr]
    problems = _problems(scene, before, after, raw=mode is ProbeMode.FEXIT_PROG)
    if problems:
        return Outcome(False, "the live probe and the run counters disagree", tuple(problems))
    places = len(_clsact(scene))
    return Outcome(
        True,
        f"the live probe ({mode}) counted on each of the {places} cls_bpf classifiers exactly "
        "the packets its run counter counted, with the return codes it was built to give",
    )


def counted(scene: Scene, traffic: Callable[[], Any]) -> tuple[Any, Outcome]:
    """Run `traffic()` with the probe counting (and the run counters on throughout, so that
    both count the same packets); returns its result and the step's outcome."""
    probe, skipped = start(scene)
    if probe is None:
        return traffic(), skipped  # type: ignore[return-value]
    prog_ids = [c.prog_id for c in _clsact(scene)]
    try:
        with bpf_syscalls.run_stats():
            before = read(probe, prog_ids)
            result = traffic()
            after = read(probe, prog_ids)
        return result, check(scene, probe, before, after)
    except OSError as exc:  # BPF_ENABLE_STATS needs Linux 5.8
        return traffic(), Outcome(None, f"no BPF run statistics to compare with ({exc})")
    finally:
        probe.close()
