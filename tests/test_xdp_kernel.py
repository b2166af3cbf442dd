"""XDP programs against this kernel: what tcprio reads and decides, against run counters on real
traffic, against `ip -j link show`, and in the daemon.

A veth pair between two test namespaces: the sender's `xs0` and the receiver's `xr0`. An XDP
program on `xr0` (generic or native mode, attached through a BPF link) runs on receive, before
`xr0`'s tc ingress, where a Datadog-like classifier (TC_ACT_UNSPEC at priority 10, counted by BPF
run statistics) sits on clsact. The sender has a static neighbour entry: an XDP_DROP would drop
ARP too, and then no datagram would leave.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls.syscall import BpfCmd, LinkCreateAttr, bpf
from tcprio.kernel.tc_inventory import read_current_namespace
from tcprio.model import Direction, HookKind, NetNamespace, Severity, VerdictClass
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth

SENDER_IP, RECEIVER_IP = "169.254.215.1", "169.254.215.2"
PACKETS = 20
RECEIVE_WAIT_S = 2.0  # per datagram: dropped ones never come
DD_FILTER = "classifier_ingress_0_4242"  # Datadog's filter naming: <section>_<uid>_<pid>
XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
LINK_POLL_S = 0.2  # tcx_poll_interval_seconds in the configuration of tests/test_daemon.py
XDP_FLAGS = {"skb": 2, "drv": 4}  # XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE


def returning(prog_type: int, value: int, name: str) -> int:
    """A program `r0 = value; exit` (fd)."""
    code = struct.pack("<BBhi", 0xB7, 0, 0, value) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    return bpf_syscalls.prog_load_raw(prog_type, code, name)


def runs(fd: int) -> int:
    return bpf_syscalls.prog_info_from_fd(fd, with_insns=False).run_cnt


@dataclass
class Pair:
    sender: TestNetns
    receiver: TestNetns
    fds: list[int]

    def xdp(self, value: int, name: str, mode: str = "skb") -> tuple[int, int]:
        """An XDP program on xr0 through a BPF link: (program fd, link fd; closing detaches)."""
        fd = returning(bpf_syscalls.BPF_PROG_TYPE_XDP, value, name)
        self.fds.append(fd)
        with self.receiver.entered():
            attr = LinkCreateAttr(
                prog_fd=fd, target_ifindex=socket.if_nametoindex("xr0"),
                attach_type=bpf_syscalls.BPF_XDP, flags=XDP_FLAGS[mode],
            )  # fmt: skip
            link = bpf(BpfCmd.LINK_CREATE, attr)
        self.fds.append(link)
        return fd, link

    def datadog_like(self) -> int:
        """classifier_ingress at priority 10 on xr0's clsact ingress, returning UNSPEC."""
        fd = returning(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, -1, "classifier_ingress")
        self.fds.append(fd)
        add_clsact(self.receiver, "xr0")
        attach_filter(self.receiver, "xr0", Direction.INGRESS, 10, "dd", prog_fd=fd,
                      filter_name=DD_FILTER)  # fmt: skip
        return fd

    def close(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)


@contextlib.contextmanager
def xdp_pair(sender_label: str = "xs", receiver_label: str = "xr") -> Iterator[Pair]:
    with netns(sender_label) as sender, netns(receiver_label) as receiver:
        found = Pair(sender, receiver, [])
        try:
            veth(sender, "xs0", receiver, "xr0")
            sender.ip("addr", "add", f"{SENDER_IP}/30", "dev", "xs0")
            receiver.ip("addr", "add", f"{RECEIVER_IP}/30", "dev", "xr0")
            mac = json.loads(receiver.ip("-j", "link", "show", "xr0").stdout)[0]["address"]
            sender.ip("neigh", "replace", RECEIVER_IP, "lladdr", mac, "dev", "xs0",
                      "nud", "permanent")  # fmt: skip
            yield found
        finally:
            for fd in reversed(found.fds):
                with contextlib.suppress(OSError):
                    os.close(fd)


@pytest.fixture
def pair() -> Iterator[Pair]:
    with xdp_pair() as found:
        yield found


def send_udp(pair: Pair, port: int = 40215) -> int:
    """Send PACKETS datagrams to the receiver; how many arrived (a short wait)."""
    with pair.receiver.entered():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pair.sender.entered():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    arrived = 0
    with rx, tx:
        rx.bind((RECEIVER_IP, port))
        rx.settimeout(RECEIVE_WAIT_S)
        for i in range(PACKETS):
            tx.sendto(f"tcprio {i}".encode(), (RECEIVER_IP, port))
        with contextlib.suppress(TimeoutError):
            while arrived < PACKETS:
                rx.recv(64)
                arrived += 1
    return arrived


def _deltas(pair: Pair, fds: list[int]) -> tuple[int, ...]:
    before = [runs(fd) for fd in fds]
    with bpf_syscalls.run_stats():
        arrived = send_udp(pair)
    return (arrived, *(runs(fd) - b for fd, b in zip(fds, before, strict=True)))


