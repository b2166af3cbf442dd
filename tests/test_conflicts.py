"""The conflict rules, one by one, on plain data (the kernel-backed tests check the inputs)."""

from __future__ import annotations

from itertools import count

from tcprio.analysis.conflicts import DatadogTarget, HookClassifiers, analyse, execution_order
from tcprio.model import (
    Classifier,
    ClassifierVerdict,
    Direction,
    HookKind,
    Severity,
    VerdictClass,
)

TERMINAL = ClassifierVerdict(VerdictClass.TERMINAL, ("TC_ACT_OK",), "returns TC_ACT_OK")
TRANSPARENT = ClassifierVerdict(VerdictClass.TRANSPARENT, (), "returns TC_ACT_UNSPEC")
UNKNOWN = ClassifierVerdict(VerdictClass.UNKNOWN, (), "r0 loaded from memory")
DEFAULT = DatadogTarget(priority=10)
_ids = count(100)


def clsact(prio: int, verdict=TERMINAL, position=0, **kw) -> Classifier:
    return Classifier(
        hook=HookKind.CLSACT,
        position=position,
        prog_id=next(_ids),
        name=kw.pop("name", f"vendor_p{prio}"),
        vendor=kw.pop("vendor", None),
        verdict=verdict,
        priority=prio,
        handle=1,
        **kw,
    )


def tcx(verdict=TERMINAL, position=0) -> Classifier:
    return Classifier(
        hook=HookKind.TCX,
        position=position,
        prog_id=next(_ids),
        name="tcx_prog",
        vendor=None,
        verdict=verdict,
    )


def datadog(prio: int = 10, position: int = 0) -> Classifier:
    return clsact(prio, TRANSPARENT, position, name="classifier_egre", is_datadog=True)


def hook(*classifiers: Classifier, iface="eth0", direction=Direction.EGRESS) -> HookClassifiers:
    return HookClassifiers("ns1", iface, direction, tuple(classifiers))


def severities(result) -> list[Severity]:
    return [c.severity for c in result.conflicts]


def test_no_classifier_before_datadog_means_no_conflict():
    result = analyse([hook(datadog(), clsact(20))], DEFAULT)
    assert result.conflicts == []
    assert result.recommended_priority is None


def test_terminal_at_priority_1_is_critical_and_unfixable():
    result = analyse([hook(clsact(1))], DEFAULT)
    assert severities(result) == [Severity.CRITICAL]
    assert "priority 1" in result.conflicts[0].message
    assert result.recommended_priority is None


def test_terminal_between_2_and_datadog_is_an_error_with_the_priority_that_fixes_it():
    result = analyse([hook(clsact(5))], DEFAULT)
    assert severities(result) == [Severity.ERROR]
    assert result.recommended_priority == 4
    assert result.conflicts[0].recommended_priority == 4
    assert result.conflicts[0].blocker.priority == 5


def test_one_priority_fixes_every_interface_of_the_node():
    result = analyse([hook(clsact(5), iface="a"), hook(clsact(3), iface="b")], DEFAULT)
    assert severities(result) == [Severity.ERROR, Severity.ERROR]
    assert result.recommended_priority == 2
    assert {c.recommended_priority for c in result.conflicts} == {2}


def test_recommendation_skips_priorities_taken_by_other_filters():
    hooks = [hook(clsact(3), iface="a"), hook(clsact(2, TRANSPARENT), iface="b")]
    result = analyse(hooks, DEFAULT)
    assert result.recommended_priority == 1
    assert "priority 1" in result.recommendation_note and "Cilium" in result.recommendation_note


def test_no_priority_left_is_said_plainly():
    u32_at_1 = clsact(1, TERMINAL, position=1, kind="u32")  # the kernel refuses bpf beside it
    result = analyse([hook(clsact(2), u32_at_1)], DEFAULT)
    assert severities(result) == [Severity.CRITICAL, Severity.ERROR]
    assert result.recommended_priority is None
    assert result.recommendation_note.startswith("no classifier_priority fixes")


def test_a_priority_shared_only_with_transparent_filters_is_recommended_with_its_risk():
    result = analyse([hook(clsact(2), clsact(1, TRANSPARENT, position=1))], DEFAULT)
    assert severities(result) == [Severity.ERROR]
    assert result.recommended_priority == 1
    note = result.recommendation_note
    assert "shared only with transparent filters" in note and "deletes Datadog's" in note


def test_a_free_priority_beats_one_shared_with_transparent_filters():
    hooks = [hook(clsact(4), iface="a"), hook(clsact(3, TRANSPARENT), iface="b")]
    result = analyse(hooks, DEFAULT)
    assert result.recommended_priority == 2
    assert "used by no other filter" in result.recommendation_note


def test_a_shared_priority_is_not_taken_when_one_holder_is_terminal_or_another_protocol():
    arp = clsact(1, TRANSPARENT, position=1, protocol=0x0806)
    result = analyse([hook(clsact(2), arp)], DEFAULT)
    assert result.recommended_priority is None


