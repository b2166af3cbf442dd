"""What the kernel does with a classifier's return value, on each kind of hook (pure)."""

from __future__ import annotations

import pytest

from tcprio.analysis import semantics
from tcprio.model import VerdictClass

TERMINAL, TRANSPARENT, UNKNOWN = (
    VerdictClass.TERMINAL,
    VerdictClass.TRANSPARENT,
    VerdictClass.UNKNOWN,
)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (-1, "TC_ACT_UNSPEC"),
        (0, "TC_ACT_OK"),
        (1, "TC_ACT_RECLASSIFY"),
        (2, "TC_ACT_SHOT"),
        (3, "TC_ACT_PIPE"),
        (4, "TC_ACT_STOLEN"),
        (5, "TC_ACT_QUEUED"),
        (6, "TC_ACT_REPEAT"),
        (7, "TC_ACT_REDIRECT"),
        (8, "TC_ACT_TRAP"),
        (9, "value 9"),
        (42, "value 42"),
        (-2, "value -2"),
    ],
)
def test_action_names(value: int, name: str) -> None:
    assert semantics.action_name(value) == name


def test_describe_values_is_sorted_with_numbers() -> None:
    assert semantics.describe_values({7, -1, 42}) == (
        "TC_ACT_UNSPEC (-1), TC_ACT_REDIRECT (7), value 42"
    )


# --- clsact, direct-action -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 2, 4, 7, 8])
def test_direct_action_terminal_values(value: int) -> None:
    verdict = semantics.classify_clsact_direct_action(frozenset({value}))
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == (semantics.action_name(value),)
    assert "ends the clsact filter chain" in verdict.reason


@pytest.mark.parametrize("value", [-1, 1, 3, 5, 6, 9, 42, 0x10001, -2])
def test_direct_action_values_that_continue(value: int) -> None:
    verdict = semantics.classify_clsact_direct_action(frozenset({value}))
    assert verdict.verdict_class is TRANSPARENT
    assert verdict.terminal_actions == ()
    assert "next filter always runs" in verdict.reason


def test_direct_action_mixed_values_are_terminal_with_only_the_terminal_names() -> None:
    verdict = semantics.classify_clsact_direct_action(frozenset({-1, 2, 3, 7}))
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == ("TC_ACT_SHOT", "TC_ACT_REDIRECT")
    assert "TC_ACT_SHOT (2)" in verdict.reason


def test_direct_action_unknown() -> None:
    assert semantics.classify_clsact_direct_action(None).verdict_class is UNKNOWN
    assert semantics.classify_clsact_direct_action(frozenset()).verdict_class is UNKNOWN


# --- clsact, class id mode -----------------------------------------------------------------


def test_classid_zero_is_no_match() -> None:
    verdict = semantics.classify_clsact_classid(frozenset({0}), ())
    assert verdict.verdict_class is TRANSPARENT
    assert "no match" in verdict.reason


@pytest.mark.parametrize("value", [-1, 1, 2, 7, 0x10001])
def test_classid_match_without_actions_ends_with_ok(value: int) -> None:
    verdict = semantics.classify_clsact_classid(frozenset({0, value}), ())
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == ("TC_ACT_OK",)
    assert "TC_ACT_OK" in verdict.reason


def test_classid_minus_one_uses_the_filters_classid() -> None:
    verdict = semantics.classify_clsact_classid(frozenset({-1}), ())
    assert verdict.verdict_class is TERMINAL
    assert "filter's own classid" in verdict.reason


def test_classid_match_with_actions_takes_the_actions_verdict() -> None:
    verdict = semantics.classify_clsact_classid(frozenset({0x10001}), ("mirred",))
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == ("mirred action",)
    assert "mirred" in verdict.reason
    assert "0x10001" in verdict.reason


def test_classid_unknown() -> None:
    assert semantics.classify_clsact_classid(None, ()).verdict_class is UNKNOWN
    assert semantics.classify_clsact_classid(frozenset(), ("mirred",)).verdict_class is UNKNOWN


# --- tcx -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "name"), [(0, "TCX_PASS"), (2, "TCX_DROP"), (7, "TCX_REDIRECT")])
def test_tcx_values_that_end_the_hook(value: int, name: str) -> None:
    values = frozenset({value, -1})
    verdict = semantics.classify_tcx(values)
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == (name,)
    assert "no clsact filter runs" in verdict.reason
    assert semantics.tcx_stops_tcx_chain(values) is True
    assert semantics.classify_tcx_chain(values).verdict_class is TERMINAL


def test_tcx_next_lets_everything_run() -> None:
    values = frozenset({-1})
    assert semantics.classify_tcx(values).verdict_class is TRANSPARENT
    assert semantics.tcx_stops_tcx_chain(values) is False
    assert semantics.classify_tcx_chain(values).verdict_class is TRANSPARENT


@pytest.mark.parametrize("value", [1, 3, 4, 8, 42, -2])
def test_tcx_other_values_stop_the_tcx_chain_but_not_clsact(value: int) -> None:
    values = frozenset({value})
    verdict = semantics.classify_tcx(values)
    assert verdict.verdict_class is TRANSPARENT
    assert "clsact filters still run" in verdict.reason
    assert semantics.tcx_stops_tcx_chain(values) is True
    chain = semantics.classify_tcx_chain(values)
    assert chain.verdict_class is TERMINAL
    assert chain.terminal_actions == (semantics.action_name(value),)


