"""Turn a scan into what people and scripts read: the text report and the versioned JSON."""

from __future__ import annotations

import platform
import socket
import textwrap
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from tcprio import __version__
from tcprio.analysis import groups as grouping
from tcprio.analysis.groups import Group, PlaceInfo
from tcprio.analysis.remedies import (
    RESTART_HOST,
    RESTART_KUBERNETES,
    RESTART_OPERATOR,
    restart_instructions,
)
from tcprio.analysis.verdicts import explain
from tcprio.model import (
    Classifier,
    Conflict,
    DatadogPresence,
    DatadogSettings,
    HookKind,
    HookReport,
    Interface,
    NamespaceInventory,
    NetNamespace,
    PresenceState,
    ProgramInfo,
    ProgramVerdicts,
    Remedy,
    Setting,
    Severity,
    Shadowing,
    ShadowKind,
    VerdictClass,
)
from tcprio.scan import Scan

SCHEMA_NAME = "tcprio.scan"
SCHEMA_VERSION = 1

EXIT_OK, EXIT_FIXABLE, EXIT_CRITICAL, EXIT_FAILED = 0, 1, 2, 3


FAILING = {
    "critical": (Severity.CRITICAL,),
    "error": (Severity.CRITICAL, Severity.ERROR),
    "warning": (Severity.CRITICAL, Severity.ERROR, Severity.WARNING),
}


def exit_status(scan: Scan, fail_on: str = "error") -> int:
    """2 for a critical conflict, 1 for a fixable one, 0 otherwise; `fail_on` (critical, error,
    warning): the least severe conflict that counts."""
    severities = {c.severity for c in scan.result.conflicts} & set(FAILING[fail_on])
    if Severity.CRITICAL in severities:
        return EXIT_CRITICAL
    if severities:
        return EXIT_FIXABLE
    return EXIT_OK


# --- JSON ------------------------------------------------------------------------------------


def _setting(s: Setting | None) -> dict[str, Any] | None:
    return None if s is None else {"value": s.value, "source": s.source}


def classifier_json(c: Classifier) -> dict[str, Any]:
    return {
        "hook": str(c.hook),
        "position": c.position,
        "priority": c.priority,
        "handle": c.handle,
        "chain": c.chain,
        "kind": c.kind,
        "protocol": c.protocol,
        "direct_action": c.direct_action,
        "filter_name": c.filter_name,
        "prog_id": c.prog_id,
        "link_id": c.link_id,
        "name": c.name,
        "vendor": c.vendor,
        "is_datadog": c.is_datadog,
        "vendor_evidence": c.vendor_evidence,
        "verdict_class": str(c.verdict.verdict_class),
        "terminal_actions": list(c.verdict.terminal_actions),
        "verdict_reason": c.verdict.reason,
        **({"netkit_chain": c.netkit_chain} if c.netkit_chain else {}),
        **({"xdp_mode": c.xdp_mode} if c.xdp_mode else {}),
    }


def _remedy_json(r: Remedy) -> dict[str, Any]:
    return {
        "summary": r.summary,
        "system_probe_yaml": r.system_probe_yaml,
        "helm_values": r.helm_values,
        "environment": r.environment,
        "operator_values": r.operator_values,
        "extra": list(r.extra),
    }


def conflict_json(c: Conflict) -> dict[str, Any]:
    return {
        "namespace": c.namespace,
        "interface": c.interface,
        "direction": str(c.direction),
        "severity": str(c.severity),
        "message": c.message,
        "blocker": classifier_json(c.blocker),
        "blocker_priority": c.blocker.priority,
        "blocker_hook": str(c.blocker.hook),
        "datadog_priority": c.datadog_priority,
        "datadog_attached": c.datadog_attached,
        "recommended_classifier_priority": c.recommended_priority,
        "remedies": [_remedy_json(r) for r in c.remedies],
    }


def shadowing_json(s: Shadowing) -> dict[str, Any]:
    return {
        "namespace": s.namespace,
        "interface": s.interface,
        "direction": str(s.direction),
        "kind": str(s.kind),
        "severity": str(s.severity),
        "message": s.message,
        "hidden": classifier_json(s.hidden),
        "hidden_label": s.hidden_label,
        "blocker": classifier_json(s.blocker),
        "other_blockers": s.other_blockers,
    }


def _hook_reports(scan: Scan) -> dict[tuple[str, str, str], HookReport]:
    return {(h.namespace, h.interface, str(h.direction)): h for h in scan.result.hooks}