def test_the_recommendation_stays_below_filters_datadog_meets_once_it_re_attaches():
    """Hook a: Datadog still at an older priority 2, before a terminal filter at 5; once it
    re-attaches at the recommended priority, that filter must still come after it."""
    a = hook(datadog(2), clsact(5, position=1), iface="a")
    b = hook(clsact(8), iface="b")
    result = analyse([a, b], DEFAULT)
    assert [(c.interface, c.severity) for c in result.conflicts] == [("b", Severity.ERROR)]
    assert result.recommended_priority == 4


def test_terminal_after_datadog_is_listed_not_a_conflict():
    result = analyse([hook(clsact(11), clsact(20))], DEFAULT)
    assert result.conflicts == []
    assert len(result.hooks[0].classifiers) == 2


def test_transparent_before_datadog_is_not_a_conflict():
    assert analyse([hook(clsact(5, TRANSPARENT))], DEFAULT).conflicts == []


def test_unknown_before_datadog_is_a_warning_and_does_not_move_the_priority():
    result = analyse([hook(clsact(5, UNKNOWN))], DEFAULT)
    assert severities(result) == [Severity.WARNING]
    assert result.recommended_priority is None


def test_terminal_tcx_is_critical_whatever_datadogs_priority():
    result = analyse([hook(tcx(), datadog(1))], DatadogTarget(priority=1))
    assert severities(result) == [Severity.CRITICAL]
    assert "tcx" in result.conflicts[0].message


def test_transparent_tcx_is_fine_and_unknown_tcx_is_a_warning():
    assert analyse([hook(tcx(TRANSPARENT))], DEFAULT).conflicts == []
    assert severities(analyse([hook(tcx(UNKNOWN))], DEFAULT)) == [Severity.WARNING]


def test_same_priority_attached_vendor_first_in_list_is_an_error():
    vendor = clsact(10, position=0)
    result = analyse([hook(vendor, datadog(10, position=1))], DEFAULT)
    assert severities(result) == [Severity.ERROR]
    assert "same priority 10" in result.conflicts[0].message
    assert result.recommended_priority == 9


def test_same_priority_attached_datadog_first_in_list_is_fine():
    result = analyse([hook(datadog(10, position=0), clsact(10, position=1))], DEFAULT)
    assert result.conflicts == []


def test_same_priority_not_attached_terminal_bpf_is_a_race_warning():
    result = analyse([hook(clsact(10))], DEFAULT)
    assert severities(result) == [Severity.WARNING]
    assert "re-adds" in result.conflicts[0].message


def test_same_priority_not_attached_other_kind_or_protocol_refuses_datadog():
    u32 = clsact(10, TERMINAL, kind="u32")
    ipv4_only = clsact(10, TRANSPARENT, protocol=0x0800)
    for blocker in (u32, ipv4_only):
        result = analyse([hook(blocker)], DEFAULT)
        assert severities(result) == [Severity.ERROR]
        assert "refuses" in result.conflicts[0].message
        assert result.recommended_priority == 9


def test_observed_datadog_position_wins_over_configured_priority():
    result = analyse([hook(clsact(11), datadog(12, position=1))], DEFAULT)
    assert severities(result) == [Severity.ERROR]
    assert result.conflicts[0].datadog_priority == 12
    assert result.conflicts[0].datadog_attached
    assert result.recommended_priority == 10
    assert "sits at priority 12 here, not at the configured 10" in result.hooks[0].notes[0]


def test_priority_1_shared_with_datadog_is_critical():
    result = analyse([hook(clsact(1, position=0), datadog(1, position=1))], DEFAULT)
    assert severities(result) == [Severity.CRITICAL]


def test_other_chains_do_not_run_before_datadog():
    result = analyse([hook(clsact(1, chain=1))], DEFAULT)
    assert result.conflicts == []


def test_protocol_specific_blocker_says_which_packets():
    result = analyse([hook(clsact(5, protocol=0x86DD))], DEFAULT)
    assert "protocol ipv6 packets" in result.conflicts[0].message


def test_direction_without_a_datadog_classifier_is_not_analysed():
    target = DatadogTarget(priority=10, directions=frozenset({Direction.EGRESS}))
    result = analyse([hook(clsact(1), direction=Direction.INGRESS)], target)
    assert result.conflicts == []
    assert "no ingress classifier" in result.hooks[0].notes[0]
    attached = hook(clsact(1), datadog(10, position=1), direction=Direction.INGRESS)
    assert severities(analyse([attached], target)) == [Severity.CRITICAL]


def test_disabled_network_detection_downgrades_everything_to_info():
    result = analyse([hook(clsact(1)), hook(clsact(5), iface="b")], DatadogTarget(10, False))
    assert severities(result) == [Severity.INFO, Severity.INFO]
    assert result.recommended_priority is None
    assert "disabled" in result.notes[0]


def test_conflicts_are_sorted_most_severe_first():
    result = analyse(
        [hook(clsact(5, UNKNOWN), clsact(6, position=1), clsact(1, position=2))], DEFAULT
    )
    assert severities(result) == [Severity.CRITICAL, Severity.ERROR, Severity.WARNING]


def test_execution_order_is_tcx_then_priority_then_list_order_then_other_chains():
    a = tcx(position=1)
    b = tcx(position=0)
    c = clsact(5, position=3)
    d = clsact(5, position=2)
    e = clsact(1, position=4)
    f = clsact(1, position=0, chain=2)
    assert execution_order([a, c, f, e, d, b]) == (b, a, e, d, c, f)
