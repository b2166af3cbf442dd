"""The daemon's event sources against the real kernel."""

from __future__ import annotations

import select
import subprocess
import time
from pathlib import Path

from tcprio.kernel.namespaces import discover_namespaces
from tcprio.service.watch import (
    NamespaceWatch,
    NetnsFolderWatch,
    ProcessExitWatch,
    TcEvent,
    parse_events,
)
from tests.kernel import netns, veth_in_one
from tests.timing import HANG_GUARD_S

# How long "no event arrives" is watched for. The kernel queues a netlink notification before
# the call that causes it returns: a slow machine cannot make one arrive late, so this short
# window decides nothing.
QUIET_S = 0.3


def wait_readable(fd: int, timeout: float = HANG_GUARD_S) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def drain_until(watch: NamespaceWatch, want: int, timeout: float = HANG_GUARD_S) -> list[TcEvent]:
    events: list[TcEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        if wait_readable(watch.fileno(), deadline - time.monotonic()):
            events += watch.drain()
    return events


def test_tc_and_link_changes_in_a_namespace_arrive_as_events():
    with netns("watch") as ns:
        target = next(n for n in discover_namespaces() if n.name == ns.name)
        watch = NamespaceWatch(target)
        try:
            veth_in_one(ns, "w0", "w1")
            ns.tc("qdisc", "add", "dev", "w0", "clsact")
            ns.tc("filter", "add", "dev", "w0", "egress", "prio", "7", "protocol", "all",
                  "u32", "match", "u32", "0", "0", "flowid", "1:1")  # fmt: skip
            ns.tc("filter", "del", "dev", "w0", "egress", "prio", "7")
            events = drain_until(watch, 6)
        finally:
            watch.close()
    kinds = [e.kind for e in events]
    assert "link-add" in kinds and "qdisc-add" in kinds
    ifindex = next(e.ifindex for e in events if e.kind == "qdisc-add")
    filters = [e for e in events if e.kind.startswith("filter")]
    assert {e.kind for e in filters} == {"filter-add", "filter-delete"}
    assert all(e.priority == 7 and e.ifindex == ifindex for e in filters), filters
    assert all(e.parent == 0xFFFFFFF3 for e in filters)


def test_events_from_another_namespace_do_not_arrive():
    with netns("quiet") as quiet, netns("busy") as busy:
        target = next(n for n in discover_namespaces() if n.name == quiet.name)
        watch = NamespaceWatch(target)
        try:
            veth_in_one(busy, "b0", "b1")
            busy.tc("qdisc", "add", "dev", "b0", "clsact")
            assert not wait_readable(watch.fileno(), QUIET_S)
        finally:
            watch.close()


def test_parse_events_skips_garbage_and_truncation():
    assert parse_events(b"") == []
    assert parse_events(b"\x01\x00\x00\x00" + bytes(12)) == []  # length shorter than a header


def test_named_namespace_folder_changes_are_seen():
    Path("/run/netns").mkdir(exist_ok=True)  # `ip netns add` makes it on first use
    watch = NetnsFolderWatch([Path("/run/netns")])
    try:
        assert watch.watched
        watch.drain()
        with netns("inotify"):
            assert wait_readable(watch.fileno())
            assert watch.drain() >= 1
        assert wait_readable(watch.fileno())
        assert watch.drain() >= 1
    finally:
        watch.close()


def test_process_exit_makes_the_pidfd_readable():
    proc = subprocess.Popen(["sleep", "30"])
    watch = ProcessExitWatch(proc.pid)
    try:
        assert not wait_readable(watch.fileno(), 0.1)  # alive: not readable, however long
        proc.kill()
        assert wait_readable(watch.fileno())
    finally:
        proc.wait()
        watch.close()
