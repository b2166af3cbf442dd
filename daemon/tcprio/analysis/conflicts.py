"""Which classifiers stand in front of Datadog's, and what to change. Pure: data in, findings out.

On one hook (interface + direction) a packet meets the tcx programs first, in their order, then
the clsact filters of chain 0 by priority, and within one priority in the kernel's list order.
Every classifier that sees the packet before Datadog's and may end the chain is a conflict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from tcprio.model import (
    ETH_P_ALL,
    Classifier,
    Conflict,
    Direction,
    HookKind,
    HookReport,
    ScanResult,
    Severity,
    VerdictClass,
)

SEVERITY_ORDER = {Severity.CRITICAL: 0, Severity.ERROR: 1, Severity.WARNING: 2, Severity.INFO: 3}


def severity_rank(conflict: Conflict) -> int:
    return SEVERITY_ORDER[conflict.severity]


@dataclass(frozen=True)
class HookClassifiers:
    """A hook's classifiers, already identified and classified, in any order."""

    namespace: str
    interface: str
    direction: Direction
    classifiers: tuple[Classifier, ...]


@dataclass(frozen=True)
class DatadogTarget:
    """Where Datadog's classifier is configured to go, and on which hooks it attaches."""

    priority: int
    enabled: bool = True
    directions: frozenset[Direction] = frozenset(Direction)


def execution_order(classifiers: Iterable[Classifier]) -> tuple[Classifier, ...]:
    """tcx first in link order, then clsact chain 0 by (priority, list order), then other chains.

    Filters in chains other than 0 only run when an action jumps there; they come last.
    """

    def key(c: Classifier) -> tuple[int, int, int, int]:
        if c.hook is HookKind.TCX:
            return (0, 0, 0, c.position)
        if c.chain == 0:
            return (1, 0, c.priority or 0, c.position)
        return (2, c.chain, c.priority or 0, c.position)

    return tuple(sorted(classifiers, key=key))


def _protocol_name(protocol: int) -> str:
    names = {
        ETH_P_ALL: "all", 0x0800: "ip", 0x86DD: "ipv6", 0x0806: "arp", 0x8100: "802.1q",
        0x88A8: "802.1ad",
    }  # fmt: skip
    return names.get(protocol, f"0x{protocol:04x}")


def describe(c: Classifier) -> str:
    vendor = f"{c.vendor} " if c.vendor else ""
    ident = f" (prog {c.prog_id})" if c.prog_id is not None else ""
    return f"{vendor}{c.kind} classifier '{c.name}'{ident}"


def _terminal_text(c: Classifier) -> str:
    actions = ", ".join(c.verdict.terminal_actions) or "a terminal verdict"
    scope = ""
    if c.hook is HookKind.CLSACT and c.protocol != ETH_P_ALL:
        scope = f" for protocol {_protocol_name(c.protocol)} packets"
    return f"may return {actions}{scope}"


@dataclass(frozen=True)
class _Position:
    """Where Datadog's classifier sits (or would sit) on a hook."""

    priority: int
    attached: bool
    index: int | None  # its index in execution order when attached


def _datadog_position(ordered: Sequence[Classifier], target: DatadogTarget) -> _Position:
    for index, c in enumerate(ordered):
        if c.is_datadog and c.hook is HookKind.CLSACT and c.chain == 0:
            return _Position(priority=c.priority or target.priority, attached=True, index=index)
    return _Position(priority=target.priority, attached=False, index=None)


def _runs_before(c: Classifier, index: int, pos: _Position) -> bool:
    if c.is_datadog:
        return False
    if c.hook is HookKind.TCX:
        return True
    if c.chain != 0:
        return False
    if pos.attached:
        return pos.index is not None and index < pos.index
    return (c.priority or 0) < pos.priority


@dataclass(frozen=True)
class _Finding:
    severity: Severity
    message: str
    fixable_below: int | None = None  # a classifier_priority lower than this fixes it


def _tcx_finding(c: Classifier) -> _Finding | None:
    if c.verdict.verdict_class is VerdictClass.TERMINAL:
        return _Finding(
            Severity.CRITICAL,
            f"{describe(c)} runs in tcx, before every clsact filter, and {_terminal_text(c)}: "
            "it hides Datadog's classifier whatever its priority",
        )
    if c.verdict.verdict_class is VerdictClass.UNKNOWN:
        return _Finding(
            Severity.WARNING,
            f"{describe(c)} runs in tcx before Datadog's classifier and tcprio could not prove "
            f"what it returns ({c.verdict.reason})",
        )
    return None


