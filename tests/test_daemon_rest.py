"""The daemon's cost at rest, in deterministic units: what a poll with nothing changing does
(namespaces entered, syscalls, walks of the readings, run-counter reads). The CPU figures are
measured by bench/rest_bench.py, not here."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.model import NamespaceInventory, NetNamespace
from tcprio.service import daemon as daemon_module
from tcprio.service import linkless_tcx
from tcprio.service.config import DaemonConfig
from tcprio.service.linkless_tcx import (
    LINKLESS_MIN_NAMESPACES,
    LINKLESS_ROUND_S,
    NEW_PROGRAM_POLLS,
    LinklessTcxWatch,
)

PODS = 200
NEWEST = 500  # the newest program id loaded before the first poll


class Watched:
    def __init__(self, ns: NetNamespace) -> None:
        self.namespace = ns


def node(n: int = PODS) -> tuple[dict, dict]:
    inventories, watched = {}, {}
    for i in range(n):
        ns = NetNamespace(inode=1000 + i, dev=4, name=f"p{i}", path=f"/run/netns/p{i}",
                          source="named", netns=f"p{i}")  # fmt: skip
        inventories[ns.key] = NamespaceInventory(namespace=ns, interfaces=())
        watched[ns.key] = Watched(ns)
    return inventories, watched


class FakeKernel:
    """Program ids and types; counts the syscalls of the linkless watch and namespaces entered."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.programs = {NEWEST: bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS}
        self.syscalls = 0
        self.entered: list[str] = []
        monkeypatch.setattr(bpf_syscalls, "list_prog_ids", self.list_prog_ids)
        monkeypatch.setattr(bpf_syscalls, "prog_ids_after", self.prog_ids_after)
        monkeypatch.setattr(bpf_syscalls, "prog_type", self.prog_type)
        monkeypatch.setattr(linkless_tcx, "entered", self.enter)
        monkeypatch.setattr(linkless_tcx, "changed_hooks", lambda inventory: [])

    def list_prog_ids(self) -> list[int]:
        self.syscalls += len(self.programs) + 1
        return sorted(self.programs)

    def prog_ids_after(self, after: int) -> list[int]:
        new = sorted(i for i in self.programs if i > after)
        self.syscalls += len(new) + 1
        return new

    def prog_type(self, prog_id: int) -> int:
        self.syscalls += 2
        return self.programs[prog_id]

    def enter(self, ns: NetNamespace) -> Iterator[None]:
        self.entered.append(ns.name)
        return _nothing()

    def poll(self, watch: LinklessTcxWatch, inventories: dict, watched: dict) -> tuple[int, int]:
        """(namespaces entered, syscalls) of one poll."""
        self.entered.clear()
        self.syscalls = 0
        assert watch.changed(inventories, watched, interval=1.0) == {}
        return len(self.entered), self.syscalls


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None



