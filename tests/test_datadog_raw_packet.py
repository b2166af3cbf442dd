"""Datadog's own raw-packet classifier judged like any other program: one that ends the chain
before Datadog's main classifier (raw-packet filter programs returned TC_ACT_OK before agent PR
38078) hides it, and no classifier_priority can separate the two (both go at the same one).

The programs are our own, named like Datadog's (the kernel keeps 15 characters of a name
without BTF, so the filter names `<section>_<uid>_<pid>` identify them, as on a node).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.model import Direction, Severity
from tests.bpf_asm import ret
from tests.bpf_programs import attach_filter
from tests.test_bpf_syscalls import encode_insns
from tests.test_run_counters import pair, send_udp  # noqa: F401  (pair: a fixture)
from tests.test_scan_kernel import datadog_settings, scan_only

E = Direction.EGRESS
PACKETS = 20
TC_ACT_OK, TC_ACT_UNSPEC = 0, -1


@contextlib.contextmanager
def programs(raw_returns: int) -> Iterator[dict[str, int]]:
    """Datadog-named programs: the raw-packet one returns `raw_returns`, the main one UNSPEC."""
    fds = {
        "raw": bpf_syscalls.prog_load_raw(
            bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, encode_insns(tuple(ret(raw_returns))),
            "classifier_raw_",
        ),
        "main": bpf_syscalls.prog_load_raw(
            bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, encode_insns(tuple(ret(TC_ACT_UNSPEC))),
            "classifier_egre",
        ),
    }  # fmt: skip
    try:
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def runs(fd: int) -> int:
    return bpf_syscalls.prog_info(bpf_syscalls.prog_id_of_fd(fd), with_insns=False).run_cnt


@pytest.mark.parametrize(
    ("raw_returns", "severity"), [(TC_ACT_OK, Severity.ERROR), (TC_ACT_UNSPEC, None)]
)
def test_a_raw_packet_classifier_that_ends_the_chain_hides_datadogs_main_one(
    pair, raw_returns: int, severity: Severity | None  # noqa: F811
) -> None:
    tx, rx = pair
    pid = os.getpid()
    with programs(raw_returns) as fds:
        attach_filter(tx, "a0", E, 10, "main", handle=1, prog_fd=fds["main"],
                      filter_name=f"classifier_egress_0_{pid}")  # fmt: skip
        # Added second at the same priority: the kernel puts it at the head of the list.
        attach_filter(tx, "a0", E, 10, "raw", handle=2, prog_fd=fds["raw"],
                      filter_name=f"classifier_raw_packet_egress_0_{pid}")  # fmt: skip
        before = runs(fds["main"]), runs(fds["raw"])
        with bpf_syscalls.run_stats():
            arrived = send_udp(tx, rx, PACKETS)
        main_runs, raw_runs = runs(fds["main"]) - before[0], runs(fds["raw"]) - before[1]
        scan = scan_only({tx.name}, datadog_settings(priority=10))
    assert arrived == PACKETS and raw_runs >= PACKETS
    hook = next(h for h in scan.result.hooks if h.interface == "a0" and h.direction is E)
    assert (hook.classifiers[0].filter_name or "").startswith("classifier_raw_packet")
    if severity is None:
        assert main_runs >= PACKETS and hook.conflicts == ()
        return
    assert main_runs == 0  # the kernel: Datadog's main classifier never ran
    (conflict,) = hook.conflicts
    assert conflict.severity is severity and conflict.blocker.is_datadog
    assert "Datadog's own raw-packet classifier" in conflict.message
    assert conflict.recommended_priority is None
    first = conflict.remedies[0]
    assert "raw packets off" in first.summary
    assert "raw_packet" in first.system_probe_yaml and "false" in first.environment
    assert all("classifier priority" not in r.summary for r in conflict.remedies)
