"""`tcprio self-test`: prove on this node, step by step, that tcprio's detection works.

The plan (which classifier goes where, and what tcprio must conclude about it) is pure and
derived from the configured classifier_priority P alone:

    node/st-node egress   clsact 1 term_ok (CNI-like)         -> critical, observer starved
                          clsact P classifier_egress (observer)
    node/st-node ingress  clsact 1 pass_unspec (transparent)   -> error, fixable below M
                          clsact M term_shot, M = P - 1 (only when P >= 3)
                          clsact P classifier_ingress (observer)
    pod/st-pod egress     clsact 1 pass_pipe (transparent)     -> no conflict, observer runs
                          clsact P classifier_egress (observer)
    pod/st-pod ingress    tcx term_ok (when the kernel has tcx) -> critical, observer starved
                          clsact P classifier_ingress (observer)

`selftest_scene` builds it in the kernel; the checks here compare what tcprio found and what
the kernel did (BPF_PROG_TEST_RUN, run counters on real UDP traffic) with the plan.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from tcprio.kernel import bpf_syscalls
from tcprio.model import (
    Classifier,
    DatadogSettings,
    Direction,
    HookKey,
    HookKind,
    RunStats,
    Setting,
    VerdictClass,
)
from tcprio.scan import Scan
from tcprio.selftest import live_verdicts
from tcprio.selftest import scene as selftest_scene
from tcprio.selftest.scene import (
    NODE_ADDR,
    NODE_IF,
    POD_ADDR,
    POD_IF,
    AttachedClassifier,
    Placement,
    Scene,
    SceneError,
)

TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_PIPE = -1, 0, 2, 3
PACKETS_PER_DIRECTION = 50


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StepResult:
    name: str
    status: Status
    summary: str
    problems: tuple[str, ...] = ()


@dataclass
class SelfTestReport:
    classifier_priority: int
    priority_source: str
    steps: list[StepResult] = field(default_factory=list)
    interrupted: bool = False
    on_step: Callable[[StepResult], None] | None = field(default=None, repr=False, compare=False)

    def add(self, *steps: StepResult) -> None:
        """Record steps, telling `on_step` about each as it comes (live progress)."""
        for step in steps:
            self.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(s.status is not Status.FAILED for s in self.steps)


@dataclass(frozen=True)
class SelfTestOptions:
    datadog_files: tuple[Path, ...] | None = None
    scan_processes: bool = True
    classifier_priority: int | None = None
    daemon_check: bool = True
    metrics_url: str | None = None
    packets: int = PACKETS_PER_DIRECTION
    daemon_timeout_s: float = 20.0


@dataclass
class SelfTestHooks:
    """For tcprio's own tests: break the scene on purpose once it is built."""

    after_build: Callable[[Scene], None] | None = None


# --- the plan (pure) -------------------------------------------------------------------------


def mid_priority(priority: int) -> int | None:
    """Where the fixable terminal classifier goes: between 2 and P - 1, when there is room."""
    return priority - 1 if priority >= 3 else None


def expected_recommendation(priority: int) -> int | None:
    """Below the mid terminal and on no taken priority (1 holds the CNI and the transparent
    ones), so it exists only when the mid terminal sits at 3 or more."""
    mid = mid_priority(priority)
    return mid - 1 if mid is not None and mid - 1 >= 2 else None


def _clsact(role: str, ns: str, ifname: str, direction: Direction, function: str,
            priority: int, values: set[int], terminal: bool) -> Placement:  # fmt: skip
    return Placement(
        role=role,
        namespace=ns,
        interface=ifname,
        direction=direction,
        hook=HookKind.CLSACT,
        function=function,
        priority=priority,
        expected_values=frozenset(values),
        terminal=terminal,
        is_datadog=role == "observer",
    )


