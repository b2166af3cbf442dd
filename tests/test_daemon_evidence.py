"""Evidence in the daemon, against the real kernel: starvation behind a classifier whose verdict
tcprio cannot prove, and the likely cause named when Datadog's classifier disappears.

One daemon (tests/test_daemon.py's `daemon()`) watches this module's namespaces; each test
works on namespaces of its own, so their events never meet on one hook.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls.syscall import BpfCmd, MapCreateAttr, bpf
from tcprio.model import Direction
from tests.bpf_asm import (
    Instruction,
    alu64_imm,
    assemble,
    call_helper,
    exit_,
    jeq_imm,
    label,
    ld_map,
    ldx,
    mov64_reg,
    ret,
    st_imm,
)
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth, veth_in_one
from tests.test_bpf_syscalls import encode_insns
from tests.test_daemon import STARVATION_GUARD_S, RunningDaemon, daemon, find, hook_labels
from tests.test_run_counters import send_udp
from tests.timing import wait_until

E = Direction.EGRESS
DATADOG_FILTER = "classifier_egress_0_4242"  # what system-probe names it: <section>_<uid>_<pid>
BPF_MAP_TYPE_ARRAY, BPF_FUNC_MAP_LOOKUP_ELEM = 2, 1


@pytest.fixture(scope="module")
def running(tmp_path_factory, classifier_programs) -> Iterator[RunningDaemon]:
    with daemon(tmp_path_factory.mktemp("evidence")) as d:
        yield d


@contextlib.contextmanager
def raw_program(name: str, insns: tuple[Instruction, ...]) -> Iterator[int]:
    """A sched_cls program of the test's own (the kernel keeps 15 characters of `name`)."""
    fd = bpf_syscalls.prog_load_raw(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, encode_insns(insns), name)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def verdict_from_a_map() -> Iterator[int]:
    """A program `verdict_by_map` returning what slot 0 of a new array map holds: unknown to
    tcprio's analysis, and 0 (TC_ACT_OK) for every packet, since nothing writes the map."""
    attr = MapCreateAttr(map_type=BPF_MAP_TYPE_ARRAY, key_size=4, value_size=4, max_entries=1)
    map_fd = bpf(BpfCmd.MAP_CREATE, attr)
    insns = assemble(
        st_imm(4, 10, -4, 0),
        ld_map(1, map_fd),  # at load time the immediate is the map's fd
        mov64_reg(2, 10),
        alu64_imm("add", 2, -4),
        call_helper(BPF_FUNC_MAP_LOOKUP_ELEM),
        jeq_imm(0, 0, "missing"),
        ldx(4, 0, 0, 0),
        exit_(),
        label("missing"),
        ret(-1),
    )
    try:
        with raw_program("verdict_by_map", insns) as fd:
            yield fd
    finally:
        os.close(map_fd)


@contextlib.contextmanager
def tcx_link(ns: TestNetns, ifname: str, prog_fd: int) -> Iterator[int]:
    with ns.entered():
        link_fd = bpf_syscalls.tcx_attach(prog_fd, socket.if_nametoindex(ifname), E)
    try:
        yield link_fd
    finally:
        os.close(link_fd)


def events(running: RunningDaemon, msg: str, namespace: str) -> list[dict]:
    records = [json.loads(line) for line in running.log().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("msg") == msg and r.get("namespace") == namespace]


def test_a_blocker_tcprio_cannot_prove_is_shown_starving_datadog(running: RunningDaemon):
    with (
        verdict_from_a_map() as fd,
        netns("d-ev-tx") as tx,
        netns("d-ev-rx") as rx,
    ):
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", "169.254.213.1/30", "dev", "a0")
        rx.ip("addr", "add", "169.254.213.2/30", "dev", "b0")
        add_clsact(tx, "a0")
        attach_filter(tx, "a0", E, 1, "verdict_by_map", prog_fd=fd)
        attach_filter(tx, "a0", E, 10, "classifier_egress", filter_name=DATADOG_FILTER)
        where = hook_labels(tx, "a0", E)
        running.wait_for(
            "the unknown blocker before Datadog's classifier",
            lambda s: (
                find(s, "tcprio_classifier_info", **where, verdict_class="unknown") == [1.0]
                and find(s, "tcprio_classifier_info", **where, datadog="true") == [1.0]
            ),
        )
        deadline = time.monotonic() + STARVATION_GUARD_S
        while not find(running.metrics(), "tcprio_datadog_starved", **where):
            assert time.monotonic() < deadline, "starvation never reported"
            assert send_udp(tx, rx, 10) == 10  # the blocker returns TC_ACT_OK: all arrive
            time.sleep(0.3)  # traffic for the run counters between two looks at /metrics
        (starved,) = wait_until(lambda: events(running, "datadog-starved", tx.name), "the event")
        (blocker,) = starved["blockers"]
        assert (blocker["name"], blocker["verdict"]) == ("verdict_by_map", "unknown")
        assert blocker["runs"] > 0 and starved["interface"] == "a0"


