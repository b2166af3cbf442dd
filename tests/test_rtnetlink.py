"""tcprio's own netlink reader against pyroute2 on the same kernel state, and on bad bytes.

`tc_inventory` reads through `rtnetlink` (hand-unpacked dumps, for speed); the reference is
tcprio's earlier pyroute2-based reader (tests/pyroute2_reference.py). Both must give the same
inventory for every kind of hook the scan scene builds, plus filters with actions.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcprio.kernel import rtnetlink, tc_inventory
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.kernel.rtnetlink import NetlinkError, RtnlSocket, parse_attrs
from tcprio.model import NetNamespace
from tests import pyroute2_reference
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_scan_kernel import Scene, scene  # noqa: F401  (the module-scoped fixture)


def namespace(name: str) -> NetNamespace:
    return next(ns for ns in discover_namespaces() if ns.name == name)


def test_same_inventory_as_pyroute2_on_the_scan_scene(scene: Scene):  # noqa: F811
    ns = namespace(scene.ns.name)
    ours = tc_inventory.read_namespace(ns)
    reference = pyroute2_reference.read_namespace(ns)
    assert ours is not None and ours.error is None
    assert ours == reference
    assert sum(len(h.filters) for i in ours.interfaces for h in i.hooks) >= 20


def test_same_inventory_with_actions_and_classids(classifier_programs):
    with netns("rtnl") as ns:
        veth_in_one(ns, "a0", "a1")
        add_clsact(ns, "a0")
        ns.tc("filter", "add", "dev", "a0", "ingress", "prio", "3", "protocol", "ip", "u32",
              "match", "ip", "dst", "10.9.0.1/32", "classid", "1:7",
              "action", "mirred", "egress", "redirect", "dev", "a1")  # fmt: skip
        ns.tc("filter", "add", "dev", "a0", "egress", "prio", "4", "protocol", "ipv6", "u32",
              "match", "u32", "0", "0", "flowid", "1:9",
              "action", "mirred", "egress", "mirror", "dev", "a1",
              "action", "mirred", "egress", "redirect", "dev", "a1")  # fmt: skip
        attach_filter(ns, "a0", "ingress", 7, "classid_match", direct_action=False)
        attach_filter(ns, "a0", "egress", 1, "term_ok", filter_name="a_name_of_fifteen+")
        ours = tc_inventory.read_namespace(namespace(ns.name))
        assert ours == pyroute2_reference.read_namespace(namespace(ns.name))
    a0 = next(i for i in ours.interfaces if i.name == "a0")
    ingress, egress = a0.hooks
    u32_in = next(f for f in ingress.filters if f.kind == "u32")
    assert (u32_in.classid, u32_in.actions, u32_in.protocol) == (0x10007, ("mirred",), 0x0800)
    u32_out = next(f for f in egress.filters if f.kind == "u32")
    assert u32_out.actions == ("mirred", "mirred") and u32_out.classid == 0x10009
    bpf_in = next(f for f in ingress.filters if f.kind == "bpf")
    assert bpf_in.direct_action is False and bpf_in.classid == 1
    bpf_out = next(f for f in egress.filters if f.kind == "bpf")
    assert bpf_out.name == "a_name_of_fifteen+" and bpf_out.direct_action is True
    assert bpf_out.prog_id == classifier_programs.prog_id("term_ok")
    assert len(bpf_out.tag) == 16


def test_a_dump_for_an_interface_that_does_not_exist_is_empty():
    """The kernel answers a filter dump for a vanished ifindex with nothing, not an error:
    the interface simply has no filters left (its qdisc went with it)."""
    with netns("rtnl") as ns, ns.entered(), RtnlSocket() as rtnl:
        assert rtnl.filters(4242, 0xFFFFFFF2) == []
        assert [link.name for link in rtnl.links()] == ["lo"]


def test_a_kernel_error_is_raised_with_its_errno():
    with (
        netns("rtnl") as ns,
        ns.entered(),
        RtnlSocket() as rtnl,
        pytest.raises(NetlinkError) as raised,
    ):
        rtnl.dump(0x7F, b"")  # no such message type
    assert raised.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)


# --- bad bytes -------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def test_attributes_are_read_in_order_and_the_first_of_a_type_wins():
    data = attr(1, b"clsact\0") + attr(2, struct.pack("=I", 7)) + attr(1, b"other\0")
    attrs = parse_attrs(data)
    assert rtnetlink.as_str(attrs[1]) == "clsact"
    assert rtnetlink.as_u32(attrs[2]) == 7


def test_nested_flag_is_masked_from_the_type():
    data = attr(2 | 0x8000, attr(7, b"name\0"))
    assert rtnetlink.as_str(parse_attrs(parse_attrs(data)[2])[7]) == "name"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        struct.pack("=HH", 2, 1),  # shorter than its own header
        struct.pack("=HH", 200, 1) + b"x" * 8,  # longer than the buffer
        attr(1, b"ok\0") + struct.pack("=HH", 3, 9),  # a whole attribute, then garbage
    ],
)
def test_truncated_attributes_stop_the_walk_without_raising(data: bytes):
    attrs = parse_attrs(data)
    assert all(isinstance(v, memoryview) for v in attrs.values())
    if data.startswith(attr(1, b"ok\0")):
        assert rtnetlink.as_str(attrs[1]) == "ok"


@given(st.binary(max_size=512))
def test_any_bytes_parse_without_raising(data: bytes):
    for payload in parse_attrs(data).values():
        rtnetlink.as_str(payload)
        rtnetlink.as_u32(payload)
    rtnetlink.attr_list(data)
    rtnetlink.action_kinds({7: memoryview(data)}, "u32")