def test_tcx_unknown() -> None:
    assert semantics.classify_tcx(None).verdict_class is UNKNOWN
    assert semantics.classify_tcx(frozenset()).verdict_class is UNKNOWN
    assert semantics.tcx_stops_tcx_chain(None) is None
    assert semantics.classify_tcx_chain(None).verdict_class is UNKNOWN


# --- other filters -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["u32", "flower", "matchall", "basic"])
def test_non_bpf_filter_without_actions_ends_the_chain_with_ok(kind: str) -> None:
    verdict = semantics.classify_non_bpf_filter(kind, ())
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == ("TC_ACT_OK",)
    assert verdict.reason.startswith(f"{kind} filter: ends the chain for the packets it matches")


def test_non_bpf_filter_with_actions() -> None:
    verdict = semantics.classify_non_bpf_filter("u32", ("mirred",))
    assert verdict.verdict_class is TERMINAL
    assert verdict.terminal_actions == ("mirred action",)
    assert "ends the chain for the packets it matches" in verdict.reason


# --- filter actions (tcf_action_exec), checked against run counters in test_action_verdicts --

CONTINUE, PIPE, STOLEN, SHOT, OK = -1, 3, 4, 2, 0
JUMP = semantics.TC_ACT_JUMP
GOTO_CHAIN = semantics.TC_ACT_GOTO_CHAIN


@pytest.mark.parametrize(
    ("controls", "results"),
    [
        ((), {OK}),  # no actions: TC_ACT_OK
        (((CONTINUE,),), {CONTINUE}),
        (((PIPE,),), {PIPE}),  # pipe to nothing: TC_ACT_PIPE comes back
        (((PIPE,), (CONTINUE,)), {CONTINUE}),
        (((CONTINUE,), (PIPE,)), {CONTINUE}),  # the first non-pipe result stops the actions
        (((STOLEN, SHOT),), {STOLEN, SHOT}),  # a redirect, or its failure
        (((JUMP | 2,), (STOLEN,), (CONTINUE,)), {CONTINUE}),  # restarts, skipping 2 actions
        (((PIPE,), (JUMP | 1,)), {OK}),  # jumps back onto itself until the ttl: TC_ACT_OK
        (((JUMP | 1,),), {JUMP | 1}),  # restarts past every action: the jump is returned
        (((JUMP | 5,), (CONTINUE,)), {OK}),  # beyond the last action: a faulty jump
        (((6,),), {OK}),  # TC_ACT_REPEAT: repeated, then the pipeline stops with OK
        (((GOTO_CHAIN | 1,),), {GOTO_CHAIN | 1}),
    ],
)
def test_actions_outcome_follows_tcf_action_exec(controls, results) -> None:
    outcome = semantics.actions_outcome(controls)
    assert outcome.results == frozenset(results) and not outcome.unmodelled


def test_an_unmodelled_action_is_only_unknown_when_reached() -> None:
    assert semantics.actions_outcome(((PIPE,), ())).unmodelled == {1}
    assert semantics.actions_outcome(((STOLEN,), ())).unmodelled == frozenset()


@pytest.mark.parametrize(
    ("controls", "expected", "named"),
    [
        (((CONTINUE,),), TRANSPARENT, ()),
        (((PIPE,),), TERMINAL, ("TC_ACT_PIPE",)),
        (((PIPE,), (CONTINUE,)), TRANSPARENT, ()),
        (((STOLEN, SHOT),), TERMINAL, ("TC_ACT_SHOT", "TC_ACT_STOLEN")),
        (((GOTO_CHAIN | 3,),), TERMINAL, ("goto chain 3",)),
        (((),), UNKNOWN, ()),
    ],
)
def test_a_u32_key_with_actions_is_judged_by_their_result(controls, expected, named) -> None:
    actions = ("mirred",) * len(controls)
    verdict = semantics.classify_non_bpf_filter("u32", actions, controls, u32_terminal=True)
    assert verdict.verdict_class is expected, verdict.reason
    assert verdict.terminal_actions == named


def test_u32_keys_that_never_run_actions_are_transparent() -> None:
    plain = semantics.classify_non_bpf_filter("u32", (), (), u32_terminal=False)
    linked = semantics.classify_non_bpf_filter("u32", (), (), False, 0x200000)
    classid = semantics.classify_non_bpf_filter("u32", (), (), u32_terminal=True)
    assert plain.verdict_class is TRANSPARENT and "does nothing" in plain.reason
    assert linked.verdict_class is TRANSPARENT and "hash table 2" in linked.reason
    assert classid.verdict_class is TERMINAL and classid.terminal_actions == ("TC_ACT_OK",)


def test_a_class_id_filter_whose_actions_continue_is_transparent_whatever_it_returns() -> None:
    continues = ((CONTINUE,),)
    verdict = semantics.classify_clsact_classid(None, ("mirred",), frozenset(), continues)
    assert verdict.verdict_class is TRANSPARENT
    piped = semantics.classify_clsact_classid(frozenset({0, -1}), ("mirred",), controls=((PIPE,),))
    assert piped.verdict_class is TERMINAL
    never = semantics.classify_clsact_classid(frozenset({0}), ("police",), controls=((),))
    assert never.verdict_class is TRANSPARENT
