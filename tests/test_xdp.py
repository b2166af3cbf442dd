"""XDP programs on plain data: what an XDP program's value does to the device's tc ingress
(analysis/semantics.py), where the scan places them (first on the device's ingress hook), and the
conflicts, hidden classifiers, text and JSON that follow; the IFLA_XDP attribute as the link dump
carries it. The kernel tests (tests/test_xdp_kernel.py) check the same with run counters."""

from __future__ import annotations

import json
import struct
from importlib import resources

import jsonschema
import pytest

from tcprio.analysis import semantics
from tcprio.analysis.conflicts import DatadogTarget, HookClassifiers, analyse, execution_order
from tcprio.analysis.shadowing import find_shadowings
from tcprio.kernel.programs import ProgramCatalogue
from tcprio.kernel.rtnetlink import xdp_programs
from tcprio.model import (
    Classifier,
    ClassifierVerdict,
    Direction,
    HookInventory,
    HookKind,
    Interface,
    NamespaceInventory,
    NetNamespace,
    ProgramVerdicts,
    Severity,
    TcFilter,
    TcxEntry,
    VerdictClass,
    XdpProgram,
)
from tcprio.report import render_text, scan_json
from tcprio.scan import Scan, all_hooks, attached_program_ids
from tests.test_conflicts import TRANSPARENT, clsact, datadog, tcx
from tests.test_scan_kernel import datadog_settings

DROP = ClassifierVerdict(VerdictClass.TERMINAL, ("XDP_DROP",), "returns XDP_DROP")


# --- semantics -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{2}, {2 | 1 << 32}])
def test_pass_alone_hands_every_packet_to_the_tc_ingress(values):
    verdict = semantics.classify_xdp(frozenset(values))
    assert verdict.verdict_class is VerdictClass.TRANSPARENT
    assert "XDP_PASS" in verdict.reason


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({0}, ("XDP_ABORTED",)),
        ({1}, ("XDP_DROP",)),
        ({3}, ("XDP_TX",)),
        ({4}, ("XDP_REDIRECT",)),
        ({1, 2}, ("XDP_DROP",)),
        ({2, 4}, ("XDP_REDIRECT",)),
        ({-1}, ("value -1 (dropped)",)),  # unknown actions: bpf_warn_invalid_xdp_action, dropped
        ({5, 42}, ("value 5 (dropped)", "value 42 (dropped)")),
    ],
)
def test_every_value_but_pass_hides_the_tc_ingress(values, names):
    verdict = semantics.classify_xdp(frozenset(values))
    assert verdict.verdict_class is VerdictClass.TERMINAL
    assert verdict.terminal_actions == names
    assert "tcx and clsact ingress hooks never see the packet" in verdict.reason


def test_an_unknown_exit_next_to_a_drop_is_still_terminal():
    verdict = semantics.classify_xdp(None, frozenset({1, 2}))
    assert verdict.verdict_class is VerdictClass.TERMINAL
    assert verdict.terminal_actions == ("XDP_DROP",)
    assert "XDP_DROP (1) at an exit it reaches" in verdict.reason
    assert semantics.classify_xdp(None, frozenset({2})).verdict_class is VerdictClass.UNKNOWN
    assert semantics.classify_xdp(frozenset()).verdict_class is VerdictClass.UNKNOWN


# --- the link dump's IFLA_XDP ----------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def test_ifla_xdp_gives_each_modes_program_in_run_order():
    one = _attr(2, b"\x02") + _u32(4, 77) + _u32(6, 77)  # skb only: ATTACHED, PROG_ID, SKB id
    assert xdp_programs(memoryview(one)) == (("skb", 77),)
    multi = _attr(2, b"\x04") + _u32(5, 11) + _u32(7, 12)  # MULTI: drv and hw, no PROG_ID
    assert xdp_programs(memoryview(multi)) == (("hw", 12), ("drv", 11))
    only_prog_id = _attr(2, b"\x01") + _u32(4, 9)  # a kernel that names no mode's id
    assert xdp_programs(memoryview(only_prog_id)) == (("drv", 9),)
    assert xdp_programs(memoryview(_attr(2, b"\x00"))) == ()
    assert xdp_programs(None) == ()


# --- placement -------------------------------------------------------------------------------


def _node() -> list[NamespaceInventory]:
    """veth0 (index 2): a generic XDP program (31), a tcx program (32), a clsact filter (33)."""
    ns = NetNamespace(inode=1, dev=4, name="node", path="/run/netns/node", source="named")
    bpf = TcFilter("bpf", 0, 10, 1, 3, 0, direct_action=True, name="f", prog_id=33)
    ingress = HookInventory(Direction.INGRESS, "clsact", filters=(bpf,), tcx=(TcxEntry(32, 0),))
    egress = HookInventory(Direction.EGRESS, "clsact")
    veth0 = Interface(2, "veth0", (ingress, egress), kind="veth", xdp=(XdpProgram(31, "skb"),))
    bare = Interface(3, "veth1", (HookInventory(Direction.INGRESS, None),
                                  HookInventory(Direction.EGRESS, None)),
                     xdp=(XdpProgram(41, "drv"),))  # fmt: skip
    return [NamespaceInventory(ns, (veth0, bare))]


def _verdicts(values: dict[int, set[int]]) -> dict[int, ProgramVerdicts]:
    return {p: ProgramVerdicts(p, frozenset(v), ()) for p, v in values.items()}


