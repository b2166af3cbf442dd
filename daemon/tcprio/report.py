"""Turn a scan into what people and scripts read: the text report and the versioned JSON."""

from __future__ import annotations

import os
import platform
import socket
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from tcprio import __version__
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


def exit_status(scan: Scan) -> int:
    severities = {c.severity for c in scan.result.conflicts}
    if Severity.CRITICAL in severities:
        return EXIT_CRITICAL
    if Severity.ERROR in severities:
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


def scan_json(scan: Scan) -> dict[str, Any]:
    reports = _hook_reports(scan)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "tcprio_version": __version__,
        "node": socket.gethostname(),
        "kernel": platform.release(),
        "scanned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_seconds": round(scan.duration_s, 6),
        "exit_status": exit_status(scan),
        "summary": _summary(scan),
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


def _setting_line(label: str, s: Setting | None) -> str:
    if s is None:
        return f"  {label}: (unknown)"
    return f"  {label}: {s.value}  ({s.source})"


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
        lines += _indented(extra, f"{indent}    ")
    return lines


def _remedy_labels(conflicts: Iterable[Conflict]) -> dict[Remedy, str]:
    """One label per distinct remedy, in order of first use: many conflicts share a fix."""
    labels: dict[Remedy, str] = {}
    for conflict in conflicts:
        for remedy in conflict.remedies:
            labels.setdefault(remedy, str(len(labels) + 1))
    return labels


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


def render_text(scan: Scan, color: bool | None = None, explain_terminal: bool = False) -> str:
    style = Style(color if color is not None else os.isatty(1))
    summary = _summary(scan)
    header = (
        f"tcprio {__version__} scan of {socket.gethostname()} (kernel {platform.release()}): "
        f"{summary['namespaces']} namespaces, {summary['interfaces']} interfaces, "
        f"{summary['classifiers']} classifiers, {scan.duration_s:.2f} s"
    )
    lines = [header, _presence_line(scan.result.datadog_presence), ""]
    lines += _conflict_lines(scan, style) + [""]
    lines += _shadowing_lines(scan, style) + [""]
    lines += _datadog_lines(scan) + [""]
    lines += _version_lines(scan) + [""]
    lines += _inventory_lines(scan, style, explain_terminal)
    if scan.vanished:
        lines += ["", f"Namespaces gone during the scan (skipped): {', '.join(scan.vanished)}"]
    problems = list(scan.errors) + sorted(scan.catalogue.errors.values())
    if problems:
        lines += ["", "Problems while reading:"] + [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n"
