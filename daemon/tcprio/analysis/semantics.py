"""What the kernel does with the value a classifier returns, on each kind of hook (pure).

The rules follow the kernel sources (net/sched/cls_bpf.c, include/net/tcx.h, netkit_xmit in
drivers/net/netkit.c, do_xdp_generic in net/core/dev.c, the actions of
net/sched/act_api.c tcf_action_exec, u32_classify, __tcf_classify) and were checked with run
counters on a 6.18 kernel (see the shared platform notes and tests/test_action_verdicts.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

# netkit_xmit(): NETKIT_NEXT goes on to the next program of the chain (and, after the last one,
# delivers like NETKIT_PASS whatever the device's policy: the policy only applies to a device
# without programs); NETKIT_PASS delivers the packet to the other device, whose ingress hooks
# (tcx, clsact) then run; NETKIT_REDIRECT hands it to skb_do_redirect, NETKIT_DROP and every
# other value drop it (`default:` of its switch). Checked with run counters on 6.12.
NETKIT_NEXT = -1
NETKIT_PASS = 0
NETKIT_DROP = 2
NETKIT_REDIRECT = 7
NETKIT_NAMES: dict[int, str] = {
    NETKIT_NEXT: "NETKIT_NEXT",
    NETKIT_PASS: "NETKIT_PASS",
    NETKIT_DROP: "NETKIT_DROP",
    NETKIT_REDIRECT: "NETKIT_REDIRECT",
}
NETKIT_DELIVERING_VALUES = frozenset({NETKIT_NEXT, NETKIT_PASS})

# XDP (net/core/dev.c do_xdp_generic / netif_receive_generic_xdp, the drivers' run loops): the
# action is the low 32 bits of r0. Only XDP_PASS hands the packet on to the stack, and so to the
# device's tcx and clsact ingress; XDP_TX and XDP_REDIRECT send it elsewhere, XDP_ABORTED and
# XDP_DROP drop it, and any other value is dropped as ABORTED (bpf_warn_invalid_xdp_action).
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
XDP_NAMES: dict[int, str] = {
    XDP_ABORTED: "XDP_ABORTED",
    XDP_DROP: "XDP_DROP",
    XDP_PASS: "XDP_PASS",
    XDP_TX: "XDP_TX",
    XDP_REDIRECT: "XDP_REDIRECT",
}

_UNKNOWN_REASON = "its return values could not be determined"

# Extended control verdicts of actions (include/uapi/linux/pkt_cls.h).
TC_ACT_EXT_VAL_MASK = (1 << 28) - 1
TC_ACT_JUMP = 1 << 28
TC_ACT_GOTO_CHAIN = 2 << 28
TCA_ACT_MAX_PRIO = 32
TCA_ACT_MAX_PRIO_MASK = 0x1FF


def action_name(value: int) -> str:
    """TC_ACT_* name of a return value, or "value N" for one without a name."""
    return TC_ACT_NAMES.get(value, f"value {value}")


def describe_value(value: int) -> str:
    name = TC_ACT_NAMES.get(value)
    return f"{name} ({value})" if name else f"value {value}"


def describe_values(values: Iterable[int]) -> str:
    """ "TC_ACT_UNSPEC (-1), TC_ACT_OK (0), value 42", sorted by value."""
    return ", ".join(describe_value(v) for v in sorted(values)) or "nothing"


def _partly_terminal(terminal: list[int], names: tuple[str, ...], ends: str) -> ClassifierVerdict:
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
    controls: tuple[tuple[int, ...], ...] | None = None,
) -> ClassifierVerdict:
    """cls_bpf without direct-action: the return value is a class id, 0 meaning "no match".

    Any other value (-1 included: "use the filter's classid") is a match; the filter's actions
    then run and give the verdict, TC_ACT_OK when there are none (a `continue` lets the next
    filter run). With `values` None, a match among the `partial` values of the known exits
    makes it terminal.
    """
    if controls is not None and actions and _controls_known(actions, controls):
        on_match = actions_verdict(actions, controls, "not direct-action: a match")
        if on_match.verdict_class is not VerdictClass.TERMINAL:
            return _classid_not_ending(values, on_match)
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


def _classid_not_ending(
    values: frozenset[int] | None, on_match: ClassifierVerdict
) -> ClassifierVerdict:
    """A class-id filter whose actions never end the chain (or are not modelled): a program
    that never matches is transparent whatever its actions; otherwise its actions decide."""
    if on_match.verdict_class is VerdictClass.UNKNOWN and values == frozenset({0}):
        return ClassifierVerdict(
            VerdictClass.TRANSPARENT,
            reason="returns only 0 (no match, not direct-action): the next filter always runs",
        )
    return on_match


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


def netkit_action_name(value: int) -> str:
    """NETKIT_* name; a value without one is dropped like NETKIT_DROP."""
    return NETKIT_NAMES.get(value, f"value {value} (dropped)")


def classify_netkit(
    values: frozenset[int] | None, partial: frozenset[int] = frozenset()
) -> ClassifierVerdict:
    """A netkit program, seen from the ingress hooks of the device it delivers to: TERMINAL
    when it can keep the packet from reaching them (NETKIT_DROP, NETKIT_REDIRECT, or any value
    but -1 and 0, which netkit_xmit drops). NETKIT_PASS still stops later programs of its own
    netkit chain (not modelled, like a tcx value other than -1 on the tcx chain).
    With `values` None, one such value among the `partial` values of the known exits is enough.
    """
    ends = "the packet never reaches the other device's tcx or clsact hooks"
    if values is None:
        terminal = sorted(partial - NETKIT_DELIVERING_VALUES)
        if terminal:
            names = tuple(netkit_action_name(v) for v in terminal)
            return _partly_terminal(terminal, names, f"drops or redirects it: {ends}")
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason=_UNKNOWN_REASON)
    if not values:
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason="no return value was found")
    terminal = sorted(values - NETKIT_DELIVERING_VALUES)
    if terminal:
        names = ", ".join(f"{netkit_action_name(v)} ({v})" for v in terminal)
        return ClassifierVerdict(
            VerdictClass.TERMINAL,
            terminal_actions=tuple(netkit_action_name(v) for v in terminal),
            reason=f"can return {names}: {ends}",
        )
    shown = ", ".join(f"{NETKIT_NAMES[v]} ({v})" for v in sorted(values))
    return ClassifierVerdict(
        VerdictClass.TRANSPARENT,
        reason=f"returns only {shown}: the packet goes on to the other device's ingress hooks",
    )


def xdp_action_name(value: int) -> str:
    """XDP_* name of a returned value; a value without one is dropped like XDP_ABORTED."""
    return XDP_NAMES.get(value & 0xFFFFFFFF, f"value {value} (dropped)")


def _xdp_hiding(values: frozenset[int]) -> list[int]:
    return sorted(v for v in values if v & 0xFFFFFFFF != XDP_PASS)


def classify_xdp(
    values: frozenset[int] | None, partial: frozenset[int] = frozenset()
) -> ClassifierVerdict:
    """An XDP program, seen from the tc ingress hooks (tcx, clsact) of its device: TERMINAL when
    it can keep a packet from them (every value but XDP_PASS), TRANSPARENT when it only passes.
    With `values` None, one such value among the `partial` values of the known exits is enough.
    """
    ends = "the device's tcx and clsact ingress hooks never see the packet"
    if values is None:
        hiding = _xdp_hiding(partial)
        if hiding:
            shown = ", ".join(f"{xdp_action_name(v)} ({v})" for v in hiding)
            return ClassifierVerdict(
                VerdictClass.TERMINAL,
                terminal_actions=tuple(xdp_action_name(v) for v in hiding),
                reason=f"can return {shown} at an exit it reaches: {ends} (what its other "
                "exits return could not be determined)",
            )
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason=_UNKNOWN_REASON)
    if not values:
        return ClassifierVerdict(VerdictClass.UNKNOWN, reason="no return value was found")
    hiding = _xdp_hiding(values)
    if hiding:
        names = ", ".join(f"{xdp_action_name(v)} ({v})" for v in hiding)
        return ClassifierVerdict(
            VerdictClass.TERMINAL,
            terminal_actions=tuple(xdp_action_name(v) for v in hiding),
            reason=f"can return {names}: {ends}",
        )
    return ClassifierVerdict(
        VerdictClass.TRANSPARENT,
        reason="returns only XDP_PASS (2): the packet goes on to the device's ingress hooks",
    )


def classify_non_bpf_filter(
    kind: str,
    actions: tuple[str, ...] = (),
    controls: tuple[tuple[int, ...], ...] | None = None,
    u32_terminal: bool | None = None,
    u32_link: int | None = None,
) -> ClassifierVerdict:
    """u32, flower, matchall, ...: a match runs the filter's actions, whose result ends the
    chain unless it is TC_ACT_UNSPEC (`continue`). Without the actions' `controls` (one per
    action), every match is taken to end the chain."""
    if controls is not None and _controls_known(actions, controls):
        if kind == "u32" and u32_terminal is not None:
            return classify_u32_key(actions, controls, u32_terminal, u32_link)
        return actions_verdict(actions, controls, f"{kind} filter: a match")
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


# --- filter actions (tcf_action_exec) ---------------------------------------------------------


@dataclass(frozen=True)
class ActionsOutcome:
    """What a filter's actions can return on a match (tcf_action_exec), and which of the
    actions they reach tcprio cannot model (their index)."""

    results: frozenset[int]
    unmodelled: frozenset[int] = frozenset()


def _is_ext(value: int, opcode: int) -> bool:
    return value & ~TC_ACT_EXT_VAL_MASK == opcode


def _run_from(
    controls: tuple[tuple[int, ...], ...], state: tuple[int, int, int], out: set[int]
) -> tuple[list[tuple[int, int, int]], set[int]]:
    """Run the actions from `start` on (`jumps` left, `last` the value returned before);
    returns the restarts (`jump`) to explore and the unmodelled actions reached. Ends when an
    action returns anything but TC_ACT_PIPE."""
    start, jumps, last = state
    restarts: list[tuple[int, int, int]] = []
    if start >= len(controls):
        out.add(last)  # a jump past every action: tcf_action_exec returns the jump itself
        return restarts, set()
    for index in range(start, len(controls)):
        verdicts = controls[index]
        if not verdicts:
            return restarts, {index}
        for value in verdicts:
            if value == TC_ACT_REPEAT:
                out.add(TC_ACT_OK)  # repeated 32 times, then "stop pipeline": TC_ACT_OK
            elif _is_ext(value, TC_ACT_JUMP):
                skip = value & TCA_ACT_MAX_PRIO_MASK
                if not skip or skip > len(controls) or jumps <= 1:
                    out.add(TC_ACT_OK)  # a faulty jump stops the pipeline with TC_ACT_OK
                else:
                    restarts.append((skip, jumps - 1, value))  # restart, `skip` skipped
            elif value != TC_ACT_PIPE:
                out.add(value)
        if TC_ACT_PIPE not in verdicts:
            return restarts, set()
    out.add(TC_ACT_PIPE)  # the last action piped: tcf_action_exec returns TC_ACT_PIPE
    return restarts, set()


def actions_outcome(controls: tuple[tuple[int, ...], ...]) -> ActionsOutcome:
    """What tcf_action_exec returns for actions with these verdicts (TC_ACT_OK without any)."""
    if not controls:
        return ActionsOutcome(frozenset({TC_ACT_OK}))
    results: set[int] = set()
    unmodelled: set[int] = set()
    pending, seen = [(0, TCA_ACT_MAX_PRIO, TC_ACT_OK)], set()
    while pending:
        state = pending.pop()
        if state in seen:
            continue
        seen.add(state)
        restarts, missing = _run_from(controls, state, results)
        pending.extend(restarts)
        unmodelled |= missing
    return ActionsOutcome(frozenset(results), frozenset(unmodelled))


def describe_result(value: int) -> str:
    if _is_ext(value, TC_ACT_GOTO_CHAIN):
        return f"goto chain {value & TC_ACT_EXT_VAL_MASK}"
    if value < 0:
        return f"{describe_value(value)} (continue)" if value == TC_ACT_UNSPEC else f"value {value}"
    return describe_value(value)


def _result_name(value: int) -> str:
    if _is_ext(value, TC_ACT_GOTO_CHAIN):
        return f"goto chain {value & TC_ACT_EXT_VAL_MASK}"
    return action_name(value)


def _ending_note(ending: list[int]) -> str:
    notes = []
    if TC_ACT_PIPE in ending:
        notes.append("TC_ACT_PIPE from the last action ends it too")
    if any(_is_ext(v, TC_ACT_GOTO_CHAIN) for v in ending):
        notes.append("a goto chain never comes back to this chain")
    return f" ({'; '.join(notes)})" if notes else ""


def actions_verdict(
    actions: tuple[str, ...], controls: tuple[tuple[int, ...], ...], what: str
) -> ClassifierVerdict:
    """What a match does to the filter chain: its actions' result ends the chain unless it is
    negative (TC_ACT_UNSPEC: `continue`), which makes the classifier try its next key, then
    the next filter (u32_classify, cls_bpf_classify, __tcf_classify). `what` starts the
    reason ("u32 filter: a match")."""
    outcome = actions_outcome(controls)
    ending = sorted(v for v in outcome.results if v >= 0)
    kinds = f"its actions ({', '.join(actions)})" if actions else "it has no actions:"
    if ending:
        shown = ", ".join(describe_result(v) for v in ending)
        unsure = " (some of its actions are not modelled)" if outcome.unmodelled else ""
        return ClassifierVerdict(
            VerdictClass.TERMINAL,
            terminal_actions=tuple(_result_name(v) for v in ending),
            reason=f"{what} ends the clsact filter chain: {kinds} can return {shown}"
            f"{_ending_note(ending)}{unsure}",
        )
    if outcome.unmodelled:
        names = ", ".join(actions[i] for i in sorted(outcome.unmodelled) if i < len(actions))
        return ClassifierVerdict(
            VerdictClass.UNKNOWN,
            reason=f"{what} runs actions whose verdict tcprio does not model ({names})",
        )
    shown = ", ".join(describe_result(v) for v in sorted(outcome.results))
    return ClassifierVerdict(
        VerdictClass.TRANSPARENT,
        reason=f"{what} runs {kinds}, which only return {shown}: the next filter always runs",
    )


def _controls_known(actions: tuple[str, ...], controls: tuple[tuple[int, ...], ...]) -> bool:
    return len(controls) == len(actions)


def classify_u32_key(
    actions: tuple[str, ...],
    controls: tuple[tuple[int, ...], ...],
    terminal: bool,
    link: int | None = None,
) -> ClassifierVerdict:
    """One u32 key: without TC_U32_TERMINAL (no classid, no actions) a match never ends the
    chain itself; with `link`, the keys of the linked hash table (listed on their own) decide."""
    if not terminal:
        if link is not None:
            reason = (
                f"u32 key linking to hash table {link >> 20:x}: the keys of that table decide;"
                " this one has no classid or actions of its own"
            )
        else:
            reason = "u32 key without classid or actions: a match does nothing"
        return ClassifierVerdict(VerdictClass.TRANSPARENT, reason=f"{reason}, the next filter runs")
    return actions_verdict(actions, controls, "u32 filter: a match")
