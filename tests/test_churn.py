"""Churn detection between two readings of a namespace (pure)."""

from __future__ import annotations

from tcprio.analysis.churn import diff_inventories
from tcprio.model import (
    Direction,
    HookInventory,
    Interface,
    NamespaceInventory,
    NetNamespace,
    TcFilter,
)

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
