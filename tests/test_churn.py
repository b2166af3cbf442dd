"""Churn detection between two readings of a namespace (pure)."""

from __future__ import annotations

from tcprio.analysis.churn import (
    CAUSE_WINDOW_S,
    Change,
    HookEvent,
    describe_cause,
    diff_inventories,
    likely_cause,
)
from tcprio.model import (
    Direction,
    HookInventory,
    Interface,
    NamespaceInventory,
    NetNamespace,
    TcFilter,
    TcxEntry,
)
from tcprio.service.hook_history import HookHistory, removals
from tcprio.service.watch import TcEvent

NS = NetNamespace(inode=1, dev=1, name="pod:web", path="/x", source="named")
E = Direction.EGRESS


def bpf(prio: int, handle: int, prog_id: int, name: str) -> TcFilter:
    return TcFilter(kind="bpf", chain=0, priority=prio, handle=handle, protocol=3,
                    position=0, direct_action=True, name=name, prog_id=prog_id)  # fmt: skip


def inventory(*filters: TcFilter, interfaces=("eth0",)) -> NamespaceInventory:
    hooks = (HookInventory(E, "clsact", tuple(filters)), HookInventory(Direction.INGRESS, "clsact"))
    return NamespaceInventory(
        NS, tuple(Interface(i + 2, n, hooks) for i, n in enumerate(interfaces))
    )


def is_datadog(f: TcFilter) -> bool:
    return (f.name or "").startswith("classifier/")


def kinds(changes) -> list[tuple[str, int, int | None, int | None]]:
    return sorted((c.kind, c.priority, c.old_prog_id, c.new_prog_id) for c in changes)


def test_nothing_changed_means_no_change():
    same = inventory(bpf(1, 1, 10, "cni"), bpf(10, 1, 20, "classifier/egress_1_2"))
    assert diff_inventories(same, same, is_datadog) == []


def test_add_delete_and_replace_at_the_same_priority_and_handle():
    old = inventory(bpf(1, 1, 10, "cni"), bpf(5, 1, 11, "other"))
    new = inventory(bpf(1, 1, 12, "cni"), bpf(7, 1, 13, "late"))
    assert kinds(diff_inventories(old, new, is_datadog)) == [
        ("add", 7, None, 13),
        ("delete", 5, 11, None),
        ("replace", 1, 10, 12),
    ]


def test_a_datadog_classifier_gone_from_a_remaining_hook_is_a_disappearance():
    old = inventory(bpf(1, 1, 10, "cni"), bpf(10, 1, 20, "classifier/egress_1_2"))
    new = inventory(bpf(1, 1, 10, "cni"))
    changes = diff_inventories(old, new, is_datadog)
    assert kinds(changes) == [("datadog-disappeared", 10, 20, None), ("delete", 10, 20, None)]
    event = next(c for c in changes if c.kind == "datadog-disappeared").as_log()
    assert event["event"] == "datadog-disappeared" and event["interface"] == "eth0"


def test_cilium_replacing_datadogs_prio_1_handle_1_is_a_replace_and_a_disappearance():
    old = inventory(bpf(1, 1, 20, "classifier/egress_1_2"))
    new = inventory(bpf(1, 1, 30, "bpf_lxc.o:[from-container]"))
    assert kinds(diff_inventories(old, new, is_datadog)) == [
        ("datadog-disappeared", 1, 20, None),
        ("replace", 1, 20, 30),
    ]


def test_a_vanished_interface_or_namespace_is_not_a_disappearance():
    old = inventory(bpf(10, 1, 20, "classifier/egress_1_2"), interfaces=("eth0", "eth1"))
    new = inventory(interfaces=("eth0",))
    changes = diff_inventories(old, new, is_datadog)
    assert ("datadog-disappeared", 10, 20, None) in kinds(changes)  # eth0 remains, lost it
    assert [c.interface for c in changes if c.kind == "datadog-disappeared"] == ["eth0"]
    assert all(c.kind == "delete" for c in diff_inventories(old, None, is_datadog))


# --- the likely cause of a disappearance --------------------------------------------------------

T0 = 1_800_000_000.0  # a wall-clock time
EGRESS_PARENT, CLSACT = 0xFFFFFFF3, 0xFFFFFFF1


def gone(interface: str = "eth0") -> Change:
    return Change("datadog-disappeared", "pod:web", interface, E, 10, 1, 20, None,
                  "classifier_egress_0_4242")  # fmt: skip


def test_the_nearest_event_within_the_window_is_the_likely_cause():
    tcx = HookEvent("tcx-attach", T0 - 0.2, "cil_to_container", "Cilium")
    old = HookEvent("qdisc-delete", T0 - CAUSE_WINDOW_S - 0.1)
    assert likely_cause(T0, [old, tcx]) == tcx
    assert likely_cause(T0, [old]) is None
    assert likely_cause(T0, []) is None