@contextlib.contextmanager
def datadog_hook(running: RunningDaemon, label: str) -> Iterator[TestNetns]:
    """A namespace whose c0 egress holds Datadog's classifier, once the daemon shows it."""
    with netns(label) as ns:
        veth_in_one(ns, "c0", "c1")
        add_clsact(ns, "c0")
        attach_filter(ns, "c0", E, 10, "classifier_egress", filter_name=DATADOG_FILTER)
        running.wait_for(
            "Datadog's classifier",
            lambda s: find(s, "tcprio_classifier_info", **hook_labels(ns, "c0", E),
                           datadog="true") == [1.0],
        )  # fmt: skip
        yield ns


def disappearance(running: RunningDaemon, ns: TestNetns) -> dict:
    where = hook_labels(ns, "c0", E)
    running.wait_for(
        "the disappearance counted",
        lambda s: find(s, "tcprio_datadog_classifier_disappearances_total", **where) == [1.0],
    )
    (event,) = wait_until(lambda: events(running, "datadog-disappeared", ns.name), "the event")
    return event


def test_a_tcx_attach_just_before_is_named_as_the_likely_cause(running: RunningDaemon):
    """Cilium >= 1.16: its tcx program attached, then every legacy filter deleted."""
    with (
        datadog_hook(running, "d-ev-tcx") as ns,
        raw_program("cil_to_container", assemble(ret(-1))) as fd,  # TCX_NEXT: hides nothing
        tcx_link(ns, "c0", fd),
    ):
        ns.tc("filter", "del", "dev", "c0", "egress", "prio", "10")
        cause = disappearance(running, ns)["cause"]
    assert cause.startswith(
        f"Datadog's classifier classifier_egress (filter {DATADOG_FILTER}) disappeared from "
        f"{ns.name}/c0 egress "
    ), cause
    # attached just before the deletion: tcprio dates it by the reading the deletion set off
    assert re.search(r" \d+\.\d s (after|before tcprio saw) a tcx program cil_to_containe "
                     r"\(Cilium\) (was )?attached there: ", cause), cause  # fmt: skip
    assert "Cilium >= 1.16 deletes legacy tc filters when it moves to tcx" in cause


def test_a_tcx_attach_just_after_is_named_too(running: RunningDaemon):
    """The other order: the filter goes first, the tcx program comes right after. Whether the
    reading of the disappearance already shows it or a later one does (then a follow-up event
    names the cause), the cause is named."""
    with (
        datadog_hook(running, "d-ev-tcx2") as ns,
        raw_program("cil_from_container", assemble(ret(-1))) as fd,
    ):
        ns.tc("filter", "del", "dev", "c0", "egress", "prio", "10")
        with tcx_link(ns, "c0", fd):
            event = disappearance(running, ns)

            def named() -> str | None:
                late = events(running, "datadog-disappearance-cause", ns.name)
                return event["cause"] or (late[0]["cause"] if late else None)

            cause = wait_until(named, "the cause, in the event or a follow-up")
    assert "a tcx program cil_from_contai (Cilium)" in cause, cause


def test_the_clsact_qdisc_deleted_with_it_is_named_as_the_likely_cause(running: RunningDaemon):
    """Calico >= 3.31 in TCX mode, Retina's cleanup: the qdisc goes, and every filter on it."""
    with datadog_hook(running, "d-ev-qdisc") as ns:
        ns.tc("qdisc", "del", "dev", "c0", "clsact")
        cause = disappearance(running, ns)["cause"]
    assert f"disappeared from {ns.name}/c0 egress " in cause, cause
    deleted = r" \d+\.\d s (after|before tcprio saw) its clsact qdisc (was )?deleted: "
    assert re.search(deleted + "deleting the clsact qdisc removes every filter on it", cause), cause


def test_a_filter_deleted_alone_claims_no_cause(running: RunningDaemon):
    with datadog_hook(running, "d-ev-alone") as ns:
        ns.tc("filter", "del", "dev", "c0", "egress", "prio", "10")
        event = disappearance(running, ns)
    assert event["cause"] is None
    assert event["name"] == DATADOG_FILTER


def test_the_log_holds_no_error(running: RunningDaemon):
    assert Path(running.stderr).exists()
    assert not [line for line in running.log().splitlines() if '"level": "error"' in line]