def plan_scene(node_ns: str, pod_ns: str, priority: int, with_tcx: bool) -> list[Placement]:
    """Every classifier in the order it is attached (at a shared priority, added last runs
    first: the transparent ones go in before the observers, the terminal ones after)."""
    eg, ing = Direction.EGRESS, Direction.INGRESS
    plan = [
        _clsact("observer", node_ns, NODE_IF, eg, "classifier_egress", priority,
                {TC_ACT_UNSPEC}, False),
        _clsact("cni", node_ns, NODE_IF, eg, "term_ok", 1, {TC_ACT_OK}, True),
        _clsact("transparent", node_ns, NODE_IF, ing, "pass_unspec", 1, {TC_ACT_UNSPEC}, False),
        _clsact("observer", node_ns, NODE_IF, ing, "classifier_ingress", priority,
                {TC_ACT_UNSPEC}, False),
        _clsact("transparent", pod_ns, POD_IF, eg, "pass_pipe", 1, {TC_ACT_PIPE}, False),
        _clsact("observer", pod_ns, POD_IF, eg, "classifier_egress", priority,
                {TC_ACT_UNSPEC}, False),
        _clsact("observer", pod_ns, POD_IF, ing, "classifier_ingress", priority,
                {TC_ACT_UNSPEC}, False),
    ]  # fmt: skip
    mid = mid_priority(priority)
    if mid is not None:
        plan.append(_clsact("mid", node_ns, NODE_IF, ing, "term_shot", mid, {TC_ACT_SHOT}, True))
    if with_tcx:
        plan.append(
            Placement("tcx", pod_ns, POD_IF, ing, HookKind.TCX, "term_ok", None,
                      frozenset({TC_ACT_OK}), True)
        )  # fmt: skip
    return plan


def _hook_key(p: Placement) -> HookKey:
    return (p.namespace, p.interface, str(p.direction))


@dataclass(frozen=True)
class ExpectedConflict:
    hook: HookKey
    severity: str
    blocker_prog_id: int
    blocker: str  # for messages


def expected_conflicts(scene: Scene) -> list[ExpectedConflict]:
    """Each terminal classifier before an observer on its hook is a conflict: critical for
    priority 1 and tcx, error for the mid one."""
    found = []
    for c in scene.classifiers:
        p = c.placement
        if not p.terminal:
            continue
        severity = "error" if p.role == "mid" else "critical"
        blocker = f"{p.function} at {p.place}"
        found.append(ExpectedConflict(_hook_key(p), severity, c.prog_id, blocker))
    return found


def blocked_hooks(scene: Scene) -> set[HookKey]:
    return {_hook_key(c.placement) for c in scene.classifiers if c.placement.terminal}


# --- steps -----------------------------------------------------------------------------------


def _step(name: str, ok_summary: str, problems: list[str], failed_summary: str) -> StepResult:
    if problems:
        return StepResult(name, Status.FAILED, failed_summary, tuple(problems))
    return StepResult(name, Status.OK, ok_summary)


def _found_on_hooks(scan: Scan, namespaces: set[str]) -> dict[HookKey, list[Classifier]]:
    hooks: dict[HookKey, list[Classifier]] = {}
    for report in scan.result.hooks:
        if report.namespace in namespaces:
            key = (report.namespace, report.interface, str(report.direction))
            hooks[key] = list(report.classifiers)
    return hooks


def _matches(c: Classifier, a: AttachedClassifier) -> bool:
    p = a.placement
    if c.prog_id != a.prog_id or c.hook is not p.hook:
        return False
    return p.hook is HookKind.TCX or c.priority == p.priority


def check_discovery(scene: Scene, scan: Scan) -> StepResult:
    names = {scene.node_ns, scene.pod_ns}
    problems = [f"namespace {n} not discovered" for n in sorted(names - _scanned(scan))]
    found = _found_on_hooks(scan, names)
    matched: set[int] = set()
    for a in scene.classifiers:
        on_hook = found.get(_hook_key(a.placement), [])
        hit = next((c for c in on_hook if _matches(c, a)), None)
        if hit is None:
            problems.append(f"missing: {a.placement.function} (program {a.prog_id}) at "
                            f"{a.placement.place}")  # fmt: skip
        else:
            matched.add(id(hit))
    for key, classifiers in sorted(found.items()):
        for c in classifiers:
            if id(c) not in matched:
                problems.append(f"unexpected: {c.name} (program {c.prog_id}) on {'/'.join(key)}")
    total = len(scene.classifiers)
    return _step(
        "finds every classifier",
        f"{total} of {total} classifiers in namespaces {scene.node_ns} and {scene.pod_ns}, "
        "on the right hook, priority and program",
        problems,
        f"{len(matched)} of {total} classifiers found where they are attached",
    )