# Frames that carry the IPv4 / IPv6 packets Datadog's classifiers inspect: IPv4, IPv6 and VLAN
# tags (802.1Q, 802.1ad) as the device sees them. A filter for any other protocol (ARP, LLDP,
# MPLS...) is not run on those packets at all, so it cannot hide them.
IP_CARRYING_PROTOCOLS = frozenset({ETH_P_ALL, 0x0800, 0x86DD, 0x8100, 0x88A8})


def _other_traffic_finding(c: Classifier, pos: _Position) -> _Finding | None:
    """A clsact filter limited to a protocol that carries no IP packets: at most info."""
    if c.verdict.verdict_class is VerdictClass.TRANSPARENT:
        return None
    may = _terminal_text(c) if c.verdict.verdict_class is VerdictClass.TERMINAL else (
        "may end the chain (its verdict could not be proven)"
    )
    return _Finding(
        Severity.INFO,
        f"{describe(c)} at priority {c.priority or 0}, before Datadog's priority {pos.priority}, "
        f"{may}: it only sees {_protocol_name(c.protocol)} frames, so it hides only those from "
        "Datadog's classifier, which inspects IPv4 and IPv6 packets; nothing to change",
    )


def _clsact_finding(c: Classifier, pos: _Position) -> _Finding | None:
    if c.protocol not in IP_CARRYING_PROTOCOLS:
        return _other_traffic_finding(c, pos)
    prio = c.priority or 0
    if c.verdict.verdict_class is VerdictClass.UNKNOWN:
        return _Finding(
            Severity.WARNING,
            f"{describe(c)} at priority {prio} runs before Datadog's classifier (priority "
            f"{pos.priority}) and tcprio could not prove what it returns ({c.verdict.reason})",
        )
    if c.verdict.verdict_class is not VerdictClass.TERMINAL:
        return None
    same = prio == pos.priority
    order = (
        f"at the same priority {prio}, it comes first in the kernel's list (cls_bpf puts the "
        "filter added last at the head of a priority's list; a replace keeps the old place)"
        if same
        else f"at priority {prio}, before Datadog's priority {pos.priority}"
    )
    if prio <= 1:
        return _Finding(
            Severity.CRITICAL,
            f"{describe(c)} {_terminal_text(c)} {order}; no classifier_priority can run before "
            "priority 1, so Datadog's network detection cannot work on this hook",
        )
    return _Finding(
        Severity.ERROR,
        f"{describe(c)} {_terminal_text(c)} {order}: Datadog's classifier never sees those packets",
        fixable_below=prio,
    )


def _same_priority_finding(c: Classifier, prio: int) -> _Finding | None:
    """Datadog not attached yet: what happens when it adds its filter at a taken priority."""
    if c.kind != "bpf" or c.protocol != ETH_P_ALL:
        message = (
            f"{describe(c)} holds priority {prio} with kind {c.kind} and protocol "
            f"{_protocol_name(c.protocol)}: the kernel refuses Datadog's bpf filter (protocol "
            "all) at that priority, so it cannot attach on this hook"
        )
        return _Finding(Severity.ERROR, message, fixable_below=prio)
    if c.verdict.verdict_class is VerdictClass.TRANSPARENT:
        return None
    message = (
        f"{describe(c)} shares Datadog's priority {prio}: Datadog's filter, added later, goes "
        "to the head of the list and runs first, until this vendor re-adds its filter; then "
        f"it runs first and {_terminal_text(c)}"
    )
    return _Finding(Severity.WARNING, message, fixable_below=prio)


def _same_priority_findings(
    ordered: Sequence[Classifier], pos: _Position
) -> list[tuple[Classifier, _Finding]]:
    findings = []
    for c in ordered:
        if c.hook is not HookKind.CLSACT or c.chain != 0 or c.priority != pos.priority:
            continue
        finding = _same_priority_finding(c, pos.priority)
        if finding is not None:
            findings.append((c, finding))
    return findings


def _conflict(hook: HookClassifiers, c: Classifier, f: _Finding, pos: _Position) -> Conflict:
    return Conflict(
        namespace=hook.namespace,
        interface=hook.interface,
        direction=hook.direction,
        severity=f.severity,
        blocker=c,
        datadog_priority=pos.priority,
        datadog_attached=pos.attached,
        message=f.message,
        recommended_priority=None,
    )


def _protected(hook: HookClassifiers, ordered: Sequence[Classifier], target: DatadogTarget) -> bool:
    if any(c.is_datadog for c in ordered):
        return True
    return hook.direction in target.directions


