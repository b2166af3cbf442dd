"""What the kernel does with the value a classifier returns, on each kind of hook (pure).

The rules follow the kernel sources (net/sched/cls_bpf.c, include/net/tcx.h) and were checked
with run counters on a 6.18 kernel (see the shared platform notes).
"""

from __future__ import annotations

from collections.abc import Iterable

from tcprio.model import ClassifierVerdict, VerdictClass

TC_ACT_UNSPEC = -1
TC_ACT_OK = 0
TC_ACT_RECLASSIFY = 1
TC_ACT_SHOT = 2
TC_ACT_PIPE = 3
TC_ACT_STOLEN = 4
TC_ACT_QUEUED = 5
TC_ACT_REPEAT = 6
TC_ACT_REDIRECT = 7
TC_ACT_TRAP = 8

TC_ACT_NAMES: dict[int, str] = {
    TC_ACT_UNSPEC: "TC_ACT_UNSPEC",
    TC_ACT_OK: "TC_ACT_OK",
    TC_ACT_RECLASSIFY: "TC_ACT_RECLASSIFY",
    TC_ACT_SHOT: "TC_ACT_SHOT",
    TC_ACT_PIPE: "TC_ACT_PIPE",
    TC_ACT_STOLEN: "TC_ACT_STOLEN",
    TC_ACT_QUEUED: "TC_ACT_QUEUED",
    TC_ACT_REPEAT: "TC_ACT_REPEAT",
    TC_ACT_REDIRECT: "TC_ACT_REDIRECT",
    TC_ACT_TRAP: "TC_ACT_TRAP",
}

# cls_bpf_exec_opcode(): in direct-action mode only these end the filter chain.
CLSACT_TERMINAL_VALUES = frozenset(
    {TC_ACT_OK, TC_ACT_SHOT, TC_ACT_STOLEN, TC_ACT_REDIRECT, TC_ACT_TRAP}
)

TCX_NEXT = -1
TCX_PASS = 0
TCX_DROP = 2
TCX_REDIRECT = 7
TCX_NAMES: dict[int, str] = {
    TCX_NEXT: "TCX_NEXT",
    TCX_PASS: "TCX_PASS",
    TCX_DROP: "TCX_DROP",
    TCX_REDIRECT: "TCX_REDIRECT",
}
# tcx_action_code(): these end the whole hook; every other value becomes TCX_NEXT for clsact.
TCX_HOOK_TERMINAL_VALUES = frozenset({TCX_PASS, TCX_DROP, TCX_REDIRECT})

_UNKNOWN_REASON = "its return values could not be determined"


def action_name(value: int) -> str:
    """TC_ACT_* name of a return value, or "value N" for one without a name."""
    return TC_ACT_NAMES.get(value, f"value {value}")


def describe_value(value: int) -> str:
    name = TC_ACT_NAMES.get(value)
    return f"{name} ({value})" if name else f"value {value}"


def describe_values(values: Iterable[int]) -> str:
    """ "TC_ACT_UNSPEC (-1), TC_ACT_OK (0), value 42", sorted by value."""
    return ", ".join(describe_value(v) for v in sorted(values)) or "nothing"


def _partly_terminal(
    terminal: list[int], names: tuple[str, ...], ends: str
) -> ClassifierVerdict:
    """Some exits could not be determined, but one it reaches returns a chain-ending code."""
    return ClassifierVerdict(
        VerdictClass.TERMINAL,
        terminal_actions=names,
        reason=f"can return {describe_values(terminal)} at an exit it reaches, which {ends}"
        " (what its other exits return could not be determined)",
    )


def classify_clsact_direct_action(
    values: frozenset[int] | None, partial: frozenset[int] = frozenset()
) -> ClassifierVerdict:
    """cls_bpf in direct-action mode: the return value is the verdict.

    `values` is every value the program can return, None when some exit is unknown; `partial`
    is then what the known exits return: one chain-ending value there makes it terminal.
    """
    if values is None:
        terminal = sorted(partial & CLSACT_TERMINAL_VALUES)
        if terminal:
            names = tuple(action_name(v) for v in terminal)
            return _partly_terminal(terminal, names, "ends the clsact filter chain")
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason=_UNKNOWN_REASON)
    if not values:
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason="no return value was found")
    terminal = sorted(values & CLSACT_TERMINAL_VALUES)
    if terminal:
        return ClassifierVerdict(
            VerdictClass.TERMINAL,
            terminal_actions=tuple(action_name(v) for v in terminal),
            reason=f"can return {describe_values(terminal)}, which ends the clsact filter chain",
        )
    return ClassifierVerdict(
        VerdictClass.TRANSPARENT,
        reason=f"returns only {describe_values(values)}: the next filter always runs",
    )