def _scanned(scan: Scan) -> set[str]:
    return {inv.namespace.name for inv in scan.inventories}


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _verdict_problems(a: AttachedClassifier, c: Classifier, scan: Scan) -> list[str]:
    p = a.placement
    want_class = VerdictClass.TERMINAL if p.terminal else VerdictClass.TRANSPARENT
    problems = []
    if c.verdict.verdict_class is not want_class:
        problems.append(
            f"{p.function} at {p.place}: classified {c.verdict.verdict_class}, expected "
            f"{want_class} ({c.verdict.reason or 'no reason given'})"
        )
    analysed = scan.verdicts.get(a.prog_id)
    values = None if analysed is None or analysed.values is None else set(analysed.values)
    if values is None or {_signed32(v) for v in values} != set(p.expected_values):
        problems.append(
            f"{p.function} (program {a.prog_id}): analysed return values {values}, expected "
            f"{sorted(p.expected_values)}"
        )
    returned = _signed32(bpf_syscalls.prog_test_run(a.prog_fd, selftest_scene.udp_frame()))
    if returned not in p.expected_values:
        problems.append(
            f"{p.function} (program {a.prog_id}): BPF_PROG_TEST_RUN returned {returned}, "
            f"outside the analysed {sorted(p.expected_values)}"
        )
    return problems


def check_verdicts(scene: Scene, scan: Scan) -> StepResult:
    found = _found_on_hooks(scan, {scene.node_ns, scene.pod_ns})
    problems: list[str] = []
    checked = 0
    for a in scene.classifiers:
        hit = next((c for c in found.get(_hook_key(a.placement), []) if _matches(c, a)), None)
        if hit is None:
            continue  # already reported as missing
        checked += 1
        problems += _verdict_problems(a, hit, scan)
    terminal = sum(1 for a in scene.classifiers if a.placement.terminal)
    return _step(
        "classifies every verdict",
        f"{checked} classifiers: {terminal} terminal, {checked - terminal} transparent; every "
        "analysed value set matches BPF_PROG_TEST_RUN",
        problems,
        "wrong verdicts",
    )


def _conflict_key(c) -> tuple[HookKey, str, int | None]:
    return ((c.namespace, c.interface, str(c.direction)), str(c.severity), c.blocker.prog_id)


def _remedy_problems(conflict, recommended: int | None) -> list[str]:
    summaries = [r.summary for r in conflict.remedies]
    where = f"{conflict.severity} conflict on {conflict.namespace}/{conflict.interface} " \
        f"{conflict.direction}"  # fmt: skip
    if str(conflict.severity) == "critical":
        if not any("disable Workload Protection network detection" in s for s in summaries):
            return [f"{where}: no remedy disabling network detection (got {summaries})"]
        return []
    want = f"set Workload Protection's classifier priority to {recommended}"
    if recommended is not None and want not in summaries:
        return [f"{where}: remedy {want!r} missing (got {summaries})"]
    return []


def _shadowing_problems(scan: Scan, names: set[str]) -> list[str]:
    """Only Datadog-named observers sit behind the scene's terminal classifiers: they are
    conflicts, and the hidden-classifier findings must not repeat them."""
    return [
        f"reported hidden besides the conflict on {s.namespace}/{s.interface} {s.direction}: "
        f"{s.message}"
        for s in scan.result.shadowings
        if s.namespace in names
    ]


