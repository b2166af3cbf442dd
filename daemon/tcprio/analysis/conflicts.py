"""Which classifiers stand in front of Datadog's, and what to change. Pure: data in, findings out.

On one hook (interface + direction) a packet meets the tcx programs first, in their order, then
the clsact filters of chain 0 by priority, and within one priority in the kernel's list order.
On an ingress hook fed by a netkit device, the programs of the netkit chain that delivers the
packet run before all of them, and a device's XDP programs run on receive before its tcx and
clsact ingress (after the netkit chain that sends it). Every classifier that sees the packet
before Datadog's and may end the chain is a conflict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from tcprio.model import (
    ETH_P_ALL,
    Classifier,
    Conflict,
    DatadogPresence,
    Direction,
    HookKind,
    HookReport,
    PresenceState,
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
    enabled: bool = True  # its detection runs (or is assumed to): conflicts keep their severity
    directions: frozenset[Direction] = frozenset(Direction)
    # Why it runs or not (`analysis/datadog_presence.py`); None: as `enabled` says.
    presence: DatadogPresence | None = None

    @property
    def state(self) -> PresenceState:
        if self.presence is not None:
            return self.presence.state
        return PresenceState.ASSUMED if self.enabled else PresenceState.DISABLED

    @property
    def advises(self) -> bool:
        """A recommendation is shown: detection runs, or may run later (not turned off)."""
        return self.enabled or self.state is not PresenceState.DISABLED


def execution_order(classifiers: Iterable[Classifier]) -> tuple[Classifier, ...]:
    """netkit first, then XDP (ingress), then tcx in link order, then clsact chain 0 by
    (priority, list order), then other chains.

    Filters in chains other than 0 only run when an action jumps there; they come last.
    """

    def key(c: Classifier) -> tuple[int, int, int, int]:
        if c.hook is HookKind.NETKIT:
            return (-1, 0, 0, c.position)
        if c.hook is HookKind.XDP:
            return (-1, 1, 0, c.position)
        if c.hook is HookKind.TCX:
            return (0, 0, 0, c.position)
        if c.chain == 0:
            return (1, 0, c.priority or 0, c.position)
        return (2, c.chain, c.priority or 0, c.position)

    return tuple(sorted(classifiers, key=key))


def protocol_name(protocol: int) -> str:
    names = {
        ETH_P_ALL: "all", 0x0800: "ip", 0x86DD: "ipv6", 0x0806: "arp", 0x8100: "802.1q",
        0x88A8: "802.1ad",
    }  # fmt: skip
    return names.get(protocol, f"0x{protocol:04x}")


def describe(c: Classifier) -> str:
    vendor = f"{c.vendor} " if c.vendor else ""
    ident = f" (prog {c.prog_id})" if c.prog_id is not None else ""
    block = f" on shared block {c.block}" if c.block is not None else ""
    return f"{vendor}{c.kind} classifier '{c.name}'{ident}{block}"


def terminal_text(c: Classifier) -> str:
    actions = ", ".join(c.verdict.terminal_actions) or "a terminal verdict"
    scope = ""
    if c.hook is HookKind.CLSACT and c.protocol != ETH_P_ALL:
        scope = f" for protocol {protocol_name(c.protocol)} packets"
    return f"may return {actions}{scope}"


@dataclass(frozen=True)
class _Position:
    """Where Datadog's classifier sits (or would sit) on a hook."""

    priority: int
    attached: bool
    index: int | None  # its index in execution order when attached


def is_raw_packet(c: Classifier) -> bool:
    """Datadog's raw-packet classifier (`classifier_raw_packet_*`, cut by the kernel to
    `classifier_raw_`): it runs beside the main one, at the same priority, and is judged like any
    other program (its filter programs returned TC_ACT_OK before agent PR 38078)."""
    names = (c.name, c.filter_name or "")
    return c.is_datadog and any(n.startswith("classifier_raw") for n in names)