def _peer_json(interface: Interface, peer: NetNamespace | None) -> dict[str, Any]:
    """A veth's other end, and for a host-side one the namespace (and pod) it is in."""
    if interface.kind != "veth":
        return {}
    found: dict[str, Any] = {
        "peer_ifindex": interface.peer_ifindex,
        "peer_netnsid": interface.peer_netnsid,
    }
    if peer is not None:
        found["peer_namespace"] = peer.name
        found["peer_pod"] = _pod_label(peer)
    return found


def _pod_label(ns: NetNamespace) -> str | None:
    if not ns.pod:
        return None
    return f"{ns.pod_namespace}/{ns.pod}" if ns.pod_namespace else ns.pod


def _interface_json(
    ns_name: str, interface: Interface, reports: dict, peer: NetNamespace | None = None
) -> dict[str, Any]:
    hooks = []
    for hook in interface.hooks:
        report = reports.get((ns_name, interface.name, str(hook.direction)))
        hooks.append(
            {
                "direction": str(hook.direction),
                "qdisc": hook.qdisc,
                "error": hook.error,
                "classifiers": [classifier_json(c) for c in report.classifiers] if report else [],
                "notes": list(report.notes) if report else [],
            }
        )
    found = {
        "name": interface.name,
        "ifindex": interface.ifindex,
        "kind": interface.kind,
        **_peer_json(interface, peer),
        "hooks": hooks,
    }
    if interface.netkit is not None:
        nk = interface.netkit
        found["netkit"] = {
            "primary": nk.primary, "peer_ifindex": nk.peer_ifindex,
            "peer_netnsid": nk.peer_netnsid, "mode": nk.mode, "policy": nk.policy,
            "peer_policy": nk.peer_policy, "error": nk.error,
        }  # fmt: skip
    if interface.xdp:
        found["xdp"] = [{"prog_id": x.prog_id, "mode": x.mode} for x in interface.xdp]
    return found


def _namespace_json(
    inv: NamespaceInventory, reports: dict, peers: dict | None = None
) -> dict[str, Any]:
    ns = inv.namespace
    return {
        "name": ns.name,
        "inode": ns.inode,
        "source": ns.source,
        "path": ns.path,
        "pid": ns.pid,
        "container": ns.container,
        "pod": ns.pod,
        "pod_namespace": ns.pod_namespace,
        "pod_uid": ns.pod_uid,
        "netns": ns.netns,
        "named_by": ns.named_by,
        "error": inv.error,
        "interfaces": [
            _interface_json(ns.name, i, reports, (peers or {}).get((ns.key, i.ifindex)))
            for i in inv.interfaces
        ],
    }


def _program_json(info: ProgramInfo, verdicts: ProgramVerdicts | None) -> dict[str, Any]:
    verdict = None
    if verdicts is not None:
        verdict = {
            "values": None if verdicts.values is None else sorted(verdicts.values),
            "exits": [
                {
                    "prog_id": e.prog_id,
                    "pc": e.pc,
                    "values": None if e.values is None else sorted(e.values),
                    "note": e.note,
                    **({"may_return": sorted(e.may_return)} if e.may_return else {}),
                }
                for e in verdicts.exits
            ],
            "unknown_reasons": list(verdicts.unknown_reasons),
        }
    return {
        "id": info.id,
        "name": info.name,
        "tag": info.tag,
        "type": info.type_name,
        "load_time_ns": info.load_time_ns,
        "map_ids": list(info.map_ids),
        "insn_count": None if info.insns is None else len(info.insns),
        "error": info.error,
        "verdict": verdict,
    }


def datadog_json(dd: DatadogSettings, presence: DatadogPresence | None = None) -> dict[str, Any]:
    """The effective Datadog network settings, each with its value and source; with
    `presence`, whether its network detection runs on the node and the evidence."""
    state = {"state": str(presence.state), "evidence": list(presence.evidence)} if presence else {}
    return {
        **state,
        "network_enabled": _setting(dd.enabled),
        "classifier_priority": _setting(dd.classifier_priority),
        "classifier_handle": _setting(dd.classifier_handle),
        "ingress_enabled": _setting(dd.ingress_enabled),
        "raw_packet_enabled": _setting(dd.raw_packet_enabled),
        "raw_classifier_handle": _setting(dd.raw_classifier_handle),
        "agent_version": dd.agent_version,
        "agent_version_source": dd.agent_version_source,
        "notes": list(dd.notes),
        "errors": list(dd.errors),
    }


def _summary(scan: Scan) -> dict[str, Any]:
    counts = Counter(str(c.severity) for c in scan.result.conflicts)
    return {
        "namespaces": len(scan.inventories),
        "interfaces": sum(len(inv.interfaces) for inv in scan.inventories),
        "classifiers": sum(len(h.classifiers) for h in scan.result.hooks),
        "conflicts": {str(s): counts.get(str(s), 0) for s in Severity},
        "shadowed": _shadowed_counts(scan.result.shadowings),
    }