def check_conflicts(scene: Scene, scan: Scan, priority: int) -> StepResult:
    names = {scene.node_ns, scene.pod_ns}
    raised = [c for c in scan.result.conflicts if c.namespace in names]
    expected = expected_conflicts(scene)
    raised_keys = {_conflict_key(c): c for c in raised}
    problems = []
    for e in expected:
        if (e.hook, e.severity, e.blocker_prog_id) not in raised_keys:
            problems.append(f"missing {e.severity} conflict on {'/'.join(e.hook)}: {e.blocker}")
    wanted = {(e.hook, e.severity, e.blocker_prog_id) for e in expected}
    for key, c in raised_keys.items():
        if key not in wanted:
            problems.append(f"unexpected {c.severity} conflict on {'/'.join(key[0])}: {c.message}")
    recommended = expected_recommendation(priority)
    if scan.result.recommended_priority != recommended:
        problems.append(
            f"recommended classifier_priority {scan.result.recommended_priority}, expected "
            f"{recommended}"
        )
    for c in raised:
        problems += _remedy_problems(c, recommended)
    problems += _shadowing_problems(scan, names)
    counts = ", ".join(
        f"{sum(1 for e in expected if e.severity == s)} {s}" for s in ("critical", "error")
    )
    rec = "none possible" if recommended is None else str(recommended)
    return _step(
        "raises exactly the expected conflicts",
        f"{counts}; remedies attached; recommended classifier_priority {rec}; no observer "
        "hidden reported twice",
        problems,
        f"{len(raised)} conflicts raised, {len(expected)} expected",
    )


# --- traffic and run counters ------------------------------------------------------------------


Sample = dict[int, RunStats]


def sample_runs(prog_ids: Iterable[int]) -> Sample:
    stats = {}
    for prog_id in prog_ids:
        info = bpf_syscalls.prog_info(prog_id, with_insns=False)
        stats[prog_id] = RunStats(info.run_cnt, info.run_time_ns)
    return stats


def expected_min_runs(scene: Scene, packets: int) -> dict[int, tuple[str, int | None]]:
    """Program id -> (what it is, the runs it must show: at least `packets`, or exactly 0)."""
    blocked = blocked_hooks(scene)
    wanted = {}
    for a in scene.classifiers:
        p = a.placement
        starved = p.role == "observer" and _hook_key(p) in blocked
        wanted[a.prog_id] = (f"{p.function} at {p.place}", None if starved else packets)
    return wanted


def _runs_problems(
    wanted: Mapping[int, tuple[str, int | None]], before: Sample, after: Sample
) -> list[str]:
    problems = []
    for prog_id, (what, at_least) in wanted.items():
        runs = after[prog_id].run_cnt - before[prog_id].run_cnt
        if at_least is None and runs != 0:
            problems.append(f"{what} ran {runs} times although it should be hidden")
        elif at_least is not None and runs < at_least:
            problems.append(f"{what} ran {runs} times for {at_least} packets: it should run")
    return problems


def send_traffic(scene: Scene, packets: int) -> None:
    selftest_scene.send_udp(scene, scene.node_ns, POD_ADDR, packets)
    selftest_scene.send_udp(scene, scene.pod_ns, NODE_ADDR, packets)


def _settle(scene: Scene, wanted: Mapping[int, tuple[str, int | None]], before: Sample) -> Sample:
    """Ingress runs in softirq, maybe after sendto returned: wait (1 s at most) for the counts."""
    deadline = time.monotonic() + 1.0
    while True:
        after = sample_runs(wanted)
        if not _runs_problems(wanted, before, after) or time.monotonic() > deadline:
            time.sleep(0.05)
            return sample_runs(wanted)
        time.sleep(0.02)


@dataclass(frozen=True)
class TrafficEvidence:
    before: Sample
    after: Sample
    before_at: float
    after_at: float


def run_traffic(scene: Scene, packets: int) -> tuple[StepResult, TrafficEvidence | None]:
    name = "real traffic through the scene"
    wanted = expected_min_runs(scene, packets)
    try:
        stats_fd = bpf_syscalls.enable_run_stats()
    except OSError as exc:
        return StepResult(
            name, Status.SKIPPED,
            f"BPF run statistics are not available ({exc}; BPF_ENABLE_STATS needs Linux 5.8): "
            "tcprio cannot observe starvation on this kernel, only predict it",
        ), None  # fmt: skip
    try:
        before_at, before = time.monotonic(), sample_runs(wanted)
        send_traffic(scene, packets)
        after = _settle(scene, wanted, before)
        after_at = time.monotonic()
    finally:
        os.close(stats_fd)
    problems = _runs_problems(wanted, before, after)
    starved = sum(1 for _, n in wanted.values() if n is None)
    result = _step(
        name,
        f"{packets} UDP packets each way: every classifier tcprio says runs did run, and the "
        f"{starved} observers it says are hidden ran 0 times (BPF run counters)",
        problems,
        "the kernel disagrees with tcprio",
    )
    return result, TrafficEvidence(before, after, before_at, after_at)