def test_a_quiet_poll_enters_a_few_namespaces_and_asks_one_syscall_about_programs(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    inventories, watched = node()
    watch = LinklessTcxWatch()
    kernel.poll(watch, inventories, watched)  # the first poll notes the newest program
    budget = max(LINKLESS_MIN_NAMESPACES, math.ceil(PODS / LINKLESS_ROUND_S))
    for _ in range(10):
        assert kernel.poll(watch, inventories, watched) == (budget, 1)
    # in turn: every namespace within one round
    seen: set[str] = set()
    for _ in range(math.ceil(LINKLESS_ROUND_S)):
        kernel.poll(watch, inventories, watched)
        seen.update(kernel.entered)
    assert len(seen) == PODS


def test_a_new_classifier_program_has_every_namespace_queried_twice(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    inventories, watched = node()
    watch = LinklessTcxWatch()
    kernel.poll(watch, inventories, watched)
    kernel.programs[NEWEST + 1] = bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS
    polls = [kernel.poll(watch, inventories, watched)[0] for _ in range(NEW_PROGRAM_POLLS + 1)]
    assert polls == [PODS] * NEW_PROGRAM_POLLS + [LINKLESS_MIN_NAMESPACES]


def test_a_new_program_of_another_type_changes_nothing(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    inventories, watched = node()
    watch = LinklessTcxWatch()
    kernel.poll(watch, inventories, watched)
    kernel.programs[NEWEST + 1] = 1  # BPF_PROG_TYPE_SOCKET_FILTER: tcx does not take it
    assert kernel.poll(watch, inventories, watched) == (LINKLESS_MIN_NAMESPACES, 1 + 1 + 2)
    assert kernel.poll(watch, inventories, watched) == (LINKLESS_MIN_NAMESPACES, 1)


def test_a_small_node_is_queried_whole_every_poll(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    inventories, watched = node(LINKLESS_MIN_NAMESPACES)
    watch = LinklessTcxWatch()
    for _ in range(3):
        assert kernel.poll(watch, inventories, watched)[0] == LINKLESS_MIN_NAMESPACES


@pytest.fixture
def quiet_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    """A daemon that never ran its loop, over 200 empty readings, with a fixed link list."""
    monkeypatch.setattr(bpf_syscalls, "list_link_ids", lambda: [7, 8])
    monkeypatch.setattr(bpf_syscalls, "link_ids_after", lambda after: [])
    d = daemon_module.Daemon(DaemonConfig(), tmp_path / "tcprio.yaml", None)
    inventories, watched = node()
    d.inventories, d.watched = inventories, watched
    d.link_ids = frozenset({7, 8})
    calls = {"walks": 0, "run_stats": 0}

    def walk(links: frozenset[int]) -> None:
        calls["walks"] += 1

    def run_stats() -> None:
        calls["run_stats"] += 1

    monkeypatch.setattr(d, "_mark_tcx_shown_but_gone", walk)
    monkeypatch.setattr(d, "_refresh_run_stats", run_stats)
    monkeypatch.setattr(d.linkless_tcx, "changed", lambda *args: {})
    try:
        yield d, calls
    finally:
        d.analysis.close()


def test_a_poll_with_nothing_changed_walks_no_reading(quiet_daemon):
    d, calls = quiet_daemon
    d.poll_links_and_stats()
    assert calls["walks"] == 1  # the first poll walks them
    for _ in range(5):
        d.poll_links_and_stats()
    assert calls["walks"] == 1
    d.inventory_generation += 1  # a namespace was read again
    d.poll_links_and_stats()
    d.poll_links_and_stats()
    assert calls["walks"] == 2


def test_run_counters_are_read_every_few_seconds_and_after_a_scrape(quiet_daemon):
    d, calls = quiet_daemon
    d.poll_links_and_stats()
    for _ in range(5):
        d.poll_links_and_stats()
    assert calls["run_stats"] == 1  # polls within RUN_STATS_INTERVAL_S
    d._scraped_snapshot()
    d.poll_links_and_stats()
    d.poll_links_and_stats()
    assert calls["run_stats"] == 2
    d._run_stats_due = 0.0  # RUN_STATS_INTERVAL_S went by
    d.poll_links_and_stats()
    assert calls["run_stats"] == 3


def test_links_new_ones_every_poll_the_whole_list_every_few_seconds(quiet_daemon, monkeypatch):
    """One syscall a poll for new links (ids grow); a link gone shows at the next whole list."""
    d, _ = quiet_daemon
    listed = {"whole": 0, "after": []}
    kernel_links = [7, 8]

    def whole() -> list[int]:
        listed["whole"] += 1
        return list(kernel_links)

    def after(newest: int) -> list[int]:
        listed["after"].append(newest)
        return [i for i in kernel_links if i > newest]

    monkeypatch.setattr(bpf_syscalls, "list_link_ids", whole)
    monkeypatch.setattr(bpf_syscalls, "link_ids_after", after)
    d.poll_links_and_stats()
    assert listed["whole"] == 1 and d.link_ids == {7, 8}
    kernel_links.append(9)  # a new link: seen at the next poll, by one call
    d.poll_links_and_stats()
    assert d.link_ids == {7, 8, 9} and listed == {"whole": 1, "after": [8]}
    kernel_links.remove(7)  # a link gone: seen once the whole list is due
    d.poll_links_and_stats()
    assert 7 in d.link_ids
    d._full_link_list_due = 0.0  # FULL_LINK_LIST_S went by
    d.poll_links_and_stats()
    assert d.link_ids == {8, 9} and listed["whole"] == 2
