"""What tcprio decides, against what the kernel does on real traffic between test namespaces.

BPF run statistics (BPF_ENABLE_STATS) and the programs' own counters show whether the
classifier at Datadog's priority sees packets; tcprio's verdict must say the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.model import Direction, Severity
from tests.bpf_programs import ClassifierPrograms, attach_filter, requires_tcx
from tests.kernel import TestNetns, add_clsact, netns, veth
from tests.test_scan_kernel import datadog_settings, scan_only
from tests.timing import HANG_GUARD_S

SENDER_IP, RECEIVER_IP, PORT = "169.254.213.1", "169.254.213.2", 40213
PACKETS = 50


@pytest.fixture
def pair() -> Iterator[tuple[TestNetns, TestNetns]]:
    with netns("tx") as tx, netns("rx") as rx:
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", f"{SENDER_IP}/30", "dev", "a0")
        rx.ip("addr", "add", f"{RECEIVER_IP}/30", "dev", "b0")
        add_clsact(tx, "a0")
        yield tx, rx


def send_udp(
    tx: TestNetns, rx: TestNetns, count: int, to: tuple[str, int] = (RECEIVER_IP, PORT)
) -> int:
    """Send `count` datagrams from tx to rx (`to`: its address and port); return how many
    arrived (each is read before returning: the ingress filter ran on it first)."""
    with rx.entered():
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx.entered():
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind(to)
        receiver.settimeout(HANG_GUARD_S)  # every caller expects every datagram
        for i in range(count):
            sender.sendto(f"tcprio {i}".encode(), to)
        arrived = 0
        with contextlib.suppress(TimeoutError):
            while arrived < count:
                receiver.recv(64)
                arrived += 1
    return arrived


def run_count(programs: ClassifierPrograms, name: str) -> int:
    return bpf_syscalls.prog_info(programs.prog_id(name), with_insns=False).run_cnt


def _traffic_deltas(
    programs: ClassifierPrograms, tx: TestNetns, rx: TestNetns, names: list[str]
) -> tuple[int, dict[str, int], dict[str, int]]:
    before_runs = {n: run_count(programs, n) for n in names}
    before_seen = {n: programs.seen(n) for n in names}
    with bpf_syscalls.run_stats():
        arrived = send_udp(tx, rx, PACKETS)
    runs = {n: run_count(programs, n) - before_runs[n] for n in names}
    seen = {n: programs.seen(n) - before_seen[n] for n in names}
    return arrived, runs, seen


def test_terminal_at_priority_1_starves_datadog_and_tcprio_says_critical(
    pair, classifier_programs: ClassifierPrograms
):
    tx, rx = pair
    attach_filter(tx, "a0", Direction.EGRESS, 1, "term_ok")
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    arrived, runs, seen = _traffic_deltas(
        classifier_programs, tx, rx, ["term_ok", "classifier_egress"]
    )
    assert arrived == PACKETS  # TC_ACT_OK lets the packets through...
    assert runs["term_ok"] >= PACKETS and seen["term_ok"] >= PACKETS
    # ...but ends the chain: the observer never runs
    assert runs["classifier_egress"] == 0 and seen["classifier_egress"] == 0
    scan = scan_only({tx.name}, datadog_settings())
    assert [(c.interface, c.severity) for c in scan.result.conflicts] == [
        ("a0", Severity.CRITICAL)
    ]


def test_terminal_after_datadog_does_not_starve_it_and_tcprio_agrees(
    pair, classifier_programs: ClassifierPrograms
):
    tx, rx = pair
    attach_filter(tx, "a0", Direction.EGRESS, 20, "term_ok")
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    attach_filter(tx, "a0", Direction.EGRESS, 5, "pass_42")  # continues in direct-action
    arrived, runs, _ = _traffic_deltas(
        classifier_programs, tx, rx, ["term_ok", "classifier_egress", "pass_42"]
    )
    assert arrived == PACKETS
    assert runs["pass_42"] >= PACKETS
    assert runs["classifier_egress"] >= PACKETS
    assert runs["term_ok"] >= PACKETS
    assert scan_only({tx.name}, datadog_settings()).result.conflicts == []


@requires_tcx
def test_terminal_tcx_starves_every_clsact_filter_and_tcprio_says_critical(
    pair, classifier_programs: ClassifierPrograms
):
    tx, rx = pair
    attach_filter(tx, "a0", Direction.EGRESS, 1, "classifier_egress")
    with tx.entered():
        link = bpf_syscalls.tcx_attach(
            classifier_programs.fd("term_ok"), socket.if_nametoindex("a0"), Direction.EGRESS
        )
    try:
        arrived, runs, _ = _traffic_deltas(
            classifier_programs, tx, rx, ["term_ok", "classifier_egress"]
        )
        scan = scan_only({tx.name}, datadog_settings(priority=1))
    finally:
        os.close(link)
    assert arrived == PACKETS
    assert runs["term_ok"] >= PACKETS and runs["classifier_egress"] == 0
    assert [c.severity for c in scan.result.conflicts] == [Severity.CRITICAL]
    assert "tcx" in scan.result.conflicts[0].message


@pytest.mark.parametrize(
    ("protocol", "hides_ip", "severity", "said"),
    [
        ("arp", False, Severity.INFO, "only sees arp frames"),
        ("ip", True, Severity.CRITICAL, "for protocol ip packets"),
    ],
)
def test_a_terminal_filter_hides_only_its_protocol_and_tcprio_says_so(
    pair, classifier_programs: ClassifierPrograms, protocol, hides_ip, severity, said
):
    """`protocol arp`: the kernel does not even run the filter on IPv4 packets."""
    tx, rx = pair
    attach_filter(tx, "a0", Direction.EGRESS, 1, "term_ok", protocol=protocol)
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    arrived, runs, _ = _traffic_deltas(
        classifier_programs, tx, rx, ["term_ok", "classifier_egress"]
    )
    assert arrived == PACKETS
    if hides_ip:
        assert runs["term_ok"] >= PACKETS and runs["classifier_egress"] < PACKETS
    else:
        assert runs["classifier_egress"] >= PACKETS  # every IPv4 datagram reached the observer
        assert runs["term_ok"] < PACKETS  # at most the ARP exchange, never the datagrams
    conflicts = scan_only({tx.name}, datadog_settings()).result.conflicts
    assert [c.severity for c in conflicts] == [severity]
    assert said in conflicts[0].message
