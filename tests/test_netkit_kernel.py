"""netkit chains against a kernel that has netkit (CONFIG_NETKIT, 6.7+): what tcprio reads and
decides, against run counters on real traffic.

A netkit pair: the primary `nk0` in one test namespace (the host side), the peer `eth0` in
another (the pod). A program on the peer chain runs when the pod sends, before the primary's
ingress hooks; a Datadog-like classifier (TC_ACT_UNSPEC, counted by BPF run statistics) sits on
the primary's clsact ingress. Skipped, with the reason, where netkit pairs cannot be made.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.tc_inventory import read_current_namespace
from tcprio.model import Direction, HookKind, NetkitChain, NetNamespace, Severity, VerdictClass
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns
from tests.netkit_scenery import (
    NETKIT_DROP,
    NETKIT_L3,
    NETKIT_NEXT,
    NETKIT_PASS,
    NETKIT_REDIRECT,
    netkit_pair,
    netkit_unsupported,
)
from tests.test_scan_kernel import scan_only

pytestmark = pytest.mark.skipif(netkit_unsupported() is not None, reason=netkit_unsupported() or "")

HOST_IP, POD_IP = "169.254.214.1", "169.254.214.2"
PACKETS = 20
RECEIVE_WAIT_S = 2.0  # per datagram: the guest kernels run 20-40x slower than the host
DD_FILTER = "classifier_ingress_0_4242"  # Datadog's filter naming: <section>_<uid>_<pid>


def returning(value: int, name: str) -> int:
    """A sched_cls program `r0 = value; exit` (fd)."""
    code = struct.pack("<BBhi", 0xB7, 0, 0, value) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    return bpf_syscalls.prog_load_raw(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, code, name)


def runs(fd: int) -> int:
    return bpf_syscalls.prog_info_from_fd(fd, with_insns=False).run_cnt


@dataclass
class Pair:
    host: TestNetns  # the primary nk0
    pod: TestNetns  # the peer eth0
    fds: list[int]

    def program(self, value: int, name: str) -> int:
        fd = returning(value, name)
        self.fds.append(fd)
        return fd

    def attach(self, fd: int, chain: NetkitChain) -> int:
        """A netkit link on the primary (both chains are attached there)."""
        with self.host.entered():
            link = bpf_syscalls.netkit_attach(fd, socket.if_nametoindex("nk0"), chain)
        self.fds.append(link)
        return link

    def datadog_like(self, ns: TestNetns, ifname: str) -> int:
        """classifier_ingress at priority 10 on `ifname`'s clsact ingress, returning UNSPEC."""
        fd = self.program(-1, "classifier_ingress")
        add_clsact(ns, ifname)
        attach_filter(ns, ifname, Direction.INGRESS, 10, "dd", prog_fd=fd, filter_name=DD_FILTER)
        return fd


@pytest.fixture
def pair() -> Iterator[Pair]:
    with netns("nkhost") as host, netns("nkpod") as pod:
        found = Pair(host, pod, [])
        try:
            netkit_pair(host, "nk0", pod, "eth0")
            host.ip("addr", "add", f"{HOST_IP}/30", "dev", "nk0")
            pod.ip("addr", "add", f"{POD_IP}/30", "dev", "eth0")
            yield found
        finally:
            for fd in reversed(found.fds):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _deltas(fds: list[int], sender: TestNetns, receiver: TestNetns, ip: str) -> tuple[int, ...]:
    before = [runs(fd) for fd in fds]
    with bpf_syscalls.run_stats():
        arrived = send_udp_to(sender, receiver, ip)
    return (arrived, *(runs(fd) - b for fd, b in zip(fds, before, strict=True)))


def send_udp_to(sender: TestNetns, receiver: TestNetns, ip: str, port: int = 40214) -> int:
    """Send PACKETS datagrams to `ip`; how many arrived (a short wait: dropped ones never do)."""
    with receiver.entered():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender.entered():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    arrived = 0
    with rx, tx:
        rx.bind((ip, port))
        rx.settimeout(RECEIVE_WAIT_S)
        for i in range(PACKETS):
            tx.sendto(f"tcprio {i}".encode(), (ip, port))
        with contextlib.suppress(TimeoutError):
            while arrived < PACKETS:
                rx.recv(64)
                arrived += 1
    return arrived


def _hook(scan, ns: TestNetns, ifname: str):
    return next(
        h
        for h in scan.result.hooks
        if (h.namespace, h.interface, h.direction) == (ns.name, ifname, Direction.INGRESS)
    )