def _datadog_position(ordered: Sequence[Classifier], target: DatadogTarget) -> _Position:
    """Where Datadog's main classifier (the one network detection needs) sits; its raw-packet
    classifier stands for it only when the main one is not attached."""
    ours = [
        (index, c)
        for index, c in enumerate(ordered)
        if c.is_datadog and c.hook is HookKind.CLSACT and c.chain == 0
    ]
    main = [(index, c) for index, c in ours if not is_raw_packet(c)] or ours
    if main:
        index, c = main[0]
        return _Position(priority=c.priority or target.priority, attached=True, index=index)
    return _Position(priority=target.priority, attached=False, index=None)


def _runs_before(c: Classifier, index: int, pos: _Position) -> bool:
    if c.is_datadog and not is_raw_packet(c):
        return False
    if c.hook in EARLY_HOOKS:
        return True
    if c.chain != 0:
        return False
    if pos.attached:
        return pos.index is not None and index < pos.index
    return (c.priority or 0) < pos.priority


EARLY_HOOKS = frozenset({HookKind.TCX, HookKind.NETKIT, HookKind.XDP})  # before every filter


@dataclass(frozen=True)
class _Finding:
    severity: Severity
    message: str
    fixable_below: int | None = None  # a classifier_priority lower than this fixes it


def _early_finding(c: Classifier) -> _Finding | None:
    """A tcx, netkit or XDP program: it runs before every clsact filter, whatever their
    priority."""
    if c.hook is HookKind.XDP:
        where = f"runs in XDP ({c.xdp_mode} mode), before every tcx and clsact program here,"
        short = f"runs in XDP ({c.xdp_mode} mode)"
    elif c.hook is HookKind.NETKIT:
        where = f"runs in the netkit {c.netkit_chain}, before every tcx and clsact program here,"
        short = f"runs in the netkit {c.netkit_chain}"
    else:
        where, short = "runs in tcx, before every clsact filter,", "runs in tcx"
    if c.verdict.verdict_class is VerdictClass.TERMINAL:
        return _Finding(
            Severity.CRITICAL,
            f"{describe(c)} {where} and {terminal_text(c)}: "
            "it hides Datadog's classifier whatever its priority",
        )
    if c.verdict.verdict_class is VerdictClass.UNKNOWN:
        return _Finding(
            Severity.WARNING,
            f"{describe(c)} {short} before Datadog's classifier and tcprio could not prove "
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
    may = terminal_text(c) if c.verdict.verdict_class is VerdictClass.TERMINAL else (
        "may end the chain (its verdict could not be proven)"
    )
    return _Finding(
        Severity.INFO,
        f"{describe(c)} at priority {c.priority or 0}, before Datadog's priority {pos.priority}, "
        f"{may}: it only sees {protocol_name(c.protocol)} frames, so it hides only those from "
        "Datadog's classifier, which inspects IPv4 and IPv6 packets; nothing to change",
    )


def _raw_packet_finding(c: Classifier) -> _Finding | None:
    """Datadog's own raw-packet classifier before its main one: no priority separates them (both
    go at classifier_priority), so the fix is the agent's, never a priority."""
    if c.verdict.verdict_class is VerdictClass.TRANSPARENT:
        return None
    if c.verdict.verdict_class is VerdictClass.UNKNOWN:
        return _Finding(
            Severity.WARNING,
            f"{describe(c)}, Datadog's own raw-packet classifier, runs before its main "
            f"classifier and tcprio could not prove what it returns ({c.verdict.reason})",
        )
    return _Finding(
        Severity.ERROR,
        f"{describe(c)}, Datadog's own raw-packet classifier, {terminal_text(c)} before its "
        "main classifier at the same priority: Datadog's network detection never sees those "
        "packets, and no classifier_priority separates the two",
    )


def _clsact_finding(c: Classifier, pos: _Position) -> _Finding | None:
    if is_raw_packet(c):
        return _raw_packet_finding(c)
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
            f"{describe(c)} {terminal_text(c)} {order}; no classifier_priority can run before "
            "priority 1, so Datadog's network detection cannot work on this hook",
        )
    return _Finding(
        Severity.ERROR,
        f"{describe(c)} {terminal_text(c)} {order}: Datadog's classifier never sees those packets",
        fixable_below=prio,
    )


