"""Classic BPF filters (`tc filter ... bpf bytecode '...'`): read from the dump, judged, checked.

cls_bpf runs classic bytecode in class-id mode: a program returning 0 never matches (the next
filter runs), any other value matches and ends the chain. The bytecode is in the filter dump
(TCA_BPF_OPS); tcprio reads it there (there is no program id) and analyses it. Checked against
`tc -j` and against run counters on real traffic.
"""

from __future__ import annotations

import pytest

from tcprio.analysis.classic_bpf import analyse_classic
from tcprio.model import Direction, Severity, VerdictClass
from tests.bpf_programs import ClassifierPrograms, attach_filter
from tests.test_run_counters import PACKETS, _traffic_deltas, pair  # noqa: F401 (fixture)
from tests.test_scan_kernel import datadog_settings, scan_only

RET_K, RET_A, RET_X = 0x06, 0x16, 0x0E
LD_IMM, LD_LEN, JGT_K, JA = 0x00, 0x80, 0x25, 0x05

# `ld len; jgt #200, ret #1, ret #0`: matches long frames only
BY_LENGTH = ((LD_LEN, 0, 0, 0), (JGT_K, 0, 1, 200), (RET_K, 0, 0, 1), (RET_K, 0, 0, 0))


def bytecode(ops: tuple[tuple[int, int, int, int], ...]) -> str:
    """tc's `bytecode` syntax: count, then `code jt jf k` per instruction."""
    return ",".join([str(len(ops)), *(f"{c} {jt} {jf} {k}" for c, jt, jf, k in ops)])


# --- the analyser, pure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "values", "complete"),
    [
        (((RET_K, 0, 0, 0),), {0}, True),
        (((RET_K, 0, 0, 0xFFFFFFFF),), {-1}, True),
        (BY_LENGTH, {0, 1}, True),
        (((LD_IMM, 0, 0, 7), (RET_A, 0, 0, 0)), {7}, True),  # ld #7; ret a
        (((LD_LEN, 0, 0, 0), (RET_A, 0, 0, 0)), set(), False),  # ret a after ld len
        (((RET_X, 0, 0, 0),), set(), False),
        (((JA, 0, 0, 1), (RET_K, 0, 0, 5), (RET_K, 0, 0, 0)), {0}, True),  # ret #5 is skipped
        (((JGT_K, 0, 9, 1), (RET_K, 0, 0, 0)), {0}, False),  # a jump past the end
    ],
)
def test_the_values_of_reachable_rets(ops, values, complete) -> None:
    result = analyse_classic(ops)
    assert (set(result.values), result.complete) == (values, complete)


# --- on the kernel -------------------------------------------------------------------------------


def add_classic(ns, ifname: str, prio: int, ops) -> None:
    ns.tc("filter", "add", "dev", ifname, "egress", "prio", str(prio), "bpf", "bytecode",
          bytecode(ops), "classid", "1:1")  # fmt: skip


@pytest.mark.parametrize(
    ("ops", "verdict_class", "severities", "hidden"),
    [
        (((RET_K, 0, 0, 1),), VerdictClass.TERMINAL, [Severity.CRITICAL], True),
        (((RET_K, 0, 0, 0),), VerdictClass.TRANSPARENT, [], False),
        (BY_LENGTH, VerdictClass.TERMINAL, [Severity.CRITICAL], False),  # datagrams are short
    ],
    ids=["ret 1", "ret 0", "by length"],
)
def test_classic_filters_are_judged_the_way_the_kernel_runs_them(
    pair,  # noqa: F811
    classifier_programs: ClassifierPrograms,
    ops,
    verdict_class,
    severities,
    hidden,
) -> None:
    tx, rx = pair
    add_classic(tx, "a0", 1, ops)
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    [shown] = [
        f for f in tx.tc_json("filter", "show", "dev", "a0", "egress")
        if "options" in f and f["pref"] == 1
    ]  # fmt: skip
    tc_ops = [(i["code"], i["jt"], i["jf"], i["k"]) for i in shown["options"]["bytecode"]["insns"]]
    assert tuple(tc_ops) == ops
    arrived, runs, _ = _traffic_deltas(classifier_programs, tx, rx, ["classifier_egress"])
    assert arrived == PACKETS
    if hidden:
        assert runs["classifier_egress"] < PACKETS  # ret 1 matched every datagram
    else:
        assert runs["classifier_egress"] >= PACKETS
    scan = scan_only({tx.name}, datadog_settings())
    [inventory] = [i for i in scan.inventories if i.namespace.name == tx.name]
    filters = [f for i in inventory.interfaces for h in i.hooks for f in h.filters]
    [read] = [f for f in filters if f.priority == 1]
    assert read.classic_ops == tuple(tc_ops)  # what tcprio read is what tc shows
    [classic] = [c for h in scan.result.hooks for c in h.classifiers if c.priority == 1]
    assert classic.prog_id is None and classic.kind == "bpf"
    assert classic.verdict.verdict_class is verdict_class
    assert classic.verdict.reason.startswith("classic BPF")
    assert [c.severity for c in scan.result.conflicts] == severities


@pytest.mark.parametrize(
    ("ops", "why"),
    [
        (((0x20, 0, 0, 100), (0x06, 0, 0, 1)), "ld [100] fails on a shorter packet"),
        (((0x28, 0, 0, 12), (0x06, 0, 0, 1)), "ldh [12] fails on a frame shorter than 14"),
        (((0xB1, 0, 0, 14), (0x06, 0, 0, 1)), "ldxb 4*([14]&0xf) fails too"),
        (((0x01, 0, 0, 0), (0x3C, 0, 0, 0), (0x06, 0, 0, 1)), "a /= x with x = 0"),
    ],
)
def test_a_load_or_division_that_can_fail_adds_zero(ops: tuple, why: str) -> None:
    """The kernel ends a classic program with 0 where a packet load fails or X is 0 in a
    division (found by the classic fuzzer against a socket filter): 0 is claimed too."""
    assert analyse_classic(ops).values == {0, 1}, why


def test_straight_code_without_loads_claims_only_its_ret() -> None:
    assert analyse_classic(((0x00, 0, 0, 7), (0x16, 0, 0, 0))).values == {7}  # ld #7; ret a
