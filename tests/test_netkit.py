"""netkit chains on plain data: what a netkit program's value does (analysis/semantics.py), which
ingress hook each chain runs before (analysis/netkit.py), and the conflicts, hidden classifiers,
text and JSON that follow. The kernel tests (tests/test_netkit_kernel.py) check the same with run
counters on a kernel that has netkit."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from tcprio.analysis import semantics
from tcprio.analysis.conflicts import DatadogTarget, HookClassifiers, analyse, execution_order
from tcprio.analysis.netkit import chain_program_ids, place_chains
from tcprio.analysis.shadowing import find_shadowings
from tcprio.kernel.programs import ProgramCatalogue
from tcprio.model import (
    Classifier,
    ClassifierVerdict,
    Direction,
    HookInventory,
    HookKind,
    Interface,
    NamespaceInventory,
    NetkitDevice,
    NetNamespace,
    ProgramVerdicts,
    Severity,
    TcxEntry,
    VerdictClass,
)
from tcprio.report import render_text, scan_json
from tcprio.scan import Scan, all_hooks, attached_program_ids
from tests.test_conflicts import TRANSPARENT, clsact, datadog, tcx
from tests.test_scan_kernel import datadog_settings

DROP = ClassifierVerdict(VerdictClass.TERMINAL, ("NETKIT_DROP",), "returns NETKIT_DROP")


# --- semantics -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{0}, {-1}, {-1, 0}])
def test_next_and_pass_deliver_the_packet_to_the_other_devices_hooks(values):
    verdict = semantics.classify_netkit(frozenset(values))
    assert verdict.verdict_class is VerdictClass.TRANSPARENT
    assert "other device's ingress hooks" in verdict.reason


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({2}, ("NETKIT_DROP",)),
        ({7}, ("NETKIT_REDIRECT",)),
        ({0, 2}, ("NETKIT_DROP",)),
        ({-1, 7}, ("NETKIT_REDIRECT",)),
        ({1}, ("value 1 (dropped)",)),  # netkit_xmit's `default:` drops
        ({3, 42}, ("value 3 (dropped)", "value 42 (dropped)")),
    ],
)
def test_drop_redirect_and_every_other_value_keep_the_packet_from_them(values, names):
    verdict = semantics.classify_netkit(frozenset(values))
    assert verdict.verdict_class is VerdictClass.TERMINAL
    assert verdict.terminal_actions == names


def test_an_unknown_exit_next_to_a_drop_is_still_terminal():
    verdict = semantics.classify_netkit(None, frozenset({0, 2}))
    assert verdict.verdict_class is VerdictClass.TERMINAL
    assert verdict.terminal_actions == ("NETKIT_DROP",)
    assert semantics.classify_netkit(None, frozenset({0})).verdict_class is VerdictClass.UNKNOWN
    assert semantics.classify_netkit(frozenset()).verdict_class is VerdictClass.UNKNOWN


# --- placement -------------------------------------------------------------------------------


def _ns(name: str, inode: int) -> NetNamespace:
    return NetNamespace(inode=inode, dev=4, name=name, path=f"/run/netns/{name}", source="named")


def _iface(ifindex: int, name: str, netkit: NetkitDevice | None = None, tcx_ids=()) -> Interface:
    ingress = HookInventory(
        Direction.INGRESS, None, tcx=tuple(TcxEntry(p, i) for i, p in enumerate(tcx_ids))
    )
    hooks = (ingress, HookInventory(Direction.EGRESS, None))
    return Interface(ifindex, name, hooks, kind="netkit" if netkit else "veth", netkit=netkit)


def _primary(ifindex: int, peer: int, primary_ids=(), peer_ids=(), **kw) -> NetkitDevice:
    return NetkitDevice(
        primary=True, peer_ifindex=peer, peer_netnsid=kw.pop("netnsid", 0),
        primary_chain=tuple(TcxEntry(p, i, link_id=p + 1000) for i, p in enumerate(primary_ids)),
        peer_chain=tuple(TcxEntry(p, i, link_id=p + 1000) for i, p in enumerate(peer_ids)),
        **kw,
    )  # fmt: skip


def _peer(peer: int, netnsid: int | None = 0) -> NetkitDevice:
    return NetkitDevice(primary=False, peer_ifindex=peer, peer_netnsid=netnsid)


def _node() -> list[NamespaceInventory]:
    """A host with two primaries (nk5 -> pod a's eth0, nk6 -> pod b's eth0), peers both index 2."""
    host = NamespaceInventory(
        _ns("host", 1),
        (
            _iface(5, "nk5", _primary(5, 2, primary_ids=(11,), peer_ids=(12, 13)), tcx_ids=(14,)),
            _iface(6, "nk6", _primary(6, 2, primary_ids=(21,))),
        ),
    )
    pod_a = NamespaceInventory(_ns("pod-a", 2), (_iface(2, "eth0", _peer(5)),))
    pod_b = NamespaceInventory(_ns("pod-b", 3), (_iface(2, "eth0", _peer(6)),))
    return [host, pod_a, pod_b]


def test_the_peer_chain_precedes_the_primarys_ingress_and_the_primary_chain_the_peers():
    placement = place_chains(_node())
    found = {
        key: (c.label, [e.prog_id for e in c.entries])
        for key, c in placement.before_ingress.items()
    }
    assert found == {
        ((4, 1), 5): ("peer chain of nk5", [12, 13]),
        ((4, 2), 2): ("primary chain of nk5", [11]),
        ((4, 3), 2): ("primary chain of nk6", [21]),
    }
    assert placement.notes == []


def test_a_peer_outside_the_scanned_namespaces_is_a_note_not_a_guess():
    host, pod_a, _pod_b = _node()
    placement = place_chains([host, pod_a])
    assert ((4, 3), 2) not in placement.before_ingress
    assert len(placement.notes) == 1
    assert "nk6: the netkit primary chain (1 program)" in placement.notes[0]
    assert "is not in a scanned namespace" in placement.notes[0]


def test_a_pair_in_one_namespace_is_matched_there():
    ns = NamespaceInventory(
        _ns("one", 7),
        (_iface(3, "nka", _primary(3, 4, primary_ids=(31,), netnsid=None)),
         _iface(4, "nkb", _peer(3, netnsid=None))),
    )  # fmt: skip
    assert set(place_chains([ns]).before_ingress) == {((4, 7), 4)}


def test_a_blackhole_policy_without_programs_is_noted():
    host = NamespaceInventory(_ns("host", 1), (_iface(5, "nk5", _primary(5, 2, peer_policy=2)),))
    notes = place_chains([host]).notes
    assert len(notes) == 1 and "blackhole with no program on the peer chain" in notes[0]


def test_every_chain_program_is_a_root_of_the_catalogue():
    node = _node()
    assert sorted(chain_program_ids(node)) == [11, 12, 13, 21]
    assert sorted(attached_program_ids(node)) == [11, 12, 13, 14, 21]


def _verdicts(values: dict[int, set[int]]) -> dict[int, ProgramVerdicts]:
    return {p: ProgramVerdicts(p, frozenset(v), ()) for p, v in values.items()}


def test_the_scan_puts_netkit_programs_first_on_the_hook_they_precede():
    node = _node()
    verdicts = _verdicts({11: {2}, 12: {-1}, 13: {0}, 14: {-1}, 21: {0}})
    hooks = all_hooks(node, verdicts, ProgramCatalogue(), place_chains(node))
    shown = {
        (h.namespace, h.interface, str(h.direction)): [
            (str(c.hook), c.prog_id, str(c.verdict.verdict_class))
            for c in execution_order(h.classifiers)
        ]
        for h in hooks
    }
    assert shown == {
        ("host", "nk5", "ingress"): [
            ("netkit", 12, "transparent"),
            ("netkit", 13, "transparent"),
            ("tcx", 14, "transparent"),
        ],
        ("pod-a", "eth0", "ingress"): [("netkit", 11, "terminal")],
        ("pod-b", "eth0", "ingress"): [("netkit", 21, "transparent")],
    }  # fmt: skip


# --- conflicts, hidden classifiers, report ---------------------------------------------------


def netkit(verdict=DROP, position=0) -> Classifier:
    return Classifier(
        hook=HookKind.NETKIT, position=position, prog_id=900 + position, name="nk_policy",
        vendor=None, verdict=verdict, link_id=7, netkit_chain="peer chain of nk0",
    )  # fmt: skip


def _ingress(*classifiers: Classifier) -> HookClassifiers:
    return HookClassifiers("ns1", "nk0", Direction.INGRESS, tuple(classifiers))


def test_netkit_runs_before_tcx_and_clsact():
    order = execution_order([clsact(1, position=0), tcx(position=0), netkit(position=1)])
    assert [c.hook for c in order] == [HookKind.NETKIT, HookKind.TCX, HookKind.CLSACT]


def test_a_terminal_netkit_program_before_datadog_is_critical():
    result = analyse([_ingress(datadog(10), netkit(DROP))], DatadogTarget(priority=10))
    assert [(c.severity, c.blocker.hook) for c in result.conflicts] == [
        (Severity.CRITICAL, HookKind.NETKIT)
    ]
    assert "runs in the netkit peer chain of nk0" in result.conflicts[0].message
    assert result.recommended_priority is None  # no priority runs before a netkit program


def test_a_netkit_program_that_only_passes_is_no_conflict():
    result = analyse([_ingress(datadog(10), netkit(TRANSPARENT))], DatadogTarget(priority=10))
    assert result.conflicts == []


def test_a_dropping_netkit_program_hides_the_tcx_and_clsact_programs_after_it():
    hooks = analyse(
        [_ingress(netkit(DROP), tcx(TRANSPARENT), clsact(5, TRANSPARENT))], DatadogTarget(10)
    ).hooks
    found = find_shadowings(hooks)
    assert [(s.hidden.hook, s.blocker.hook, s.severity) for s in found] == [
        (HookKind.TCX, HookKind.NETKIT, Severity.ERROR),
        (HookKind.CLSACT, HookKind.NETKIT, Severity.ERROR),
    ]
    assert "runs in the netkit peer chain of nk0, before every tcx and clsact" in found[0].message


def _schema() -> dict:
    return json.loads(resources.files("tcprio").joinpath("data/scan-schema-v1.json").read_text())


def test_text_and_json_show_the_netkit_chain_and_keep_to_the_schema():
    node = _node()
    verdicts = _verdicts({11: {2}, 12: {-1}, 13: {0}, 14: {-1}, 21: {0}})
    placement = place_chains(node)
    result = analyse(all_hooks(node, verdicts, ProgramCatalogue(), placement), DatadogTarget(10))
    scan = Scan(node, ProgramCatalogue(), verdicts, datadog_settings(), result)
    document = scan_json(scan)
    jsonschema.validate(document, _schema())
    pod_a = next(n for n in document["namespaces"] if n["name"] == "pod-a")
    eth0 = pod_a["interfaces"][0]
    assert eth0["netkit"]["primary"] is False and eth0["netkit"]["peer_ifindex"] == 5
    blocker = eth0["hooks"][0]["classifiers"][0]
    assert (blocker["hook"], blocker["netkit_chain"]) == ("netkit", "primary chain of nk5")
    assert [c["blocker_hook"] for c in document["conflicts"]] == ["netkit"]
    text = render_text(scan, color=False, detail=True)
    assert "netkit #0 link 1011" in text and "(primary chain of nk5)" in text