def _shadowed_counts(shadowings: Iterable[Shadowing]) -> dict[str, int]:
    counts = Counter(str(s.kind) for s in shadowings)
    return {str(k): counts.get(str(k), 0) for k in ShadowKind}


def place_info(scan: Scan) -> PlaceInfo:
    """(namespace, interface) -> (the pod it belongs to or leads to, the namespace behind a
    veth when that is not a pod)."""
    found: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    for inv in scan.inventories:
        own = _pod_label(inv.namespace)
        for interface in inv.interfaces:
            peer = scan.peers.get((inv.namespace.key, interface.ifindex))
            pod = own or (_pod_label(peer) if peer is not None else None)
            behind = peer.name if peer is not None and not pod else None
            if pod or behind:
                found[(inv.namespace.name, interface.name)] = (pod, behind)
    return found


def _group_json(g: Group, remedy_index: dict[Remedy, int]) -> dict[str, Any]:
    return {
        "severity": str(g.severity),
        "blocker": g.blocker,
        "hook": g.hook,
        "priority": g.priority,
        **({"kind": str(g.kind), "hidden": g.hidden} if g.kind else {}),
        "programs": list(g.programs),
        "verdicts": list(g.verdicts),
        "hooks": g.hooks,
        "interfaces": g.interfaces,
        "pods": g.pods,
        "other_namespaces": g.other_namespaces,
        "examples": g.examples(),
        "message": g.message,
        "recommended_classifier_priority": g.recommended_priority,
        "remedies": [remedy_index[r] for r in g.remedies if r in remedy_index],
    }


def groups_json(scan: Scan, info: PlaceInfo | None = None) -> dict[str, Any]:
    """The conflicts and hidden classifiers grouped by cause, and the distinct remedies in the
    order to try them (groups name them by index)."""
    info = place_info(scan) if info is None else info
    conflicts = grouping.conflict_groups(scan.result.conflicts, info)
    remedies = grouping.ordered_remedies(conflicts)
    index = {r: i for i, r in enumerate(remedies)}
    return {
        "conflicts": [_group_json(g, index) for g in conflicts],
        "shadowed": [
            _group_json(g, index)
            for g in grouping.shadowing_groups(scan.result.shadowings, info)
        ],
        "remedies": [_remedy_json(r) for r in remedies],
    }


def scan_json(scan: Scan, fail_on: str = "error") -> dict[str, Any]:
    reports = _hook_reports(scan)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "tcprio_version": __version__,
        "node": socket.gethostname(),
        "kernel": platform.release(),
        "scanned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_seconds": round(scan.duration_s, 6),
        "exit_status": exit_status(scan, fail_on),
        "summary": _summary(scan),
        "groups": groups_json(scan),
        "datadog": datadog_json(scan.datadog, scan.result.datadog_presence),
        "recommended_classifier_priority": scan.result.recommended_priority,
        "recommendation": scan.result.recommendation_note,
        "notes": list(scan.result.notes),
        "conflicts": [conflict_json(c) for c in scan.result.conflicts],
        "shadowed": [shadowing_json(s) for s in scan.result.shadowings],
        "namespaces": [_namespace_json(inv, reports, scan.peers) for inv in scan.inventories],
        "programs": {
            str(pid): _program_json(info, scan.verdicts.get(pid))
            for pid, info in sorted(scan.catalogue.programs.items())
        },
        "vanished_namespaces": list(scan.vanished),
        "versions": {
            vendor: {"version": v.version, "source": v.source}
            for vendor, v in sorted(scan.versions.items())
        },
        "errors": list(scan.errors) + sorted(scan.catalogue.errors.values()),
    }


# --- text ------------------------------------------------------------------------------------


class Style:
    """ANSI highlighting, or nothing when the output is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text

    def severity(self, severity: Severity) -> str:
        codes = {Severity.CRITICAL: "1;31", Severity.ERROR: "31", Severity.WARNING: "33"}
        return self._wrap(codes.get(severity, "2"), severity.upper())

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)


def _verdict_text(c: Classifier) -> str:
    if c.verdict.verdict_class is VerdictClass.TERMINAL:
        return "terminal: " + ", ".join(c.verdict.terminal_actions)
    return str(c.verdict.verdict_class)


def classifier_line(c: Classifier) -> str:
    if c.hook is HookKind.XDP:
        where = f"xdp {c.xdp_mode} #{c.position}"
    elif c.hook is HookKind.NETKIT:
        where = f"netkit #{c.position}" + (f" link {c.link_id}" if c.link_id else "")
    elif c.hook is HookKind.TCX:
        where = f"tcx #{c.position}" + (f" link {c.link_id}" if c.link_id else "")
    else:
        chain = f" chain {c.chain}" if c.chain else ""
        where = f"prio {c.priority} handle {c.handle:#x}{chain}"
    flags = ""
    if c.hook is HookKind.CLSACT and c.kind == "bpf":
        flags = " da" if c.direct_action else " classid"
    prog = f" prog {c.prog_id}" if c.prog_id is not None else ""
    vendor = f" [{c.vendor}]" if c.vendor else ""
    chain = f" ({c.netkit_chain})" if c.netkit_chain else ""
    return f"{where:<24} {c.kind}{flags} '{c.name}'{prog}{vendor}{chain}  {_verdict_text(c)}"


def _yaml_value(value: object) -> str:
    """A value as YAML writes it: true / false, not Python's True / False."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _setting_line(label: str, s: Setting | None) -> str:
    if s is None:
        return f"  {label}: (unknown)"
    return f"  {label}: {_yaml_value(s.value)}  ({s.source})"