def check_starvation(scene: Scene, scan: Scan, evidence: TrafficEvidence | None) -> StepResult:
    from tcprio.analysis.starvation import starved_hooks

    name = "sees the observers starved"
    if evidence is None:
        return StepResult(name, Status.SKIPPED, "no run counters on this kernel (see above)")
    samples = [(evidence.before_at, evidence.before), (evidence.after_at, evidence.after)]
    seen = starved_hooks(scan.result, samples, min_window_s=0.0)
    names = {scene.node_ns, scene.pod_ns}
    seen = frozenset(h for h in seen if h[0] in names)
    want = blocked_hooks(scene)
    problems = [f"starvation not seen on {'/'.join(h)}" for h in sorted(want - seen)]
    problems += [f"starvation wrongly reported on {'/'.join(h)}" for h in sorted(seen - want)]
    return _step(
        name,
        f"{len(want)} hooks starved, as run counters show, and the unblocked observer not",
        problems,
        "tcprio's starvation verdict is wrong",
    )


# --- settings --------------------------------------------------------------------------------


def selftest_settings(settings: DatadogSettings, priority: int | None) -> DatadogSettings:
    """The node's settings, with network detection on in both directions (the self-test checks
    the detection itself, whatever the node's agent does) and maybe another priority."""
    forced = Setting(True, "self-test")
    chosen = settings.classifier_priority
    if priority is not None:
        chosen = Setting(priority, "self-test --classifier-priority")
    return replace(settings, enabled=forced, ingress_enabled=forced, classifier_priority=chosen)


# --- the daemon ------------------------------------------------------------------------------


def _severity_for_daemon(severity: str, node_settings: DatadogSettings) -> str:
    # The daemon applies the node's own settings: with network detection off it says "info".
    return severity if bool(node_settings.enabled.value) else "info"


def check_daemon(
    scene: Scene, options: SelfTestOptions, node_settings: DatadogSettings
) -> StepResult:
    from tcprio.selftest import running_daemon as sd

    name = "conflicts reach the daemon's /metrics"
    if not options.daemon_check:
        return StepResult(name, Status.SKIPPED, "not asked (--no-daemon-check)")
    if options.metrics_url:
        target: sd.DaemonTarget | None = sd.DaemonTarget(None, options.metrics_url, None, None)
    else:
        target, why = sd.find_daemon(scene.pid)
        if target is None:
            return StepResult(name, Status.SKIPPED, f"{why}: end-to-end propagation not checked")
    assert target is not None
    names = {scene.node_ns, scene.pod_ns}
    left_out = sd.excluded_by(target.config, sorted(names))
    if left_out:
        return StepResult(name, Status.SKIPPED, f"daemon pid {target.pid}: {left_out}")
    # The daemon names a blocking program by its tag (stable across reloads), not its id.
    want = {
        (*e.hook, _severity_for_daemon(e.severity, node_settings),
         bpf_syscalls.prog_info(e.blocker_prog_id, with_insns=False).tag)
        for e in expected_conflicts(scene)
    }  # fmt: skip
    seen = sd.wait_for_conflicts(target, want, names, options.daemon_timeout_s, scene.built_at)
    if want - seen.seen and seen.omitted:
        return StepResult(name, Status.SKIPPED, (
            f"the daemon left {seen.omitted} conflict series out of /metrics "
            "(metrics.max_hook_series): raise it, or set metrics.full_inventory, to check "
            "propagation on this node"))  # fmt: skip
    problems = [f"missing from {target.url}: {'/'.join(k[:3])} {k[3]} (program {k[4]})"
                for k in sorted(want - seen.seen)]  # fmt: skip
    problems += [f"unexpected in {target.url}: {'/'.join(k[:3])} {k[3]} (program {k[4]})"
                 for k in sorted(seen.seen - want)]  # fmt: skip
    if problems and seen.error:
        problems.append(seen.error)
    who = f"daemon pid {target.pid}" if target.pid else "the daemon"
    return _step(
        name,
        f"{who} exported all {len(want)} conflicts at {target.url}, seen {seen.seconds:.2f} s "
        "after the scene was complete",
        problems,
        f"{who} did not export the conflicts within {options.daemon_timeout_s:.0f} s",
    )