def classify_clsact_classid(
    values: frozenset[int] | None,
    actions: tuple[str, ...] = (),
    partial: frozenset[int] = frozenset(),
) -> ClassifierVerdict:
    """cls_bpf without direct-action: the return value is a class id, 0 meaning "no match".

    Any other value (-1 included: "use the filter's classid") is a match; the filter's actions
    then run and give the verdict, TC_ACT_OK when there are none. With `values` None, a match
    among the `partial` values of the known exits makes it terminal.
    """
    if values is None:
        matches = sorted(v for v in partial if v != 0)
        if matches:
            names = tuple(f"{kind} action" for kind in actions) or (action_name(TC_ACT_OK),)
            return _partly_terminal(
                matches, names, "is a match (not direct-action): its actions end the chain"
            )
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason=_UNKNOWN_REASON)
    if not values:
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason="no return value was found")
    matches = sorted(v for v in values if v != 0)
    if not matches:
        return ClassifierVerdict(
            VerdictClass.TRANSPARENT,
            reason="returns only 0 (no match, not direct-action): the next filter always runs",
        )
    shown = ", ".join(_classid_text(v) for v in matches)
    if not actions:
        return ClassifierVerdict(
            VerdictClass.TERMINAL,
            terminal_actions=(action_name(TC_ACT_OK),),
            reason=f"not direct-action: can match (returns {shown}) and, having no actions, "
            "then ends the clsact filter chain with TC_ACT_OK",
        )
    kinds = ", ".join(actions)
    return ClassifierVerdict(
        VerdictClass.TERMINAL,
        terminal_actions=tuple(f"{kind} action" for kind in actions),
        reason=f"not direct-action: can match (returns {shown}); its actions ({kinds}) then "
        "give the verdict and end the clsact filter chain",
    )


def _classid_text(value: int) -> str:
    if value == -1:
        return "-1 (the filter's own classid)"
    return f"classid {value & 0xFFFFFFFF:#x}"


def classify_tcx(
    values: frozenset[int] | None, partial: frozenset[int] = frozenset()
) -> ClassifierVerdict:
    """A tcx program, seen from the clsact stage: TERMINAL when it can keep clsact from running.

    TCX_PASS, TCX_DROP and TCX_REDIRECT end the whole hook; TCX_NEXT and every other value let
    the clsact filters run (other values still stop later tcx programs: see tcx_stops_tcx_chain).
    With `values` None, one of those among the `partial` values of the known exits is enough.
    """
    if values is None:
        terminal = sorted(partial & TCX_HOOK_TERMINAL_VALUES)
        if terminal:
            names = tuple(TCX_NAMES[v] for v in terminal)
            return _partly_terminal(terminal, names, "ends the hook: no clsact filter runs")
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason=_UNKNOWN_REASON)
    if not values:
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason="no return value was found")
    terminal = sorted(values & TCX_HOOK_TERMINAL_VALUES)
    if terminal:
        names = ", ".join(f"{TCX_NAMES[v]} ({v})" for v in terminal)
        return ClassifierVerdict(
            VerdictClass.TERMINAL,
            terminal_actions=tuple(TCX_NAMES[v] for v in terminal),
            reason=f"can return {names}, which ends the hook: no clsact filter runs",
        )
    if values == {TCX_NEXT}:
        reason = "returns only TCX_NEXT (-1): later tcx programs and the clsact filters run"
    else:
        reason = (
            f"returns {describe_values(values)}: the clsact filters still run"
            " (any value other than -1 stops later tcx programs)"
        )
    return ClassifierVerdict(VerdictClass.TRANSPARENT, reason=reason)


def tcx_stops_tcx_chain(values: frozenset[int] | None) -> bool | None:
    """Whether the program can keep later tcx programs from running; None when unknown."""
    if not values:
        return None
    return values != {TCX_NEXT}


def classify_tcx_chain(values: frozenset[int] | None) -> ClassifierVerdict:
    """A tcx program, seen from the later tcx programs of its chain: anything but -1 stops them."""
    stops = tcx_stops_tcx_chain(values)
    if stops is None:
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason=_UNKNOWN_REASON)
    if not stops:
        return ClassifierVerdict(
            VerdictClass.TRANSPARENT, reason="returns only TCX_NEXT (-1): later tcx programs run"
        )
    assert values is not None
    stopping = sorted(v for v in values if v != TCX_NEXT)
    return ClassifierVerdict(
        VerdictClass.TERMINAL,
        terminal_actions=tuple(TCX_NAMES.get(v, action_name(v)) for v in stopping),
        reason=f"can return {describe_values(stopping)}, which stops the tcx chain",
    )


def classify_non_bpf_filter(kind: str, actions: tuple[str, ...] = ()) -> ClassifierVerdict:
    """u32, flower, matchall, ...: a match runs the filter's actions and ends the chain."""
    if actions:
        terminal = tuple(f"{a} action" for a in actions)
        how = f"with the verdict of its actions ({', '.join(actions)})"
    else:
        terminal = (action_name(TC_ACT_OK),)
        how = "with TC_ACT_OK (it has no actions)"
    return ClassifierVerdict(
        VerdictClass.TERMINAL,
        terminal_actions=terminal,
        reason=f"{kind} filter: ends the chain for the packets it matches, {how}",
    )