def _datadog_lines(scan: Scan) -> list[str]:
    dd = scan.datadog
    lines = ["Datadog Workload Protection network settings:"]
    presence = scan.result.datadog_presence
    lines.append(f"  network detection on this node: {presence.state}")
    lines += [f"  evidence: {line}" for line in presence.evidence]
    lines.append(_setting_line("network.enabled", dd.enabled))
    lines.append(_setting_line("network.classifier_priority", dd.classifier_priority))
    lines.append(_setting_line("network.classifier_handle", dd.classifier_handle))
    if dd.ingress_enabled is not None:
        lines.append(_setting_line("network.ingress.enabled", dd.ingress_enabled))
    if dd.raw_packet_enabled is not None:
        lines.append(_setting_line("network.raw_packet.enabled", dd.raw_packet_enabled))
    if dd.raw_classifier_handle is not None:
        lines.append(_setting_line("network.raw_classifier_handle", dd.raw_classifier_handle))
    if dd.agent_version:
        lines.append(f"  agent version: {dd.agent_version}  ({dd.agent_version_source})")
    lines += [f"  note: {n}" for n in dd.notes]
    lines += [f"  bad input ignored: {e}" for e in dd.errors]
    return lines


PRESENCE_WORDS = {
    PresenceState.ACTIVE: "active",
    PresenceState.ASSUMED: "assumed active",
    PresenceState.DISABLED: "disabled (conflicts are info)",
    PresenceState.CONFIGURED: "configured but not running (conflicts are info)",
    PresenceState.ABSENT: "absent (conflicts are info)",
}


def _presence_line(presence: DatadogPresence) -> str:
    main = presence.evidence[0] if presence.evidence else "no evidence"
    return f"Datadog network detection: {PRESENCE_WORDS[presence.state]}: {main}"


def _indented(text: str, indent: str) -> list[str]:
    return [f"{indent}{line}" for line in text.splitlines() if line.strip()]


def _remedy_lines(label: str, r: Remedy, indent: str) -> list[str]:
    lines = [f"{indent}[{label}] {r.summary}"]
    for title, text in (
        ("system-probe.yaml", r.system_probe_yaml),
        ("Helm values", r.helm_values),
        ("Datadog Operator", r.operator_values),
        ("environment", r.environment),
    ):
        if text:
            lines.append(f"{indent}    {title}:")
            lines += _indented(text, f"{indent}      ")
    for extra in r.extra:
        if extra not in RESTARTS:  # said once, after every remedy
            lines += _indented(extra, f"{indent}    ")
    return lines


RESTARTS = frozenset(restart_instructions())


def _remedy_labels(conflicts: Iterable[Conflict]) -> dict[Remedy, str]:
    """One label per distinct remedy (many conflicts share a fix), the everyday fix first
    and disabling last."""
    found: list[Remedy] = []
    for conflict in conflicts:
        found += [r for r in conflict.remedies if r not in found]
    return {r: str(i) for i, r in enumerate(sorted(found, key=grouping.remedy_rank), 1)}


def _conflict_lines(scan: Scan, style: Style) -> list[str]:
    conflicts = scan.result.conflicts
    if not conflicts:
        return ["No conflict: nothing runs before Datadog's classifier that could hide packets."]
    counts = Counter(c.severity for c in conflicts)
    summary = ", ".join(f"{counts[s]} {s}" for s in Severity if counts[s])
    labels = _remedy_labels(conflicts)
    lines = [style.bold(f"CONFLICTS ({summary})")]
    for c in conflicts:
        where = f"{c.namespace} / {c.interface} {c.direction}"
        lines.append(f"  {style.severity(c.severity)} {where}: {c.message}")
        if c.remedies:
            fixes = ", or ".join(f"[{labels[r]}]" for r in c.remedies)
            lines.append(f"      fix: {fixes}")
    if scan.result.recommendation_note:
        lines += ["", style.bold("RECOMMENDATION"), f"  {scan.result.recommendation_note}"]
    if labels:
        lines += ["", style.bold("HOW TO FIX")]
        for remedy, label in labels.items():
            lines += _remedy_lines(label, remedy, "  ")
        if any(set(r.extra) & RESTARTS for r in labels):
            lines.append("  after a change to Datadog's configuration, restart it:")
            lines += [f"    {line}" for line in restart_instructions()]
    return lines