# --- the run ---------------------------------------------------------------------------------


def _leftovers_step() -> StepResult:
    removed = selftest_scene.remove_leftovers()
    if not removed:
        return StepResult("leftovers of earlier runs", Status.OK, "none")
    pids = sorted({pid for _, pid in removed})
    return StepResult(
        "leftovers of earlier runs",
        Status.OK,
        f"removed {len(removed)} namespaces of killed runs (pid {', '.join(map(str, pids))})",
    )


def build_scene(scene: Scene, factory, priority: int) -> StepResult:
    selftest_scene.create_namespaces(scene)
    selftest_scene.create_veth(scene)
    selftest_scene.add_clsact_qdiscs(scene)
    scene.tcx_problem = selftest_scene.tcx_support(scene)
    scene.tcx_available = not scene.tcx_problem
    for placement in plan_scene(scene.node_ns, scene.pod_ns, priority, scene.tcx_available):
        fd = factory.load(placement.function)
        if placement.hook is HookKind.TCX:
            scene.link_fds.append(selftest_scene.attach_tcx(scene, placement, fd))
        else:
            selftest_scene.attach_clsact(scene, placement, fd)
        scene.classifiers.append(
            AttachedClassifier(placement, bpf_syscalls.prog_id_of_fd(fd), fd)
        )
    scene.built_at = time.monotonic()
    hooks = len({_hook_key(c.placement) for c in scene.classifiers})
    notes = []
    if not scene.tcx_available:
        notes.append(
            f"tcx case left out: {scene.tcx_problem}; tcx programs cannot hide Datadog's "
            "classifier on this kernel"
        )
    if mid_priority(priority) is None:
        notes.append(
            f"fixable case left out: with classifier_priority {priority} no vendor priority "
            "can sit between 1 and Datadog's, so every conflict here is critical"
        )
    summary = (
        f"namespaces {scene.node_ns} and {scene.pod_ns}, a veth pair, {len(scene.classifiers)} "
        f"classifiers on {hooks} hooks" + "".join(f"; {n}" for n in notes)
    )
    return StepResult("builds the scene", Status.OK, summary)


def _cleanup_step(scene: Scene) -> StepResult:
    names = (scene.node_ns, scene.pod_ns)
    prog_ids = [c.prog_id for c in scene.classifiers]
    links = sum(1 for c in scene.classifiers if c.placement.hook is HookKind.TCX)
    problems = [f"namespace {n} still exists" for n in selftest_scene.existing_namespaces(names)]
    problems += [
        f"program {p} still loaded" for p in selftest_scene.wait_until_gone(prog_ids)
    ]
    return _step(
        "leaves nothing behind",
        f"namespaces deleted, {len(prog_ids)} programs and {links} tcx links released",
        problems,
        "cleanup incomplete",
    )


def _skipped_after(failure: str, names: Iterable[str]) -> list[StepResult]:
    return [StepResult(n, Status.SKIPPED, f"not run: {failure}") for n in names]


LATER_STEPS = (
    "finds every classifier",
    "classifies every verdict",
    "raises exactly the expected conflicts",
    "real traffic through the scene",
    "sees the observers starved",
    live_verdicts.STEP,
    "conflicts reach the daemon's /metrics",
)


def _live_step(outcome: live_verdicts.Outcome) -> StepResult:
    if outcome.ok is None:
        return StepResult(live_verdicts.STEP, Status.SKIPPED, outcome.summary)
    status = Status.OK if outcome.ok else Status.FAILED
    return StepResult(live_verdicts.STEP, status, outcome.summary, outcome.problems)