def test_the_cause_says_what_went_from_where_and_why():
    tcx = HookEvent("tcx-attach", T0 - 0.2, "cil_to_container", "Cilium")
    assert describe_cause(gone(), tcx, T0, "classifier_egress") == (
        "Datadog's classifier classifier_egress (filter classifier_egress_0_4242) disappeared "
        "from pod:web/eth0 egress 0.2 s after a tcx program cil_to_container (Cilium) was "
        "attached there: Cilium >= 1.16 deletes legacy tc filters when it moves to tcx"
    )
    unknown = HookEvent("tcx-attach", T0 + 0.3, "mystery", None)
    text = describe_cause(gone(), unknown, T0, None)
    assert "classifier classifier_egress_0_4242 disappeared" in text
    assert "0.3 s before tcprio saw a tcx program mystery attached there: tools moving" in text
    qdisc = describe_cause(gone(), HookEvent("qdisc-delete", T0), T0, "classifier_egress")
    assert "0.0 s after its clsact qdisc was deleted: deleting the clsact qdisc" in qdisc


def test_removals_are_dated_per_hook_and_priority_and_a_qdisc_for_every_priority():
    names = {2: "eth0"}
    found = removals("pod:web", names, [
        TcEvent("filter-delete", 2, EGRESS_PARENT, 10, 1, at=T0),
        TcEvent("filter-add", 2, EGRESS_PARENT, 1, 1, replace=True, at=T0 + 1),
        TcEvent("filter-add", 2, EGRESS_PARENT, 5, 1, at=T0 + 2),  # an add removes nothing
        TcEvent("qdisc-delete", 2, CLSACT, at=T0 + 3),
        TcEvent("filter-delete", 9, EGRESS_PARENT, 10, 1, at=T0),  # an unknown interface
        TcEvent("filter-delete", 2, EGRESS_PARENT, 7, 1),  # not dated
    ])  # fmt: skip
    assert found == {
        ("pod:web", "eth0", "egress", 10): T0,
        ("pod:web", "eth0", "egress", 1): T0 + 1,
        ("pod:web", "eth0", "egress", None): T0 + 3,
        ("pod:web", "eth0", "ingress", None): T0 + 3,
    }


def tcx_inventory(*prog_ids: int) -> NamespaceInventory:
    tcx = tuple(TcxEntry(p, n, link_id=p + 1000) for n, p in enumerate(prog_ids))
    hooks = (HookInventory(E, "clsact", (), tcx), HookInventory(Direction.INGRESS, "clsact"))
    return NamespaceInventory(NS, (Interface(2, "eth0", hooks),))


def test_a_tcx_program_new_in_a_reading_is_dated_by_the_first_poll_that_listed_its_link():
    history = HookHistory()
    history.links_listed([1042], T0 - 0.5)
    names = {42: "cil_to_container", 20: "classifier_egress"}
    history.note_reading("pod:web", tcx_inventory(), tcx_inventory(42), {}, names.get, T0)
    removed = {("pod:web", "eth0", "egress", 10): T0}
    explained = history.explain(gone(), removed, names.get, T0 + 0.05)
    assert explained.cause is not None and "0.5 s after a tcx program cil_to_container" in (
        explained.cause
    )
    assert explained.as_log()["cause"] == explained.cause
    assert history.explain(gone("eth1"), removed, names.get, T0).cause is None  # another hook


def test_a_tcx_program_long_there_or_a_first_reading_explains_nothing():
    history = HookHistory()
    names = {42: "cil_to_container"}.get
    history.note_reading("pod:web", None, tcx_inventory(42), {}, names, T0)  # first reading
    history.note_reading("pod:web", tcx_inventory(42), tcx_inventory(42), {}, names, T0 + 5)
    removed = {("pod:web", "eth0", "egress", 10): T0 + 5}
    assert history.explain(gone(), removed, names, T0 + 5).cause is None
    history.note_reading("pod:web", tcx_inventory(), tcx_inventory(42), {}, names, T0 + 5)
    later = {("pod:web", "eth0", "egress", 10): T0 + 8}  # 3 s after the attach
    assert history.explain(gone(), later, names, T0 + 8).cause is None


def test_a_cause_recorded_after_the_disappearance_comes_as_a_follow_up():
    history = HookHistory()
    names = {42: "cil_to_container", 20: "classifier_egress"}.get
    removed = {("pod:web", "eth0", "egress", 10): T0}
    assert history.explain(gone(), removed, names, T0).cause is None
    assert history.late_causes(T0 + 0.1) == []  # nothing yet: it keeps waiting
    history.links_listed([1042], T0 + 0.4)  # attached after the deletion, listed by a poll
    history.note_reading("pod:web", tcx_inventory(), tcx_inventory(42), {}, names, T0 + 0.5)
    (late,) = history.late_causes(T0 + 0.5)
    assert late.kind == "datadog-disappearance-cause"
    assert "0.4 s before tcprio saw a tcx program cil_to_container (Cilium)" in late.cause
    assert late.as_log()["event"] == "datadog-disappearance-cause"
    assert history.late_causes(T0 + 0.6) == []  # said once


def test_an_unexplained_disappearance_is_forgotten_and_never_explained_late():
    history = HookHistory()
    names = {42: "cil_to_container"}.get
    history.explain(gone(), {("pod:web", "eth0", "egress", 10): T0}, names, T0)
    history.note_reading("pod:web", tcx_inventory(), tcx_inventory(42), {}, names, T0 + 3)
    assert history.late_causes(T0 + 3) == []  # 3 s apart: no cause
    assert history.late_causes(T0 + 60) == [] and history.unexplained == []