KIND_TEXT = {
    ShadowKind.POLICY_BYPASS: "policy bypass",
    ShadowKind.OBSERVER_HIDDEN: "observer hidden",
    ShadowKind.HIDDEN: "hidden",
}


def _shadowing_lines(scan: Scan, style: Style) -> list[str]:
    """Every other classifier hidden: one line each, who hides it and how."""
    found = scan.result.shadowings
    if not found:
        return ["No other classifier is hidden by one before it."]
    counts = Counter(s.kind for s in found)
    summary = ", ".join(f"{counts[k]} {KIND_TEXT[k]}" for k in KIND_TEXT if counts[k])
    lines = [style.bold(f"HIDDEN CLASSIFIERS ({summary})")]
    for s in found:
        where = f"{s.namespace} / {s.interface} {s.direction}"
        lines.append(f"  {style.severity(s.severity)} {where} [{KIND_TEXT[s.kind]}]: {s.message}")
    return lines


def _place(c: Classifier) -> tuple[str, int]:
    return (str(c.hook), c.position)


def _hook_lines(
    report: HookReport, style: Style, explain_terminal: bool, scan: Scan,
    hidden: dict[tuple[str, int], ShadowKind], peers: dict[tuple[str, str], str] | None = None,
) -> list[str]:  # fmt: skip
    blockers = {_place(c.blocker): c.severity for c in report.conflicts}
    peer = (peers or {}).get((report.namespace, report.interface))
    behind = f"  (peer in {peer})" if peer else ""
    lines = [f"  {report.interface} {report.direction}{behind}"]
    for c in report.classifiers:
        mark = ""
        if _place(c) in blockers:
            mark = "  <- " + style.severity(blockers[_place(c)])
        elif c.is_datadog:
            mark = "  <- Datadog"
        elif _place(c) in hidden:
            mark = f"  <- {KIND_TEXT[hidden[_place(c)]]}"
        lines.append(f"    {classifier_line(c)}{mark}")
        if explain_terminal and c.vendor_evidence:
            lines.append(f"        {c.vendor} by {c.vendor_evidence}")
        if explain_terminal and c.prog_id in scan.verdicts:
            lines += [f"        {line}" for line in explain(scan.verdicts[c.prog_id])]
    lines += [style.dim(f"    note: {n}") for n in report.notes]
    return lines


HiddenByHook = dict[tuple[str, str, str], dict[tuple[str, int], ShadowKind]]


def _hidden_by_hook(scan: Scan) -> HiddenByHook:
    """Hook -> the places of its hidden classifiers, with their kind."""
    found: HiddenByHook = {}
    for s in scan.result.shadowings:
        hook = (s.namespace, s.interface, str(s.direction))
        found.setdefault(hook, {})[_place(s.hidden)] = s.kind
    return found


def _peer_names(scan: Scan) -> dict[tuple[str, str], str]:
    """(namespace name, interface name) of each host-side veth -> where its other end is."""
    found = {}
    for inv in scan.inventories:
        for interface in inv.interfaces:
            peer = scan.peers.get((inv.namespace.key, interface.ifindex))
            if peer is not None:
                found[(inv.namespace.name, interface.name)] = peer.name
    return found


def _version_lines(scan: Scan) -> list[str]:
    if not scan.versions:
        return ["Versions found on the node: none (no known product's container found)"]
    lines = ["Versions found on the node:"]
    for vendor, found in sorted(scan.versions.items()):
        lines.append(f"  {vendor} {found.version}  ({found.source})")
    return lines


def _inventory_lines(scan: Scan, style: Style, explain_terminal: bool) -> list[str]:
    by_namespace: dict[str, list[HookReport]] = {}
    for report in scan.result.hooks:
        by_namespace.setdefault(report.namespace, []).append(report)
    lines = [style.bold("CLASSIFIERS BY NAMESPACE")]
    if not by_namespace:
        lines.append("  (no TC classifier on this node)")
    hidden = _hidden_by_hook(scan)
    peers = _peer_names(scan)
    for ns_name, reports in by_namespace.items():
        lines.append(style.bold(ns_name))
        for report in reports:
            key = (report.namespace, report.interface, str(report.direction))
            lines += _hook_lines(report, style, explain_terminal, scan, hidden.get(key, {}), peers)
    return lines