def _same_priority_finding(c: Classifier, prio: int) -> _Finding | None:
    """Datadog not attached yet: what happens when it adds its filter at a taken priority."""
    if c.kind != "bpf" or c.protocol != ETH_P_ALL:
        message = (
            f"{describe(c)} holds priority {prio} with kind {c.kind} and protocol "
            f"{protocol_name(c.protocol)}: the kernel refuses Datadog's bpf filter (protocol "
            "all) at that priority, so it cannot attach on this hook"
        )
        return _Finding(Severity.ERROR, message, fixable_below=prio)
    if c.verdict.verdict_class is VerdictClass.TRANSPARENT:
        return None
    message = (
        f"{describe(c)} shares Datadog's priority {prio}: Datadog's filter, added later, goes "
        "to the head of the list and runs first, until this vendor re-adds its filter; then "
        f"it runs first and {terminal_text(c)}"
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


def _latent_limits(
    ordered: Sequence[Classifier], pos: _Position, target: DatadogTarget
) -> list[int]:
    """Datadog's classifier still sits at an older, lower priority here: terminal filters it
    runs before today, but that will run before it once it re-attaches at the configured one.
    A recommendation must stay below them too, or it creates a conflict on this hook."""
    if not pos.attached or pos.priority >= target.priority:
        return []
    return [
        c.priority
        for c in ordered
        if c.hook is HookKind.CLSACT
        and c.chain == 0
        and not c.is_datadog
        and c.priority is not None
        and pos.priority < c.priority <= target.priority
        and c.protocol in IP_CARRYING_PROTOCOLS
        and c.verdict.verdict_class is VerdictClass.TERMINAL
    ]


def analyse_hook(
    hook: HookClassifiers, target: DatadogTarget
) -> tuple[HookReport, list[int], list[int]]:
    """The hook's report, the priorities below which Datadog would escape its blockers, and
    those a recommendation must also stay below (see _latent_limits)."""
    ordered = execution_order(hook.classifiers)
    pos = _datadog_position(ordered, target)
    report = HookReport(hook.namespace, hook.interface, hook.direction, ordered)
    if not _protected(hook, ordered, target):
        note = f"Datadog attaches no {hook.direction} classifier here (not enabled)"
        return replace(report, notes=(note,)), [], []
    found: list[tuple[Classifier, _Finding]] = []
    for index, c in enumerate(ordered):
        if not _runs_before(c, index, pos):
            continue
        early = c.hook in EARLY_HOOKS
        finding = _early_finding(c) if early else _clsact_finding(c, pos)
        if finding is not None:
            found.append((c, finding))
    if not pos.attached:
        found.extend(_same_priority_findings(ordered, pos))
    conflicts = tuple(_conflict(hook, c, f, pos) for c, f in found)
    limits = [f.fixable_below for _, f in found if f.fixable_below is not None]
    notes = _position_notes(pos, target)
    return replace(report, conflicts=conflicts, notes=notes), limits, _latent_limits(
        ordered, pos, target
    )


def _taken_priorities(reports: Iterable[HookReport]) -> dict[int, list[Classifier]]:
    """Priority -> the other filters that hold it on some hook (chain 0)."""
    taken: dict[int, list[Classifier]] = {}
    for report in reports:
        for c in report.classifiers:
            if c.hook is HookKind.CLSACT and c.chain == 0 and not c.is_datadog and c.priority:
                taken.setdefault(c.priority, []).append(c)
    return taken


def _shareable(c: Classifier) -> bool:
    """Datadog's filter can share a priority with this one and still see every packet: the
    kernel accepts a second bpf filter of protocol all there, and this one lets packets on."""
    return (
        c.kind == "bpf"
        and c.protocol == ETH_P_ALL
        and c.verdict.verdict_class is VerdictClass.TRANSPARENT
    )


@dataclass(frozen=True)
class Recommendation:
    priority: int | None
    shared_with: tuple[Classifier, ...] = ()  # transparent filters already at that priority


def recommend_priority(
    limits: Sequence[int], reports: Sequence[HookReport], latent: Sequence[int] = ()
) -> Recommendation:
    """The one classifier_priority that fixes every fixable conflict of the node at once.

    Strictly lower than the lowest blocking priority (and than the terminal filters Datadog
    will meet once it re-attaches at the configured priority). Best on a priority no hook
    uses; else on one held only by transparent bpf filters of protocol all (it works, with a
    risk to say); never on one held by anything else (the kernel refuses Datadog's filter there,
    or races it with the vendor's re-adds).
    """
    if not limits:
        return Recommendation(None)
    taken = _taken_priorities(reports)
    shared: Recommendation | None = None
    for candidate in range(min([*limits, *latent]) - 1, 0, -1):
        holders = taken.get(candidate)
        if not holders:
            return Recommendation(candidate)
        if shared is None and all(_shareable(c) for c in holders):
            shared = Recommendation(candidate, tuple(holders))
    return shared or Recommendation(None)


def _recommendation_note(limits: Sequence[int], recommended: Recommendation) -> str:
    if not limits:
        return ""
    if recommended.priority is None:
        return (
            f"no classifier_priority fixes every conflict: the lowest blocking priority is "
            f"{min(limits)} and every priority below it is held by a filter Datadog's cannot "
            "share it with"
        )
    if recommended.shared_with:
        names = ", ".join(sorted({describe(c) for c in recommended.shared_with}))
        note = (
            f"set classifier_priority to {recommended.priority}: strictly below the lowest "
            f"blocking priority ({min(limits)}) on this node; no priority there is free, and "
            f"this one is shared only with transparent filters ({names}), so Datadog's "
            "classifier still sees every packet; risk: a vendor that deletes its filter by "
            "priority also deletes Datadog's"
        )
    else:
        note = (
            f"set classifier_priority to {recommended.priority}: strictly below the lowest "
            f"blocking priority ({min(limits)}) on this node, and used by no other filter"
        )
    if recommended.priority == 1:
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


DISABLED_SUFFIX = " (Datadog network detection is disabled: nothing to do)"
NOT_RUNNING_SUFFIX = (
    " (would hide Datadog's classifier once network detection runs; it does not run here)"
)


def _downgrade(conflict: Conflict, target: DatadogTarget) -> Conflict:
    suffix = NOT_RUNNING_SUFFIX if target.advises else DISABLED_SUFFIX
    return replace(conflict, severity=Severity.INFO, message=conflict.message + suffix)


def _inactive_note(target: DatadogTarget) -> str:
    if not target.advises:
        return "Datadog network detection is disabled: no conflict can hurt it"
    return (
        f"Datadog network detection is not active here ({target.state}): every conflict is "
        "info, and would hide Datadog's classifier once network detection runs"
    )


def analyse(hooks: Iterable[HookClassifiers], target: DatadogTarget) -> ScanResult:
    reports: list[HookReport] = []
    limits: list[int] = []
    latent: list[int] = []
    for hook in hooks:
        report, hook_limits, hook_latent = analyse_hook(hook, target)
        reports.append(report)
        limits.extend(hook_limits)
        latent.extend(hook_latent)
    recommendation = recommend_priority(limits, reports, latent)
    recommended = recommendation.priority if target.advises else None
    result = ScanResult(
        recommended_priority=recommended,
        recommendation_note=(
            _recommendation_note(limits, recommendation) if target.advises else ""
        ),
        datadog_presence=target.presence or DatadogPresence(target.state, ("from the target",)),
    )
    for report in reports:
        conflicts = tuple(
            replace(c, recommended_priority=recommended) if _fixed_by_priority(c) else c
            for c in report.conflicts
        )
        if not target.enabled:
            conflicts = tuple(_downgrade(c, target) for c in conflicts)
        result.hooks.append(replace(report, conflicts=conflicts))
        result.conflicts.extend(conflicts)
    result.conflicts.sort(key=severity_rank)
    if not target.enabled:
        result.notes.append(_inactive_note(target))
    return result