def _ingress(scan, ns: TestNetns, ifname: str = "xr0"):
    return next(
        h
        for h in scan.result.hooks
        if (h.namespace, h.interface, h.direction) == (ns.name, ifname, Direction.INGRESS)
    )


@pytest.mark.parametrize(
    ("value", "mode", "delivered"),
    [(XDP_DROP, "skb", False), (XDP_PASS, "skb", True), (XDP_ABORTED, "drv", False),
     (XDP_PASS, "drv", True)],
)  # fmt: skip
def test_xdp_decides_before_the_clsact_ingress_and_tcprio_agrees(
    pair: Pair, value: int, mode: str, delivered: bool
):
    from tests.test_scan_kernel import scan_only  # compiles nothing: only the scan harness

    dd = pair.datadog_like()
    xdp_prog, _link = pair.xdp(value, f"xdp_{mode}_{value}", mode)
    arrived, xdp_runs, dd_runs = _deltas(pair, [xdp_prog, dd])
    assert xdp_runs >= PACKETS
    if delivered:
        assert arrived == PACKETS and dd_runs >= PACKETS
    else:
        assert (arrived, dd_runs) == (0, 0)  # the clsact ingress never saw them
    scan = scan_only({pair.sender.name, pair.receiver.name})
    first = _ingress(scan, pair.receiver).classifiers[0]
    assert (first.hook, first.prog_id, first.xdp_mode) == (
        HookKind.XDP, bpf_syscalls.prog_id_of_fd(xdp_prog), mode,
    )  # fmt: skip
    expected = VerdictClass.TRANSPARENT if delivered else VerdictClass.TERMINAL
    assert first.verdict.verdict_class is expected
    conflicts = [(c.interface, c.severity, c.blocker.hook) for c in scan.result.conflicts]
    assert conflicts == ([] if delivered else [("xr0", Severity.CRITICAL, HookKind.XDP)])


def _inventory(ns: TestNetns):
    label = NetNamespace(inode=0, dev=0, name=ns.name, path=ns.path, source="named")
    with ns.entered():
        return {i.name: i for i in read_current_namespace(label).interfaces}


def _ip_xdp(ns: TestNetns, ifname: str) -> list[tuple[str, int]]:
    """(mode, program id) of each XDP program `ip -j link show` lists on `ifname`."""
    info = json.loads(ns.ip("-j", "link", "show", ifname).stdout)[0].get("xdp", {})
    names = {1: "drv", 2: "skb", 3: "hw"}  # iproute2 prints the XDP_ATTACHED_* number
    return [(names[a["mode"]], a["prog"]["id"]) for a in info.get("attached", [])]


@pytest.mark.parametrize("mode", ["skb", "drv"])
def test_the_link_dump_reads_what_ip_shows(pair: Pair, mode: str):
    assert _inventory(pair.receiver)["xr0"].xdp == ()
    prog, link = pair.xdp(XDP_PASS, f"xdp_read_{mode}", mode)
    info = bpf_syscalls.link_info_from_fd(link)
    assert info.type == bpf_syscalls.BPF_LINK_TYPE_XDP
    interfaces = _inventory(pair.receiver)
    assert info.ifindex == interfaces["xr0"].ifindex
    read = [(x.mode, x.prog_id) for x in interfaces["xr0"].xdp]
    assert read == _ip_xdp(pair.receiver, "xr0") == [(mode, bpf_syscalls.prog_id_of_fd(prog))]
    assert _inventory(pair.sender)["xs0"].xdp == ()  # the other end has none
    pair.close(link)
    assert _inventory(pair.receiver)["xr0"].xdp == ()


def test_the_daemon_sees_xdp_links_come_and_go_without_a_resync(tmp_path):
    """Through BPF links neither a native-mode attach or detach nor a generic-mode detach sends
    RTM_NEWLINK on this kernel (a generic-mode attach sends one before the program shows): the
    daemon's link poll finds them, and a link closed before any poll saw it too. No full scan
    runs meanwhile (the resync is 30 s away)."""
    from tests.test_daemon import daemon, find, hook_labels  # the daemon harness, run as-is

    with daemon(tmp_path) as running, xdp_pair("d-xs", "d-xr") as found:
        where = {**hook_labels(found.receiver, "xr0", Direction.INGRESS), "hook": "xdp"}
        full_scans = find(running.metrics(), "tcprio_scans_total", kind="full")
        for mode, polled in (("drv", True), ("skb", True), ("drv", False)):
            _prog, link = found.xdp(XDP_DROP, f"xdp_d_{mode}", mode)
            running.wait_for(
                f"the {mode} XDP program",
                lambda s: find(s, "tcprio_classifier_info", **where) == [1.0],
            )
            if polled:
                time.sleep(LINK_POLL_S * 1.5)  # the link poll has seen the link
            found.close(link)
            running.wait_for(
                f"the {mode} XDP program gone",
                lambda s: find(s, "tcprio_classifier_info", **where) == [],
            )
        assert find(running.metrics(), "tcprio_scans_total", kind="full") == full_scans