def _scan_scene(scene: Scene, settings: DatadogSettings) -> Scan:
    from tcprio.kernel.namespaces import discover_namespaces
    from tcprio.scan import run_scan

    names = {scene.node_ns, scene.pod_ns}
    return run_scan(
        discover=lambda: [ns for ns in discover_namespaces() if ns.name in names],
        settings=settings,
        assume_datadog=True,  # its own scene: Datadog's classifier is part of it
    )


def _checks(scene: Scene, options: SelfTestOptions, settings: DatadogSettings,
            node_settings: DatadogSettings, report: SelfTestReport) -> None:  # fmt: skip
    scan = _scan_scene(scene, settings)
    report.add(check_discovery(scene, scan))
    report.add(check_verdicts(scene, scan))
    report.add(check_conflicts(scene, scan, report.classifier_priority))
    (traffic, evidence), live = live_verdicts.counted(
        scene, lambda: run_traffic(scene, options.packets)
    )
    report.add(traffic)
    report.add(check_starvation(scene, scan, evidence))
    report.add(_live_step(live))
    report.add(check_daemon(scene, options, node_settings))


def run_self_test(
    options: SelfTestOptions,
    node_settings: DatadogSettings,
    hooks: SelfTestHooks | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> SelfTestReport:
    """Every step, in order. A KeyboardInterrupt (Ctrl-C, or a stop signal made into one by the
    caller) removes the scene and ends the run: the report says `interrupted`."""
    settings = selftest_settings(node_settings, options.classifier_priority)
    priority = int(settings.classifier_priority.value)  # type: ignore[call-overload]
    report = SelfTestReport(priority, settings.classifier_priority.source, on_step=on_step)
    try:
        _run_steps(report, options, settings, node_settings, hooks)
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def _run_steps(report: SelfTestReport, options: SelfTestOptions, settings: DatadogSettings,
               node_settings: DatadogSettings, hooks: SelfTestHooks | None) -> None:  # fmt: skip
    report.add(_leftovers_step())
    try:
        factory = selftest_scene.ProgramFactory()
    except Exception as exc:
        report.add(_compile_failure(exc))
        report.add(*_skipped_after("the classifiers could not be compiled", LATER_STEPS))
        return
    report.add(
        StepResult("compiles the classifiers", Status.OK, f"{selftest_scene.CLASSIFIERS_C}, BCC")
    )
    scene = Scene(os.getpid(), *selftest_scene.namespace_names(os.getpid()))
    try:
        try:
            report.add(build_scene(scene, factory, report.classifier_priority))
        except (SceneError, OSError) as exc:
            report.add(StepResult("builds the scene", Status.FAILED, str(exc)))
            report.add(*_skipped_after("the scene could not be built", LATER_STEPS))
            return
        if hooks is not None and hooks.after_build is not None:
            hooks.after_build(scene)
        _checks(scene, options, settings, node_settings, report)
    finally:
        with _signals_held():
            _silently(selftest_scene.destroy, scene)
            _silently(factory.close)
            report.add(_cleanup_step(scene))


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short: it is delivered once the scene is gone."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _silently(action: Callable, *args: object) -> None:
    with contextlib.suppress(Exception):
        action(*args)


def _compile_failure(exc: Exception) -> StepResult:
    from tcprio.kernel.bcc_support import HeadersMissing

    if isinstance(exc, HeadersMissing):
        detail = (
            f"{exc}. BCC needs kernel headers to compile the self-test's classifiers, so the "
            "self-test cannot run here; `tcprio --scan` and the daemon do not need them"
        )
    elif isinstance(exc, ImportError):
        detail = (
            f"BCC is not importable ({exc}): install python3-bpfcc (`scripts/setup.sh "
            "runtime` does); the self-test cannot run without it, the scan and the daemon can"
        )
    elif isinstance(exc, selftest_scene.CompileError):
        detail = f"{exc}; the self-test cannot run here (the scan and the daemon do not compile)"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return StepResult("compiles the classifiers", Status.FAILED, detail)
