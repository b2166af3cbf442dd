"""Filters the kernel shares between hooks: u32 hash tables and shared blocks.

u32 hash tables belong to the qdisc (or the shared block): the dump of a u32 instance lists
every table at its priority, the other direction's and other chains' too, so a naive reader
sees phantom filters (and phantom conflicts). A shared block's filters run on every hook
bound to it: they are reported on each hook, once, with the block's index.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcprio.model import ETH_P_ALL, Direction, VerdictClass
from tests.bpf_programs import ClassifierPrograms, attach_filter, shared_programs
from tests.kernel import TestNetns, netns, veth, veth_in_one
from tests.test_action_verdicts import MIRROR
from tests.test_run_counters import (  # noqa: F401 (the fixture)
    PACKETS,
    RECEIVER_IP,
    SENDER_IP,
    _traffic_deltas,
    pair,
)
from tests.test_scan_kernel import datadog_settings, scan_only

E, IN = Direction.EGRESS, Direction.INGRESS


def _u32(ns: TestNetns, *argv: str) -> None:
    ns.tc("filter", "add", *argv)


def _hook_filters(scan, ifname: str, direction: Direction):
    inventory = scan.inventories[0]
    interface = next(i for i in inventory.interfaces if i.name == ifname)
    return next(h for h in interface.hooks if h.direction is direction)


def _tc_u32_keys(ns: TestNetns, ifname: str, direction: Direction) -> list[tuple[int, str]]:
    """(priority, handle) of every u32 key `tc -j filter show` lists, phantoms included."""
    keys = []
    for entry in ns.tc_json("filter", "show", "dev", ifname, str(direction)):
        options = entry.get("options") or {}
        if entry.get("kind") == "u32" and "fh" in options and "divisor" not in str(options):
            keys.append((entry["pref"], options["fh"]))
    return keys


def test_u32_keys_of_the_other_direction_and_chain_are_not_read_as_this_hooks(
    pair,  # noqa: F811
    classifier_programs: ClassifierPrograms,
):
    tx, rx = pair
    veth_in_one(tx, "m0", "m1")
    _u32(tx, "dev", "a0", "egress", "prio", "5", "protocol", "all", "u32",
         "match", "u32", "0", "0", *MIRROR, "continue")  # fmt: skip
    _u32(tx, "dev", "a0", "ingress", "prio", "5", "protocol", "all", "u32",
         "match", "u32", "0", "0", "classid", "1:1")  # fmt: skip
    _u32(tx, "dev", "a0", "egress", "chain", "1", "prio", "5", "protocol", "all", "u32",
         "match", "u32", "0", "0", "classid", "1:3")  # fmt: skip
    attach_filter(tx, "a0", E, 10, "classifier_egress")
    _, runs, _ = _traffic_deltas(classifier_programs, tx, rx, ["classifier_egress"])
    assert runs["classifier_egress"] >= PACKETS  # nothing on egress chain 0 ends the chain
    # The kernel's dump of egress shows the ingress key and the chain 1 key in chain 0 too.
    assert len(_tc_u32_keys(tx, "a0", E)) > 2
    scan = scan_only({tx.name}, datadog_settings())
    egress = _hook_filters(scan, "a0", E)
    ingress = _hook_filters(scan, "a0", IN)
    u32_out = [(f.chain, f.classid) for f in egress.filters if f.kind == "u32"]
    assert sorted(u32_out, key=str) == [(0, None), (1, 0x10003)]
    assert [(f.chain, f.classid) for f in ingress.filters] == [(0, 0x10001)]
    assert [c for c in scan.result.conflicts if c.direction is E] == []


@pytest.mark.parametrize(("control", "runs_later"), [("pipe", False), ("continue", True)])
def test_u32_hash_table_keys_count_once_through_their_link(
    pair,  # noqa: F811
    classifier_programs: ClassifierPrograms,
    control: str,
    runs_later: bool,
):
    tx, rx = pair
    veth_in_one(tx, "m0", "m1")
    bucket = RECEIVER_IP.rsplit(".", 1)[1]  # hashkey: the last byte of the destination
    _u32(tx, "dev", "a0", "egress", "prio", "5", "handle", "2:", "protocol", "ip", "u32",
         "divisor", "256")  # fmt: skip
    _u32(tx, "dev", "a0", "egress", "prio", "5", "protocol", "ip", "u32", "ht", "800::",
         "match", "ip", "dst", f"{RECEIVER_IP}/32", "hashkey", "mask", "0x000000ff", "at", "16",
         "link", "2:")  # fmt: skip
    _u32(tx, "dev", "a0", "egress", "prio", "5", "protocol", "ip", "u32",
         "ht", f"2:{int(bucket):x}:", "match", "ip", "src", f"{SENDER_IP}/32",
         *MIRROR, control)  # fmt: skip
    _u32(tx, "dev", "a0", "ingress", "prio", "5", "protocol", "ip", "u32",
         "match", "u32", "0", "0", "classid", "1:1")  # fmt: skip
    attach_filter(tx, "a0", E, 10, "classifier_egress")
    _, runs, _ = _traffic_deltas(classifier_programs, tx, rx, ["classifier_egress"])
    assert (runs["classifier_egress"] >= PACKETS) is runs_later
    # protocol ip: the ARP exchange may still reach priority 10, never the datagrams
    scan = scan_only({tx.name}, datadog_settings())
    egress = _hook_filters(scan, "a0", E)
    keys = {f.handle >> 20: f for f in egress.filters if f.kind == "u32"}
    assert sorted(keys) == [0x2, 0x800]  # the link key and the hashed key, nothing else
    assert keys[0x800].u32_link == 0x200000
    assert keys[0x800].classid is None
    verdicts = {c.handle >> 20: c.verdict.verdict_class for c in _classifiers(scan, "a0", E)}
    assert verdicts[0x800] is VerdictClass.TRANSPARENT
    expected = VerdictClass.TRANSPARENT if runs_later else VerdictClass.TERMINAL
    assert verdicts[0x2] is expected
    conflicts = [(c.interface, c.blocker.handle) for c in scan.result.conflicts if c.direction is E]
    assert conflicts == ([] if runs_later else [("a0", keys[0x2].handle)])


def _classifiers(scan, ifname: str, direction: Direction):
    hook = next(h for h in scan.result.hooks if h.interface == ifname and h.direction is direction)
    return [c for c in hook.classifiers if c.kind == "u32"]


@pytest.fixture
def shared_block() -> Iterator[tuple[TestNetns, TestNetns]]:
    """a0 (towards rx) and c0 share ingress block 22 and egress block 23."""
    with netns("sbtx") as tx, netns("sbrx") as rx:
        veth(tx, "a0", rx, "b0")
        veth_in_one(tx, "c0", "c1")
        veth_in_one(tx, "m0", "m1")
        tx.ip("addr", "add", f"{SENDER_IP}/30", "dev", "a0")
        rx.ip("addr", "add", f"{RECEIVER_IP}/30", "dev", "b0")
        for dev in ("a0", "c0"):
            tx.tc("qdisc", "add", "dev", dev, "ingress_block", "22", "egress_block", "23",
                  "clsact")  # fmt: skip
        yield tx, rx


def _attach_to_block(ns: TestNetns, block: int, prio: int, prog_name: str) -> None:
    """A direct-action cls_bpf filter on shared block `block` (tcm_ifindex names the block)."""
    from pyroute2 import IPRoute

    with ns.entered(), IPRoute() as ipr:
        ipr.tc(
            "add-filter", "bpf", -1, None,  # TCM_IFINDEX_MAGIC_BLOCK, as pyroute2 packs it
            fd=classifier_programs_fd(prog_name), name=prog_name, parent=block, classid=1,
            direct_action=True, prio=prio, protocol=ETH_P_ALL,
        )  # fmt: skip


def classifier_programs_fd(name: str) -> int:
    return shared_programs().fd(name)


def test_a_shared_block_is_reported_on_each_hook_once(
    shared_block, classifier_programs: ClassifierPrograms
):
    tx, rx = shared_block
    for block in ("22", "23"):
        _u32(tx, "block", block, "prio", "5", "protocol", "all", "u32",
             "match", "u32", "0", "0", *MIRROR, "pipe")  # fmt: skip
    _attach_to_block(tx, 23, 10, "classifier_egress")  # Datadog's, on both devices' egress
    arrived, runs, _ = _traffic_deltas(classifier_programs, tx, rx, ["classifier_egress"])
    assert arrived == PACKETS and runs["classifier_egress"] == 0
    scan = scan_only({tx.name}, datadog_settings())
    for dev in ("a0", "c0"):
        for direction, block in ((IN, 22), (E, 23)):
            hook = _hook_filters(scan, dev, direction)
            assert hook.block == block
            kinds = [(f.priority, f.kind) for f in hook.filters]
            assert kinds == ([(5, "u32")] if direction is IN else [(5, "u32"), (10, "bpf")])
            u32 = _classifiers(scan, dev, direction)
            assert len(u32) == 1 and u32[0].verdict.verdict_class is VerdictClass.TERMINAL
    egress = [c for c in scan.result.conflicts if c.direction is E]
    conflicts = sorted((c.interface, c.direction, c.blocker.priority) for c in egress)
    assert conflicts == [("a0", E, 5), ("c0", E, 5)]
    assert all("shared block 23" in c.message for c in egress)