WIDTH = 100  # no report line is longer
MAX_LINES = 59  # the default report, whatever the node
FIRST_SCREEN = 25  # lines that must hold the verdict, the causes shown and the change to make
# How many causes, hidden-classifier causes, notes and lines per vendor fix the default report
# shows: the first that keeps it within MAX_LINES and the first change within FIRST_SCREEN.
BUDGETS = (
    (8, 4, 6, 8), (6, 2, 3, 5), (5, 1, 2, 4), (4, 1, 2, 3), (3, 1, 1, 3), (2, 0, 0, 2),
)  # fmt: skip
DETAIL_HINT = (
    "More: tcprio scan --detail (every conflict and interface, each fix in every spelling), "
    "--explain (each classifier's exit paths)"
)


def _plural(count: int, word: str, many: str | None = None) -> str:
    return f"{count} {word if count == 1 else (many or word + 's')}"


def _wrap(line: str, width: int = WIDTH) -> list[str]:
    """`line` cut at spaces into lines of at most `width`, continuations indented 4 more."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip(" ")) + 4)
    return textwrap.wrap(
        line, width, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False
    ) or [line]


def _wrapped(lines: Iterable[str]) -> list[str]:
    return [part for line in lines for part in _wrap(line)]


def _install_kind(dd: DatadogSettings) -> str:
    """Where Datadog's settings are changed on this node: "kubernetes" (system-probe runs in a
    container), "environment" (its environment sets them), else "host" (system-probe.yaml)."""
    if (dd.agent_version_source or "").startswith("container image"):
        return "kubernetes"
    sources = [s.source for s in (dd.enabled, dd.classifier_priority) if s is not None]
    if any("file:" not in src and "env:" in src for src in sources):
        return "environment"
    return "host"


def _flat_yaml(snippet: str) -> str:
    """Nested block YAML of one key as one dotted line: "a:\\n  b: 1" -> "a.b: 1"."""
    parts = [line.strip() for line in snippet.splitlines() if line.strip()]
    keys = [p.rstrip(":") for p in parts[:-1]]
    return ".".join([*keys, parts[-1]]) if parts else ""


def _restart_line(kind: str) -> str:
    if kind == "host":
        return f"then restart the agent: {RESTART_HOST} (Kubernetes: {RESTART_KUBERNETES})"
    return f"then: {RESTART_KUBERNETES}; Datadog Operator: {RESTART_OPERATOR}"


def _change_lines(r: Remedy, kind: str, dd: DatadogSettings) -> list[str]:
    """The one spelling of a Datadog-side change that wins on this node."""
    if kind == "kubernetes" and r.helm_values:
        return (
            ["     Helm values (the system-probe container):"]
            + _indented(r.helm_values, "       ")
            + ["     Datadog Operator: the same under spec.override.nodeAgent.containers"]
        )
    if kind == "environment" and r.environment:
        return [f"     in system-probe's environment: {r.environment}"]
    where = _file_of_setting(dd.classifier_priority) or "/etc/datadog-agent/system-probe.yaml"
    lines = [f"     in {where}:"] + _indented(r.system_probe_yaml, "       ")
    if r.environment:
        lines.append(f"     (Kubernetes: {r.environment} on the system-probe container)")
    return lines


def _file_of_setting(s: Setting | None) -> str | None:
    if s is None or "file:" not in s.source:
        return None
    return s.source.split("file:", 1)[1].rsplit(":", 1)[0]


def _what_to_change(
    remedies: list[Remedy], scan: Scan, style: Style, vendor_lines: int | None = None
) -> list[str]:
    if not remedies:
        return []
    dd = scan.datadog
    kind = _install_kind(dd)
    lines = [style.bold("WHAT TO CHANGE (in this order)")]
    note = scan.result.recommendation_note
    if note and all(grouping.remedy_rank(r) != grouping.PRIORITY_FIX for r in remedies):
        lines.append(f"  ({note})")  # why there is no everyday fix
    datadog_side = False
    for number, r in enumerate(remedies, 1):
        rank = grouping.remedy_rank(r)
        if rank == grouping.PRIORITY_FIX:
            lines.append(f"  {number}. {r.summary}")
            lines += _change_lines(r, kind, dd)
        elif rank == grouping.VENDOR_FIX:
            text = _wrap(f"  {number}. vendor side: {r.summary}")
            if vendor_lines is not None and len(text) > vendor_lines:
                text = [*text[: vendor_lines - 1], "      ... (in full: --detail)"]
            lines += text
        else:
            disabling = rank in (grouping.DISABLE_NETWORK, grouping.DISABLE_ALL)
            last = "last resort: " if disabling else ""
            lines.append(f"  {number}. {last}{r.summary}: {_flat_yaml(r.system_probe_yaml)}")
        datadog_side = datadog_side or rank != grouping.VENDOR_FIX
    if datadog_side:
        lines.append(f"  {_restart_line(kind)}")
    return lines


def _group_head(g: Group, style: Style) -> str:
    where = f"{g.hook} prio {g.priority}" if g.priority is not None else g.hook
    programs = ", ".join(f"'{p}'" for p in g.programs[:3])
    if len(g.programs) > 3:
        programs += f" (+{len(g.programs) - 3})"
    returns = f" may return {', '.join(g.verdicts)}" if g.verdicts else " may end the chain"
    if g.kind is not None:
        return (f"  {style.severity(g.severity)} {KIND_TEXT[g.kind]}: {g.hidden} hidden by "
                f"{g.blocker} ({where}: {programs}{returns})")  # fmt: skip
    if [f"'{p}'" for p in g.programs] == [g.blocker]:  # no vendor: the program is the blocker
        return f"  {style.severity(g.severity)} {g.blocker} ({where}){returns}"
    return f"  {style.severity(g.severity)} {g.blocker} ({where}): {programs}{returns}"


def _group_count(g: Group) -> str:
    behind = []
    if g.pods:
        behind.append(_plural(g.pods, "pod"))
    if g.other_namespaces:
        behind.append(_plural(g.other_namespaces, "namespace") + " behind them")
    tail = f" ({', '.join(behind)})" if behind else ""
    return f"{_plural(g.hooks, 'hook')} on {_plural(g.interfaces, 'interface')}{tail}"


def _group_lines(g: Group, style: Style, fixes: dict[Remedy, int]) -> list[str]:
    count = _group_count(g)
    numbers = [str(fixes[r]) for r in g.remedies if r in fixes]
    if g.kind is None and g.severity is Severity.CRITICAL:
        count += "; no classifier_priority runs before it"
    elif g.recommended_priority is not None:
        count += f"; classifier_priority {g.recommended_priority} fixes it"
    if numbers:
        count += f"; fix: {', then '.join(numbers)}"
    examples = "e.g. " + "; ".join(g.examples())
    together = f"      {count}; {examples}"
    if len(together) <= WIDTH:
        return [*_wrap(_group_head(g, style)), together]
    return _wrap(_group_head(g, style)) + _wrap(f"      {count}") + _wrap(f"      {examples}")[:2]


def _verdict_line(scan: Scan, status: int, style: Style) -> str:
    conflicts = scan.result.conflicts
    counts = Counter(c.severity for c in conflicts)
    exit_text = f" (exit {status})"
    if not conflicts:
        return style.bold("OK: nothing runs before Datadog's classifier that could hide packets")
    serious = counts[Severity.CRITICAL] + counts[Severity.ERROR] + counts[Severity.WARNING]
    if not serious:
        return style.bold(
            f"OK for now: {_plural(len(conflicts), 'hook')} would hide Datadog's classifier "
            f"once its network detection runs{exit_text}"
        )
    parts = [f"{counts[s]} {s}" for s in Severity if counts[s]]
    split = f" ({', '.join(parts)})" if len(parts) > 1 else ""
    word = "CRITICAL" if counts[Severity.CRITICAL] else "FIXABLE"
    return style.bold(
        f"{word}: Datadog's classifier is hidden on {_plural(serious, 'hook')}{split}{exit_text}"
    )


def _causes_lines(
    groups: list[Group], style: Style, fixes: dict[Remedy, int], limit: int | None
) -> list[str]:
    if not groups:
        return []
    hooks = sum(g.hooks for g in groups)
    lines = [style.bold(f"WHAT HIDES DATADOG'S CLASSIFIER ({_plural(len(groups), 'cause')}, "
                        f"{_plural(hooks, 'hook')})")]  # fmt: skip
    shown = groups[:limit]
    for g in shown:
        lines += _group_lines(g, style, fixes)
    if len(shown) < len(groups):
        lines.append(f"  ... {_plural(len(groups) - len(shown), 'more cause')}: --detail")
    return lines


def _hidden_group_lines(groups: list[Group], style: Style, limit: int | None) -> list[str]:
    if not groups:
        return []
    total = sum(g.hooks for g in groups)
    lines = [style.bold(f"OTHER CLASSIFIERS HIDDEN ({_plural(total, 'hook')}, "
                        f"{_plural(len(groups), 'cause')})")]  # fmt: skip
    shown = groups[:limit]
    for g in shown:
        lines += _wrap(_group_head(g, style))
        lines += _wrap(f"      {_group_count(g)}; e.g. {'; '.join(g.examples(2))}")[:2]
    if len(shown) < len(groups):
        lines.append(f"  ... {_plural(len(groups) - len(shown), 'more cause')}: --detail")
    return lines


def _notes_lines(scan: Scan, style: Style, limit: int | None) -> list[str]:
    notes = list(scan.result.notes)
    problems = list(scan.errors) + sorted(scan.catalogue.errors.values())
    if scan.vanished:
        notes.append(f"namespaces gone during the scan (skipped): {', '.join(scan.vanished)}")
    notes += [f"problem while reading: {p}" for p in problems]
    if not notes:
        return []
    shown = notes[:limit]
    lines = [style.bold(f"NOTES ({len(notes)})")]
    lines += [f"  - {n}" for n in shown]
    if len(shown) < len(notes):
        lines.append(f"  ... {_plural(len(notes) - len(shown), 'more note')}: --detail")
    return lines


def _settings_summary(scan: Scan) -> list[str]:
    dd = scan.datadog
    parts = []
    for label, setting in (
        ("enabled", dd.enabled), ("classifier_priority", dd.classifier_priority),
        ("classifier_handle", dd.classifier_handle), ("ingress.enabled", dd.ingress_enabled),
        ("raw_packet.enabled", dd.raw_packet_enabled),
    ):  # fmt: skip
        if setting is not None:
            parts.append(f"{label} {_yaml_value(setting.value)} ({setting.source})")
    agent = f"; agent {dd.agent_version}" if dd.agent_version else ""
    versions = ", ".join(f"{v} {f.version}" for v, f in sorted(scan.versions.items()))
    found = f"versions found: {versions or 'none'}"
    return [
        f"Datadog network settings: {', '.join(parts)}{agent}",
        f"Kernel {platform.release()}; {found} (sources, notes: --detail)",
    ]


def _detail_lines(scan: Scan, style: Style, explain_terminal: bool) -> list[str]:
    lines = [style.bold("=== DETAIL ===")]
    lines += _conflict_lines(scan, style) + [""]
    lines += _shadowing_lines(scan, style) + [""]
    lines += _datadog_lines(scan) + [""]
    lines += _version_lines(scan) + [""]
    lines += _inventory_lines(scan, style, explain_terminal)
    return lines


def _fits(screen: list[str]) -> bool:
    if len(screen) + len(_wrap(DETAIL_HINT)) > MAX_LINES:
        return False
    change = next((i for i, line in enumerate(screen) if "WHAT TO CHANGE" in line), None)
    return change is None or change + 2 < FIRST_SCREEN  # the heading and the first change


def render_text(
    scan: Scan,
    color: bool | None = None,
    explain_terminal: bool = False,
    detail: bool = False,
    status: int | None = None,
) -> str:
    """The report: a first screen (verdict, causes, what to change) that stays short whatever
    the number of pods; with `detail` every conflict, hidden classifier and interface too."""
    style = Style(bool(color))
    detail = detail or explain_terminal
    status = exit_status(scan) if status is None else status
    summary = _summary(scan)
    info = place_info(scan)
    groups = grouping.conflict_groups(scan.result.conflicts, info)
    remedies = grouping.ordered_remedies(groups)
    fixes = {r: i for i, r in enumerate(remedies, 1)}
    header = (
        f"tcprio {__version__} scan of {socket.gethostname()}: "
        f"{_plural(summary['namespaces'], 'namespace')}, "
        f"{_plural(summary['interfaces'], 'interface')}, "
        f"{_plural(summary['classifiers'], 'classifier')} ({scan.duration_s:.2f} s)"
    )
    presence = _presence_line(scan.result.datadog_presence)
    if len(presence) > WIDTH:  # one line, so that the verdict is always the third
        presence = presence[: WIDTH - 4].rstrip() + " ..."
    lines = [header, presence]
    lines += [_verdict_line(scan, status, style), ""]
    hidden = grouping.shadowing_groups(scan.result.shadowings, info)

    def first_screen(budget: tuple[int, ...] | tuple[None, ...]) -> list[str]:
        causes, hidden_causes, notes, vendor_lines = budget
        found = list(lines)
        for section in (
            _causes_lines(groups, style, fixes, causes),
            _what_to_change(remedies, scan, style, vendor_lines),
            _hidden_group_lines(hidden, style, hidden_causes),
            _notes_lines(scan, style, notes),
            _settings_summary(scan),
        ):
            if section:
                found += [*section, ""]
        return _wrapped(found)

    if detail:
        lines = first_screen((None, None, None, None))
    else:
        for budget in BUDGETS:
            screen = first_screen(budget)
            if _fits(screen):
                break
        lines = screen
    if detail:
        lines += _detail_lines(scan, style, explain_terminal)
    else:
        lines.append(DETAIL_HINT)
    return "\n".join(_wrapped(lines)) + "\n"
