"""Filters whose actions decide: u32 and class-id cls_bpf filters, against run counters.

A match runs the filter's actions (tcf_action_exec); their result ends the clsact chain unless it
is TC_ACT_UNSPEC (`continue`). `pipe` on the last action returns TC_ACT_PIPE (3), which ends the
chain too (the packet then passes). A u32 key with neither classid nor actions never matches.
Each case: the Datadog-like classifier at priority 10 counts the packets it sees, and tcprio's
verdict on the filter at priority 5 must agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcprio.model import Direction, VerdictClass
from tests.bpf_programs import ClassifierPrograms, attach_filter
from tests.kernel import TestNetns, veth_in_one
from tests.test_run_counters import PACKETS, _traffic_deltas, pair  # noqa: F401 (fixture)
from tests.test_scan_kernel import datadog_settings, scan_only

TERMINAL, TRANSPARENT = VerdictClass.TERMINAL, VerdictClass.TRANSPARENT
MIRROR = ("action", "mirred", "egress", "mirror", "dev", "m0")
REDIRECT = ("action", "mirred", "egress", "redirect", "dev", "m0")

U32_CASES = {
    # label: (what follows `u32 match u32 0 0`, whether priority 10 runs, tcprio's class)
    "continue": ((*MIRROR, "continue"), True, TRANSPARENT),
    "pipe": ((*MIRROR, "pipe"), False, TERMINAL),
    "mirror-default-pipe": (MIRROR, False, TERMINAL),
    "pipe-then-continue": ((*MIRROR, "pipe", *MIRROR, "continue"), True, TRANSPARENT),
    "continue-then-pipe": ((*MIRROR, "continue", *MIRROR, "pipe"), True, TRANSPARENT),
    "classid-only": (("classid", "1:1"), False, TERMINAL),
    "no-classid-no-action": ((), True, TRANSPARENT),
    "redirect": (REDIRECT, False, TERMINAL),
}


@pytest.fixture
def mirror_pair(pair) -> Iterator[tuple[TestNetns, TestNetns]]:  # noqa: F811
    tx, rx = pair
    veth_in_one(tx, "m0", "m1")  # where mirrored and redirected copies go
    yield tx, rx


def _filter_at_5(tx: TestNetns):
    scan = scan_only({tx.name}, datadog_settings())
    hook = next(
        h for h in scan.result.hooks if h.interface == "a0" and h.direction is Direction.EGRESS
    )
    return scan, next(c for c in hook.classifiers if c.priority == 5)


def _check(
    tx: TestNetns,
    rx: TestNetns,
    programs: ClassifierPrograms,
    runs_later: bool,
    expected: VerdictClass,
) -> None:
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    _arrived, runs, seen = _traffic_deltas(programs, tx, rx, ["classifier_egress"])
    if runs_later:
        assert runs["classifier_egress"] >= PACKETS and seen["classifier_egress"] >= PACKETS
    else:
        assert runs["classifier_egress"] == 0 and seen["classifier_egress"] == 0
    scan, classifier = _filter_at_5(tx)
    assert classifier.verdict.verdict_class is expected, classifier.verdict.reason
    assert bool(scan.result.conflicts) is (expected is TERMINAL)
    if expected is TERMINAL:
        assert [c.blocker.priority for c in scan.result.conflicts] == [5]


@pytest.mark.parametrize("label", sorted(U32_CASES))
def test_u32_actions_end_the_chain_as_the_kernel_shows(
    mirror_pair, classifier_programs: ClassifierPrograms, label: str
):
    tx, rx = mirror_pair
    extra, runs_later, expected = U32_CASES[label]
    tx.tc("filter", "add", "dev", "a0", "egress", "prio", "5", "protocol", "all",
          "u32", "match", "u32", "0", "0", *extra)  # fmt: skip
    _check(tx, rx, classifier_programs, runs_later, expected)


def test_pipe_ends_the_chain_but_lets_the_packet_through(
    mirror_pair, classifier_programs: ClassifierPrograms
):
    """TC_ACT_PIPE ends the chain; sch_handle_egress then lets the packet go on."""
    tx, rx = mirror_pair
    tx.tc("filter", "add", "dev", "a0", "egress", "prio", "5", "protocol", "all",
          "u32", "match", "u32", "0", "0", *MIRROR, "pipe")  # fmt: skip
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    arrived, runs, _ = _traffic_deltas(classifier_programs, tx, rx, ["classifier_egress"])
    assert arrived == PACKETS and runs["classifier_egress"] == 0
    _, classifier = _filter_at_5(tx)
    assert classifier.verdict.terminal_actions == ("TC_ACT_PIPE",)
    assert "TC_ACT_PIPE from the last action ends it too" in classifier.verdict.reason


# Classic BPF returning -1 (a match with the filter's classid), not direct-action.
MATCH_ALL = "1,6 0 0 4294967295,"


@pytest.mark.parametrize(
    ("control", "runs_later", "expected"),
    [("continue", True, TRANSPARENT), ("pipe", False, TERMINAL)],
)
def test_class_id_bpf_filter_actions_decide(
    mirror_pair, classifier_programs: ClassifierPrograms, control, runs_later, expected
):
    tx, rx = mirror_pair
    tx.tc("filter", "add", "dev", "a0", "egress", "prio", "5", "protocol", "all",
          "bpf", "bytecode", MATCH_ALL, *MIRROR, control)  # fmt: skip
    _check(tx, rx, classifier_programs, runs_later, expected)


def test_the_inventory_reads_each_actions_verdict(mirror_pair):
    tx, _rx = mirror_pair
    tx.tc("filter", "add", "dev", "a0", "egress", "prio", "5", "protocol", "all",
          "u32", "match", "u32", "0", "0", *MIRROR, "continue", *MIRROR, *REDIRECT)  # fmt: skip
    tx.tc("filter", "add", "dev", "a0", "egress", "prio", "6", "protocol", "all",
          "u32", "match", "u32", "0", "0")  # fmt: skip
    scan = scan_only({tx.name}, datadog_settings())
    inventory = scan.inventories[0]
    a0 = next(i for i in inventory.interfaces if i.name == "a0")
    egress = next(h for h in a0.hooks if h.direction is Direction.EGRESS)
    by_prio = {f.priority: f for f in egress.filters}
    assert by_prio[5].actions == ("mirred", "mirred", "mirred")
    assert by_prio[5].action_controls == ((-1,), (3,), (4, 2))  # continue, pipe, stolen|shot
    assert by_prio[5].u32_terminal is True
    assert by_prio[6].u32_terminal is False and by_prio[6].actions == ()