@pytest.mark.parametrize(
    ("value", "delivered"),
    [(NETKIT_DROP, False), (NETKIT_REDIRECT, False), (NETKIT_PASS, True), (NETKIT_NEXT, True)],
)
def test_the_peer_chain_decides_before_the_primarys_clsact_and_tcprio_agrees(
    pair: Pair, value: int, delivered: bool
):
    dd = pair.datadog_like(pair.host, "nk0")
    peer_prog = pair.program(value, f"nk_peer_{value & 0xFF}")
    pair.attach(peer_prog, NetkitChain.PEER)
    arrived, netkit_runs, dd_runs = _deltas([peer_prog, dd], pair.pod, pair.host, HOST_IP)
    assert netkit_runs >= PACKETS
    if delivered:
        assert arrived == PACKETS and dd_runs >= PACKETS
    else:
        assert arrived == 0 and dd_runs == 0  # the host side's ingress never saw them
    scan = scan_only({pair.host.name, pair.pod.name})
    first = _hook(scan, pair.host, "nk0").classifiers[0]
    assert (first.hook, first.prog_id, first.netkit_chain) == (
        HookKind.NETKIT, bpf_syscalls.prog_id_of_fd(peer_prog), "peer chain of nk0",
    )  # fmt: skip
    expected = VerdictClass.TRANSPARENT if delivered else VerdictClass.TERMINAL
    assert first.verdict.verdict_class is expected
    conflicts = [(c.interface, c.severity, c.blocker.hook) for c in scan.result.conflicts]
    assert conflicts == ([] if delivered else [("nk0", Severity.CRITICAL, HookKind.NETKIT)])


def test_the_primary_chain_decides_before_the_peers_clsact_in_the_pod(pair: Pair):
    dd = pair.datadog_like(pair.pod, "eth0")
    primary_prog = pair.program(NETKIT_DROP, "nk_primary_drop")
    pair.attach(primary_prog, NetkitChain.PRIMARY)
    arrived, netkit_runs, dd_runs = _deltas([primary_prog, dd], pair.host, pair.pod, POD_IP)
    assert (arrived, dd_runs) == (0, 0) and netkit_runs >= PACKETS
    scan = scan_only({pair.host.name, pair.pod.name})
    first = _hook(scan, pair.pod, "eth0").classifiers[0]
    assert (first.hook, first.netkit_chain) == (HookKind.NETKIT, "primary chain of nk0")
    assert [(c.namespace, c.interface, c.severity) for c in scan.result.conflicts] == [
        (pair.pod.name, "eth0", Severity.CRITICAL)
    ]


def _inventory(ns: TestNetns):
    label = NetNamespace(inode=0, dev=0, name=ns.name, path=ns.path, source="named")
    with ns.entered():
        return read_current_namespace(label)


def test_both_ends_and_both_chains_are_read_as_the_kernel_shows_them(pair: Pair):
    links = [
        pair.attach(pair.program(NETKIT_PASS, "nk_p0"), NetkitChain.PRIMARY),
        pair.attach(pair.program(NETKIT_NEXT, "nk_q0"), NetkitChain.PEER),
        pair.attach(pair.program(NETKIT_DROP, "nk_q1"), NetkitChain.PEER),
    ]
    ids = [bpf_syscalls.link_info_from_fd(link) for link in links]
    assert all(info.type == bpf_syscalls.BPF_LINK_TYPE_NETKIT for info in ids)
    host = next(i for i in _inventory(pair.host).interfaces if i.name == "nk0")
    pod = next(i for i in _inventory(pair.pod).interfaces if i.name == "eth0")
    assert host.kind == pod.kind == "netkit"
    assert host.netkit is not None and pod.netkit is not None
    assert (host.netkit.primary, pod.netkit.primary) == (True, False)
    assert (host.netkit.peer_ifindex, pod.netkit.peer_ifindex) == (pod.ifindex, host.ifindex)
    assert host.netkit.peer_netnsid is not None  # the ends live in different namespaces
    assert (host.netkit.mode, host.netkit.policy, host.netkit.peer_policy) == (
        NETKIT_L3, NETKIT_PASS, NETKIT_PASS,
    )  # fmt: skip
    chains = [
        [(e.prog_id, e.link_id) for e in host.netkit.primary_chain],
        [(e.prog_id, e.link_id) for e in host.netkit.peer_chain],
    ]
    assert chains == [
        [(ids[0].prog_id, ids[0].id)],
        [(ids[1].prog_id, ids[1].id), (ids[2].prog_id, ids[2].id)],
    ]
    assert host.netkit.error is None and pod.netkit.primary_chain == ()


def test_the_daemon_sees_netkit_links_come_and_go_without_a_netlink_event(tmp_path):
    from tests.test_daemon import daemon, find, hook_labels  # the daemon harness, run as-is

    with daemon(tmp_path) as running, netns("d-nkh") as host, netns("d-nkp") as pod:
        netkit_pair(host, "nk0", pod, "eth0")
        found = Pair(host, pod, [])
        try:
            link = found.attach(found.program(NETKIT_DROP, "nk_daemon_drop"), NetkitChain.PEER)
            where = {**hook_labels(host, "nk0", Direction.INGRESS), "hook": "netkit"}
            running.wait_for(
                "the netkit program",
                lambda s: find(s, "tcprio_classifier_info", **where) == [1.0],
            )
            os.close(link)
            found.fds.remove(link)
            running.wait_for(
                "the netkit program gone",
                lambda s: find(s, "tcprio_classifier_info", **where) == [],
            )
        finally:
            for fd in found.fds:
                os.close(fd)