def test_xdp_programs_are_roots_and_come_first_on_the_ingress_hook_only():
    node = _node()
    assert sorted(attached_program_ids(node)) == [31, 32, 33, 41]
    verdicts = _verdicts({31: {1, 2}, 32: {-1}, 33: {-1}, 41: {2}})
    hooks = all_hooks(node, verdicts, ProgramCatalogue())
    shown = {
        (h.interface, str(h.direction)): [
            (str(c.hook), c.prog_id, c.xdp_mode, str(c.verdict.verdict_class))
            for c in execution_order(h.classifiers)
        ]
        for h in hooks
    }
    assert shown == {
        ("veth0", "ingress"): [
            ("xdp", 31, "skb", "terminal"),
            ("tcx", 32, None, "transparent"),
            ("clsact", 33, None, "transparent"),
        ],
        ("veth1", "ingress"): [("xdp", 41, "drv", "transparent")],
    }  # fmt: skip


# --- conflicts, hidden classifiers, report ---------------------------------------------------


def xdp(verdict=DROP, position=0, mode="skb") -> Classifier:
    return Classifier(
        hook=HookKind.XDP, position=position, prog_id=800 + position, name="xdp_fw",
        vendor=None, verdict=verdict, xdp_mode=mode,
    )  # fmt: skip


def _ingress(*classifiers: Classifier) -> HookClassifiers:
    return HookClassifiers("ns1", "eth0", Direction.INGRESS, tuple(classifiers))


def test_xdp_runs_after_netkit_and_before_tcx_and_clsact():
    netkit = Classifier(
        hook=HookKind.NETKIT, position=0, prog_id=1, name="nk", vendor=None,
        verdict=TRANSPARENT, netkit_chain="peer chain of nk0",
    )  # fmt: skip
    order = execution_order([clsact(1), tcx(), xdp(position=1, mode="drv"), netkit,
                             xdp(position=0, mode="hw")])  # fmt: skip
    assert [(c.hook, c.xdp_mode) for c in order] == [
        (HookKind.NETKIT, None), (HookKind.XDP, "hw"), (HookKind.XDP, "drv"),
        (HookKind.TCX, None), (HookKind.CLSACT, None),
    ]  # fmt: skip


def test_a_terminal_xdp_program_before_datadogs_ingress_classifier_is_critical():
    result = analyse([_ingress(datadog(10), xdp(DROP))], DatadogTarget(priority=10))
    assert [(c.severity, c.blocker.hook) for c in result.conflicts] == [
        (Severity.CRITICAL, HookKind.XDP)
    ]
    assert "runs in XDP (skb mode), before every tcx and clsact program" in (
        result.conflicts[0].message
    )
    assert result.recommended_priority is None  # no priority runs before XDP


def test_xdp_that_only_passes_or_datadog_without_ingress_is_no_conflict():
    assert analyse([_ingress(datadog(10), xdp(TRANSPARENT))], DatadogTarget(10)).conflicts == []
    egress_only = DatadogTarget(10, directions=frozenset({Direction.EGRESS}))
    assert analyse([_ingress(xdp(DROP))], egress_only).conflicts == []
    assert len(analyse([_ingress(xdp(DROP))], DatadogTarget(10)).conflicts) == 1


def test_a_dropping_xdp_program_hides_the_tcx_and_clsact_programs_after_it():
    hooks = analyse(
        [_ingress(xdp(DROP), tcx(TRANSPARENT), clsact(5, TRANSPARENT))], DatadogTarget(10)
    ).hooks
    found = find_shadowings(hooks)
    assert [(s.hidden.hook, s.blocker.hook, s.severity) for s in found] == [
        (HookKind.TCX, HookKind.XDP, Severity.ERROR),
        (HookKind.CLSACT, HookKind.XDP, Severity.ERROR),
    ]
    assert "runs in XDP (skb mode), before every tcx and clsact program" in found[0].message


def test_an_offloaded_drop_hides_the_drivers_program():
    hooks = analyse([_ingress(xdp(DROP, 0, "hw"), xdp(TRANSPARENT, 1, "drv"))], DatadogTarget(10))
    found = find_shadowings(hooks.hooks)
    assert [(s.hidden.xdp_mode, s.blocker.xdp_mode) for s in found] == [("drv", "hw")]
    assert "runs before it in XDP (hw mode, #0)" in found[0].message


def _schema() -> dict:
    return json.loads(resources.files("tcprio").joinpath("data/scan-schema-v1.json").read_text())


def test_text_and_json_show_the_xdp_program_and_keep_to_the_schema():
    node = _node()
    verdicts = _verdicts({31: {1, 2}, 32: {-1}, 33: {-1}, 41: {2}})
    result = analyse(all_hooks(node, verdicts, ProgramCatalogue()), DatadogTarget(10))
    scan = Scan(node, ProgramCatalogue(), verdicts, datadog_settings(), result)
    document = scan_json(scan)
    jsonschema.validate(document, _schema())
    veth0 = document["namespaces"][0]["interfaces"][0]
    assert veth0["xdp"] == [{"prog_id": 31, "mode": "skb"}]
    first = veth0["hooks"][0]["classifiers"][0]
    assert (first["hook"], first["xdp_mode"], first["terminal_actions"]) == (
        "xdp", "skb", ["XDP_DROP"],
    )  # fmt: skip
    assert "xdp" not in document["namespaces"][0]["interfaces"][0]["hooks"][1]
    text = render_text(scan, color=False, detail=True)
    assert "xdp skb #0" in text and "terminal: XDP_DROP" in text
