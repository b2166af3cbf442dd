"""Re-reading only the hooks that filter events touched gives what a full read gives."""

from __future__ import annotations

from tcprio.kernel.namespaces import discover_namespaces
from tcprio.kernel.tc_inventory import read_namespace, refresh_hooks
from tcprio.model import Direction
from tcprio.service.daemon import hooks_to_refresh
from tcprio.service.watch import TcEvent
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one

E, IN = Direction.EGRESS, Direction.INGRESS


def test_refreshing_the_touched_hook_equals_a_full_read(classifier_programs):
    with netns("refresh") as ns:
        for ifname in ("r0", "r2"):
            veth_in_one(ns, ifname, ifname + "p")
            add_clsact(ns, ifname)
        attach_filter(ns, "r0", E, 1, "term_ok")
        target = next(n for n in discover_namespaces() if n.name == ns.name)
        old = read_namespace(target)
        attach_filter(ns, "r0", E, 5, "term_shot")
        attach_filter(ns, "r0", IN, 3, "pass_unspec")
        refreshed = refresh_hooks(old, {ns.ifindex("r0"): {E, IN}})
        assert refreshed == read_namespace(target)
        # a hook outside the targets keeps its old reading
        attach_filter(ns, "r2", E, 9, "term_ok")
        partial = refresh_hooks(refreshed, {ns.ifindex("r0"): {E}})
        assert partial == refreshed


def test_which_events_allow_a_partial_read(classifier_programs):
    with netns("refresh2") as ns:
        veth_in_one(ns, "s0", "s1")
        add_clsact(ns, "s0")
        old = read_namespace(next(n for n in discover_namespaces() if n.name == ns.name))
    s0 = next(i.ifindex for i in old.interfaces if i.name == "s0")
    filter_add = TcEvent("filter-add", ifindex=s0, parent=0xFFFFFFF3, priority=5, handle=1)
    assert hooks_to_refresh([filter_add], old) == {s0: {E}}
    tcx_change = TcEvent("tcx-change", ifindex=s0, parent=0xFFFFFFF2)
    assert hooks_to_refresh([filter_add, tcx_change], old) == {s0: {E, IN}}
    assert hooks_to_refresh([filter_add, TcEvent("link-add", ifindex=99)], old) is None
    assert hooks_to_refresh([TcEvent("overrun")], old) is None
    assert hooks_to_refresh([TcEvent("qdisc-add", ifindex=s0, parent=0xFFFFFFF1)], old) is None
    assert hooks_to_refresh([TcEvent("filter-add", ifindex=999, parent=0xFFFFFFF2)], old) is None
    assert hooks_to_refresh([], old) is None
    assert hooks_to_refresh([filter_add], None) is None
