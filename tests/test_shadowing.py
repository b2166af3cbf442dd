"""Every classifier hidden by one before it (analysis/shadowing.py), rule by rule, on plain data;
then what the text report, the JSON (against its schema) and /metrics make of the findings.
The kernel tests (tests/test_shadowing_kernel.py) check the same verdicts with run counters."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcprio.analysis.conflicts import DatadogTarget, analyse
from tcprio.analysis.shadowing import (
    ObserverRule,
    find_shadowings,
    may_hide,
    passes,
    vendor_roles,
)
from tcprio.kernel.programs import ProgramCatalogue
from tcprio.model import (
    Classifier,
    ClassifierVerdict,
    Direction,
    HookKind,
    HookReport,
    Severity,
    ShadowKind,
    VerdictClass,
)
from tcprio.report import render_text, scan_json
from tcprio.scan import Scan
from tcprio.service.config import MetricsConfig, config_from_mapping
from tcprio.service.metrics import MetricsRenderer
from tcprio.service.snapshot import Snapshot
from tests.test_conflicts import TERMINAL, TRANSPARENT, UNKNOWN, clsact, datadog, tcx
from tests.test_scan_kernel import datadog_settings

SHOT = ClassifierVerdict(VerdictClass.TERMINAL, ("TC_ACT_SHOT",), "returns TC_ACT_SHOT")
OK_OR_SHOT = ClassifierVerdict(
    VerdictClass.TERMINAL, ("TC_ACT_OK", "TC_ACT_SHOT"), "returns TC_ACT_OK, TC_ACT_SHOT"
)
TCX_PASS = ClassifierVerdict(VerdictClass.TERMINAL, ("TCX_PASS",), "returns TCX_PASS")
ARP, IP, IPV6 = 0x0806, 0x0800, 0x86DD


def retina(prio: int, verdict=TRANSPARENT, position: int = 0, **kw) -> Classifier:
    kw.setdefault("name", "endpoint_ingress_filter")
    return clsact(prio, verdict, position, vendor="Retina", **kw)


def cilium(prio: int, verdict=OK_OR_SHOT, position: int = 0, **kw) -> Classifier:
    kw.setdefault("name", "cil_from_container")
    return clsact(prio, verdict, position, vendor="Cilium", **kw)


def hook_report(*classifiers: Classifier, iface: str = "eth0") -> HookReport:
    return HookReport("ns1", iface, Direction.EGRESS, tuple(classifiers))


def shadowed(*classifiers: Classifier, observers=()) -> list:
    return find_shadowings([hook_report(*classifiers)], observers)


def one(*classifiers: Classifier, observers=()):
    found = shadowed(*classifiers, observers=observers)
    assert len(found) == 1, [s.message for s in found]
    return found[0]


# --- the kinds -------------------------------------------------------------------------------


def test_a_terminal_cni_at_priority_1_hides_an_observer_after_it():
    blocker, observer = cilium(1), retina(5)
    s = one(blocker, observer)
    assert (s.kind, s.severity) == (ShadowKind.OBSERVER_HIDDEN, Severity.ERROR)
    assert s.hidden is observer and s.blocker is blocker and s.hidden_label == "Retina"
    assert (s.namespace, s.interface, s.direction) == ("ns1", "eth0", Direction.EGRESS)
    assert s.other_blockers == 0
    assert "at priority 1, before it," in s.message
    assert "TC_ACT_OK, TC_ACT_SHOT" in s.message
    assert "Retina never sees those packets" in s.message


def test_an_observer_returning_ok_before_a_cni_is_a_policy_bypass():
    observer, policy = retina(1, TERMINAL), cilium(2, SHOT)
    s = one(observer, policy)
    assert (s.kind, s.severity) == (ShadowKind.POLICY_BYPASS, Severity.CRITICAL)
    assert s.hidden is policy and s.blocker is observer and s.hidden_label == "Cilium"
    assert "POLICY BYPASS" in s.message and "with TC_ACT_OK" in s.message
    assert "Cilium's policy program" in s.message


def test_a_tcx_pass_before_a_cnis_clsact_filter_is_a_policy_bypass_too():
    s = one(tcx(TCX_PASS), clsact(40000, SHOT, name="cali_tc_preamble", vendor="Calico"))
    assert s.kind is ShadowKind.POLICY_BYPASS and "with TCX_PASS" in s.message
    assert "runs in tcx, before every clsact filter" in s.message


def test_a_blocker_that_only_drops_hides_a_cni_without_bypassing_its_policy():
    s = one(clsact(1, SHOT), cilium(2))
    assert (s.kind, s.severity) == (ShadowKind.HIDDEN, Severity.ERROR)
    assert "POLICY" not in s.message


def test_any_other_classifier_hidden_is_reported_as_hidden():
    s = one(clsact(1), clsact(3, TRANSPARENT, name="someone_else"))
    assert (s.kind, s.severity, s.hidden_label) == (ShadowKind.HIDDEN, Severity.ERROR, "")
    assert "it never sees those packets" in s.message


def test_the_same_vendors_own_chain_is_only_info_and_never_a_bypass():
    """Cilium in tcx and its legacy filter still at priority 1 (a leftover of an upgrade)."""
    own = replace(tcx(TCX_PASS), name="cil_from_container", vendor="Cilium")
    s = one(own, cilium(1))
    assert (s.kind, s.severity) == (ShadowKind.HIDDEN, Severity.INFO)
    assert "both are Cilium's" in s.message


# --- where the blocker sits ------------------------------------------------------------------


def test_a_terminal_tcx_program_hides_every_clsact_filter_whatever_its_priority():
    s = one(tcx(), retina(1))
    assert s.blocker.hook is HookKind.TCX
    assert "runs in tcx, before every clsact filter" in s.message


def test_a_terminal_tcx_program_hides_the_tcx_programs_after_it():
    first = tcx(position=0)
    later = replace(tcx(TRANSPARENT, position=1), name="beyla_egress", vendor="Beyla")
    s = one(later, first)  # any input order: the hook's execution order decides
    assert s.hidden is later and s.blocker is first
    assert "runs before it in tcx (#0)" in s.message and "in tcx (#1) is hidden" in s.message


def test_at_the_same_priority_the_one_first_in_the_list_hides_the_other():
    s = one(retina(5, position=1), clsact(5, position=0))
    assert "at the same priority 5 comes first in the kernel's list" in s.message


def test_nothing_hides_what_runs_before_it():
    assert shadowed(retina(1), clsact(5)) == []
    assert shadowed(clsact(1, position=1), retina(1, position=0)) == []


def test_a_transparent_classifier_hides_nothing():
    assert shadowed(retina(1, TRANSPARENT), cilium(2), tcx(TRANSPARENT)) == []


def test_an_unknown_verdict_may_hide_it_a_warning():
    s = one(clsact(1, UNKNOWN), retina(5))
    assert (s.kind, s.severity) == (ShadowKind.OBSERVER_HIDDEN, Severity.WARNING)
    assert "could not prove what it returns: r0 loaded from memory" in s.message


def test_an_unknown_verdict_is_never_a_policy_bypass():
    s = one(clsact(1, UNKNOWN), cilium(5))
    assert (s.kind, s.severity) == (ShadowKind.HIDDEN, Severity.WARNING)


def test_filters_in_other_chains_neither_hide_nor_are_hidden():
    assert shadowed(clsact(1, chain=1), retina(5)) == []
    assert shadowed(clsact(1), retina(5, chain=2)) == []


# --- protocols -------------------------------------------------------------------------------


def test_a_filter_for_a_protocol_without_ip_hides_only_those_frames_info():
    s = one(clsact(1, protocol=ARP), retina(5))
    assert s.severity is Severity.INFO
    assert "for protocol arp packets" in s.message and "only sees arp frames" in s.message


def test_a_filter_for_ip_hides_the_ip_packets_error():
    s = one(clsact(1, protocol=IP), retina(5))
    assert s.severity is Severity.ERROR and "for protocol ip packets" in s.message


@pytest.mark.parametrize(
    ("blocker", "hidden", "hides"),
    [
        (ARP, IP, False),  # the kernel never runs one on the other's frames
        (IP, IPV6, False),
        (IP, IP, True),
        (ARP, ARP, True),
        (0x0003, ARP, True),  # protocol all before protocol arp: every arp frame
    ],
)
def test_filters_for_different_protocols_never_meet(blocker: int, hidden: int, hides: bool):
    b, h = clsact(1, protocol=blocker), retina(5, protocol=hidden)
    assert may_hide(b, h) is hides
    found = shadowed(b, h)
    assert bool(found) is hides
    if hides:
        assert found[0].severity is Severity.ERROR  # all of its frames, not some


# --- Datadog ---------------------------------------------------------------------------------


def test_datadogs_own_classifier_hidden_is_a_conflict_and_not_repeated_here():
    blocker = cilium(1)
    assert shadowed(blocker, datadog(10)) == []
    conflicts = analyse(
        [_hook_classifiers(blocker, datadog(10))], DatadogTarget(priority=10)
    ).conflicts
    assert [c.severity for c in conflicts] == [Severity.CRITICAL]


def _hook_classifiers(*classifiers: Classifier):
    from tcprio.analysis.conflicts import HookClassifiers

    return HookClassifiers("ns1", "eth0", Direction.EGRESS, classifiers)


def test_datadog_returning_ok_hides_what_follows_and_the_message_says_what_to_do():
    """Datadog's raw-packet filters returned TC_ACT_OK before agent PR 38078: what came after
    them never ran. A real finding, not a conflict (nothing hides Datadog's classifier)."""
    raw = replace(datadog(10), name="classifier_raw_packet_egress", verdict=TERMINAL,
                  vendor="Datadog")  # fmt: skip
    s = one(raw, retina(20))
    assert (s.kind, s.severity) == (ShadowKind.OBSERVER_HIDDEN, Severity.ERROR)
    assert s.blocker.is_datadog and "PR 38078" in s.message


def test_a_transparent_datadog_classifier_hides_nothing():
    assert shadowed(datadog(1), retina(5), cilium(6)) == []


# --- several blockers ------------------------------------------------------------------------


def test_each_hidden_classifier_once_with_its_earliest_blocker_and_the_count_of_others():
    first, second, observer = clsact(1, SHOT), clsact(2, SHOT, name="p2"), retina(5)
    found = shadowed(first, second, observer)
    hidden = [s.hidden for s in found]
    assert hidden.count(observer) == 1 and hidden.count(second) == 1 and len(found) == 2
    s = next(s for s in found if s.hidden is observer)
    assert s.blocker is first and s.other_blockers == 1
    assert "1 more classifier before it may hide it too" in s.message


def test_the_most_severe_blocker_decides_and_is_named_when_it_is_not_the_first():
    maybe, certain, observer = clsact(1, UNKNOWN), clsact(2, SHOT, name="dropper"), retina(5)
    s = next(s for s in shadowed(maybe, certain, observer) if s.hidden is observer)
    assert s.blocker is maybe and s.severity is Severity.ERROR
    assert "; also " in s.message and "'dropper'" in s.message
    assert "more classifier" not in s.message  # the second one is named, not counted


def test_a_later_blocker_that_accepts_makes_it_a_policy_bypass():
    dropper, accepter, policy = clsact(1, SHOT), retina(2, TERMINAL), cilium(3)
    s = next(s for s in shadowed(dropper, accepter, policy) if s.hidden is policy)
    assert (s.kind, s.severity, s.blocker) == (
        ShadowKind.POLICY_BYPASS, Severity.CRITICAL, dropper,
    )  # fmt: skip
    assert "also Retina" in s.message and s.other_blockers == 1


def test_findings_come_most_severe_first_then_in_hook_order():
    hooks = [
        hook_report(clsact(1, UNKNOWN), retina(5), iface="a"),
        hook_report(clsact(1, protocol=ARP), retina(5), iface="b"),
        hook_report(retina(1, TERMINAL), cilium(2), iface="c"),
        hook_report(clsact(1), retina(5), clsact(6, name="x"), iface="d"),
    ]
    found = find_shadowings(hooks)
    assert [(s.interface, s.severity) for s in found] == [
        ("c", Severity.CRITICAL),
        ("d", Severity.ERROR),  # the observer before...
        ("d", Severity.ERROR),  # ...the other one hidden
        ("a", Severity.WARNING),
        ("b", Severity.INFO),
    ]
    assert found[1].kind is ShadowKind.OBSERVER_HIDDEN and found[2].kind is ShadowKind.HIDDEN


# --- observers from the configuration --------------------------------------------------------


def test_a_configured_observer_is_recognised_by_program_glob():
    mine = clsact(5, TRANSPARENT, name="my_tap_egress")
    s = one(clsact(1), mine, observers=[ObserverRule("my-tap", programs=("my_tap_*",))])
    assert (s.kind, s.hidden_label) == (ShadowKind.OBSERVER_HIDDEN, "my-tap")
    assert "(observer my-tap of the configuration)" in s.message


def test_a_configured_observer_is_recognised_by_filter_glob():
    mine = clsact(5, TRANSPARENT, name="prog", filter_name="tap.o:[egress]")
    rule = ObserverRule("tap", filters=("tap.o:*",))
    assert one(clsact(1), mine, observers=[rule]).kind is ShadowKind.OBSERVER_HIDDEN
    assert one(clsact(1), mine).kind is ShadowKind.HIDDEN  # unconfigured: just hidden


def test_a_program_glob_needs_a_program():
    """A classifier without a program id (u32, classic BPF) is named after its filter or kind."""
    u32 = clsact(5, TRANSPARENT, name="u32", kind="u32")
    u32 = replace(u32, prog_id=None)
    assert one(clsact(1), u32, observers=[ObserverRule("u", programs=("u32",))]).kind is (
        ShadowKind.HIDDEN
    )


def test_the_configuration_wins_over_the_vendor_rules():
    """A configured observer matching a CNI's program is protected as an observer."""
    rule = ObserverRule("mine", programs=("cil_*",))
    s = one(retina(1, TERMINAL), cilium(2), observers=[rule])
    assert (s.kind, s.hidden_label) == (ShadowKind.OBSERVER_HIDDEN, "mine")


def test_the_daemon_configuration_gives_the_rules():
    config = config_from_mapping(
        {"observers": [{"name": "tap", "programs": ["tap_*"], "filters": ["t.o*"],
                        "priority": 3}]}, "test",
    )  # fmt: skip
    assert config.observer_rules == (ObserverRule("tap", ("tap_*",), ("t.o*",)),)


# --- vendor roles ----------------------------------------------------------------------------


def test_roles_come_from_the_vendor_rules():
    roles = vendor_roles()
    assert roles["Retina"] == roles["Beyla"] == roles["Datadog"] == "observer"
    assert roles["Cilium"] == roles["Calico"] == "datapath"


def test_roles_can_be_given():
    found = find_shadowings([hook_report(clsact(1), cilium(2))], roles={"Cilium": "observer"})
    assert found[0].kind is ShadowKind.OBSERVER_HIDDEN


@pytest.mark.parametrize(
    ("verdict", "accepts"),
    [(TERMINAL, True), (TCX_PASS, True), (OK_OR_SHOT, True), (SHOT, False), (UNKNOWN, False),
     (TRANSPARENT, False)],
)  # fmt: skip
def test_what_accepts_a_packet(verdict: ClassifierVerdict, accepts: bool):
    assert passes(clsact(1, verdict)) is accepts


# --- text, JSON, metrics ---------------------------------------------------------------------


def _scan(*classifiers: Classifier) -> Scan:
    hooks = [hook_report(*classifiers)]
    result = analyse([_hook_classifiers(*classifiers)], DatadogTarget(priority=10))
    result.shadowings = find_shadowings(hooks)
    return Scan(
        inventories=[],
        catalogue=ProgramCatalogue(),
        verdicts={},
        datadog=datadog_settings(),
        result=result,
    )


def _schema() -> dict:
    return json.loads(resources.files("tcprio").joinpath("data/scan-schema-v1.json").read_text())


def test_the_text_report_lists_them_after_datadogs_conflicts_one_line_each():
    scan = _scan(
        retina(1, TERMINAL, position=0), cilium(2, position=1), datadog(10, position=2),
        clsact(20, name="late", position=3),
    )  # fmt: skip
    lines = render_text(scan, color=False, detail=True).splitlines()
    conflicts = next(i for i, line in enumerate(lines) if line.startswith("CONFLICTS"))
    section = next(i for i, line in enumerate(lines) if line.startswith("HIDDEN CLASSIFIERS"))
    inventory = next(i for i, line in enumerate(lines) if line.startswith("CLASSIFIERS BY"))
    assert conflicts < section < inventory
    assert lines[section] == "HIDDEN CLASSIFIERS (1 policy bypass, 1 hidden)"
    # one entry each (wrapped at 100 columns: continuation lines are indented deeper)
    body = [line for line in lines[section + 1 : inventory] if line.startswith("  ") and
            not line.startswith("   ")]  # fmt: skip
    assert body[0].startswith("  CRITICAL ns1 / eth0 egress [policy bypass]: Cilium bpf")
    assert body[1].startswith("  ERROR ns1 / eth0 egress [hidden]: bpf classifier 'late'")
    marks = [line.rsplit("<- ", 1)[-1] for line in lines[inventory:] if "<- " in line]
    # Cilium's filter stands in Datadog's way too: the conflict's mark wins on that line
    assert marks == ["CRITICAL", "ERROR", "Datadog", "hidden"]


def test_the_text_report_says_when_nothing_else_is_hidden():
    text = render_text(_scan(retina(1), datadog(10)), color=False, detail=True)
    assert "No other classifier is hidden by one before it." in text


def test_the_json_carries_them_and_keeps_to_the_schema():
    document = scan_json(_scan(retina(1, TERMINAL), cilium(2), clsact(3, UNKNOWN)))
    jsonschema.validate(document, _schema())
    assert document["summary"]["shadowed"] == {
        "observer_hidden": 0, "policy_bypass": 1, "hidden": 1,
    }  # fmt: skip
    first = document["shadowed"][0]
    assert (first["kind"], first["severity"], first["hidden_label"]) == (
        "policy_bypass", "critical", "Cilium",
    )  # fmt: skip
    assert first["blocker"]["vendor"] == "Retina" and first["other_blockers"] == 0


def test_a_document_without_them_still_keeps_to_the_schema():
    """Readers of version 1 documents made before these keys existed."""
    document = scan_json(_scan(retina(1)))
    del document["shadowed"], document["summary"]["shadowed"]
    jsonschema.validate(document, _schema())


def test_metrics_count_them_by_hook_kind_and_vendors():
    scan = _scan(retina(1, TERMINAL), cilium(2), cilium(3, name="x"), clsact(4, name="y"))
    snap = replace(Snapshot.empty("k"), ready=True, result=scan.result, generation=1)
    body = MetricsRenderer(lambda: snap)().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = families["tcprio_shadowed_classifiers"].samples
    by_kind = {(s.labels["kind"], s.labels["hidden_vendor"]): s.value for s in samples}
    assert by_kind == {("policy_bypass", "Cilium"): 2, ("hidden", ""): 1}
    assert {s.labels["blocker_vendor"] for s in samples} == {"Retina"}
    # bounded by default: no per-hook labels, whatever the number of pods
    assert set(samples[0].labels) == {
        "direction", "kind", "severity", "hidden_vendor", "blocker_vendor",
    }  # fmt: skip
    assert families["tcprio_shadowed_classifiers"].type == "gauge"
    full = MetricsRenderer(lambda: snap, lambda: MetricsConfig(full_inventory=True))()
    detail = {f.name: f for f in text_string_to_metric_families(full.decode())}
    assert {"netns", "interface"} <= set(detail["tcprio_shadowed_classifiers"].samples[0].labels)


def test_no_series_when_nothing_is_hidden():
    snap = replace(Snapshot.empty("k"), ready=True, result=_scan(retina(1)).result, generation=1)
    body = MetricsRenderer(lambda: snap)().decode()
    assert "tcprio_shadowed_classifiers{" not in body
    assert "# HELP tcprio_shadowed_classifiers" in body