def _position_notes(pos: _Position, target: DatadogTarget) -> tuple[str, ...]:
    if not pos.attached:
        return (f"Datadog's classifier is not attached here; assumed at priority {pos.priority}",)
    if pos.priority != target.priority:
        return (
            f"Datadog's classifier sits at priority {pos.priority} here, not at the configured "
            f"{target.priority}: the agent has not re-attached it since the setting changed",
        )
    return ()


def analyse_hook(hook: HookClassifiers, target: DatadogTarget) -> tuple[HookReport, list[int]]:
    """The hook's report, and the priorities below which Datadog would escape its blockers."""
    ordered = execution_order(hook.classifiers)
    pos = _datadog_position(ordered, target)
    report = HookReport(hook.namespace, hook.interface, hook.direction, ordered)
    if not _protected(hook, ordered, target):
        note = f"Datadog attaches no {hook.direction} classifier here (not enabled)"
        return replace(report, notes=(note,)), []
    found: list[tuple[Classifier, _Finding]] = []
    for index, c in enumerate(ordered):
        if not _runs_before(c, index, pos):
            continue
        finding = _tcx_finding(c) if c.hook is HookKind.TCX else _clsact_finding(c, pos)
        if finding is not None:
            found.append((c, finding))
    if not pos.attached:
        found.extend(_same_priority_findings(ordered, pos))
    conflicts = tuple(_conflict(hook, c, f, pos) for c, f in found)
    limits = [f.fixable_below for _, f in found if f.fixable_below is not None]
    return replace(report, conflicts=conflicts, notes=_position_notes(pos, target)), limits


def _taken_priorities(reports: Iterable[HookReport]) -> set[int]:
    taken = set()
    for report in reports:
        for c in report.classifiers:
            if c.hook is HookKind.CLSACT and c.chain == 0 and not c.is_datadog and c.priority:
                taken.add(c.priority)
    return taken


def recommend_priority(limits: Sequence[int], reports: Sequence[HookReport]) -> int | None:
    """The one classifier_priority that fixes every fixable conflict of the node at once.

    Strictly lower than the lowest blocking priority, and on a priority no hook already uses
    (a taken priority either refuses Datadog's filter or races with the vendor's re-adds).
    """
    if not limits:
        return None
    taken = _taken_priorities(reports)
    candidate = min(limits) - 1
    while candidate >= 1 and candidate in taken:
        candidate -= 1
    return candidate if candidate >= 1 else None


def _recommendation_note(limits: Sequence[int], recommended: int | None) -> str:
    if not limits:
        return ""
    if recommended is None:
        return (
            f"no classifier_priority fixes every conflict: the lowest blocking priority is "
            f"{min(limits)} and every priority below it is taken or impossible"
        )
    note = (
        f"set classifier_priority to {recommended}: strictly below the lowest blocking "
        f"priority ({min(limits)}) on this node, and used by no other filter"
    )
    if recommended == 1:
        note += (
            "; priority 1 is where CNIs such as Cilium <= 1.9 replace 'prio 1 handle 1' "
            "(the race behind Datadog moving its default to 10 in 7.39.2): check the CNI first"
        )
    return note


def _fixed_by_priority(c: Conflict) -> bool:
    """Errors, and terminal classifiers racing Datadog at its own priority."""
    if c.severity is Severity.ERROR:
        return True
    return (
        c.severity is Severity.WARNING and c.blocker.verdict.verdict_class is VerdictClass.TERMINAL
    )


def _downgrade(conflict: Conflict) -> Conflict:
    return replace(
        conflict,
        severity=Severity.INFO,
        message=conflict.message + " (Datadog network detection is disabled: nothing to do)",
    )


def analyse(hooks: Iterable[HookClassifiers], target: DatadogTarget) -> ScanResult:
    reports: list[HookReport] = []
    limits: list[int] = []
    for hook in hooks:
        report, hook_limits = analyse_hook(hook, target)
        reports.append(report)
        limits.extend(hook_limits)
    recommended = recommend_priority(limits, reports) if target.enabled else None
    result = ScanResult(
        recommended_priority=recommended,
        recommendation_note=_recommendation_note(limits, recommended) if target.enabled else "",
    )
    for report in reports:
        conflicts = tuple(
            replace(c, recommended_priority=recommended) if _fixed_by_priority(c) else c
            for c in report.conflicts
        )
        if not target.enabled:
            conflicts = tuple(_downgrade(c) for c in conflicts)
        result.hooks.append(replace(report, conflicts=conflicts))
        result.conflicts.extend(conflicts)
    result.conflicts.sort(key=severity_rank)
    if not target.enabled:
        result.notes.append("Datadog network detection is disabled: no conflict can hurt it")
    return result
