"""What the verdict analysis knows of the kernel's helpers: which ones decide a verdict
(bpf_redirect*), which only read the memory they are given, which return 0 on success, which
run a callback of the program, and what a call may write in the stack (pure; helpers are named
through /proc/kallsyms).
"""

from __future__ import annotations

import re

from tcprio.analysis.verdicts.domain import (
    Consts,
    FramePtr,
    Piece,
    SlotKey,
    Value,
    may_point_to_stack,
    stack_clobber,
)

TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
BPF_F_INGRESS = 1
VERDICT_HELPERS = frozenset({"bpf_redirect", "bpf_redirect_peer", "bpf_redirect_neigh"})
# Helpers that only read the memory their pointer arguments point at: a key or value on the
# stack survives them. The verifier turns map helpers into calls of the map type's own
# operations (htab_map_lookup_elem, array_map_update_elem, ...): those match the pattern.
READ_ONLY_HELPERS = frozenset(
    {
        "bpf_map_lookup_elem",
        "bpf_map_update_elem",
        "bpf_map_delete_elem",
        "bpf_map_push_elem",
        "bpf_perf_event_output",
        "bpf_skb_event_output",
        "bpf_ringbuf_output",
        "bpf_skb_store_bytes",
        "bpf_trace_printk",
        "bpf_csum_diff",
        "bpf_skb_set_tunnel_key",
        "bpf_skb_set_tunnel_opt",
        "bpf_sk_lookup_tcp",
        "bpf_sk_lookup_udp",
        "bpf_skc_lookup_tcp",
        "bpf_tail_call",
    }
)
READ_ONLY_MAP_OPS = re.compile(r"^\w*_(lookup|update|delete|push)_elem$")
# Helpers that return 0 on success and a negative errno otherwise: 0 is a value their result may
# hold (a may-fact, see Unknown.also; the errno range is too wide to list, and continues in
# direct-action mode). The verifier calls map types' own update/delete/push operations.
ZERO_ON_SUCCESS_HELPERS = frozenset(
    {
        "bpf_skb_load_bytes",
        "bpf_skb_load_bytes_relative",
        "bpf_skb_store_bytes",
        "bpf_l3_csum_replace",
        "bpf_l4_csum_replace",
        "bpf_skb_change_proto",
        "bpf_skb_change_type",
        "bpf_skb_change_tail",
        "bpf_skb_change_head",
        "bpf_skb_adjust_room",
        "bpf_skb_vlan_push",
        "bpf_skb_vlan_pop",
        "bpf_skb_pull_data",
        "bpf_skb_get_tunnel_key",
        "bpf_skb_set_tunnel_key",
        "bpf_skb_set_tunnel_opt",
        "bpf_map_update_elem",
        "bpf_map_delete_elem",
        "bpf_map_push_elem",
        "bpf_skb_event_output",
        "bpf_ringbuf_output",
    }
)
# Helpers that run a callback of the program with a pointer the caller gave (bpf_loop's ctx...):
# the callback's code may write anywhere in the caller's frame through it, below it too. The
# verifier calls bpf_for_each_map_elem as the map type's own map_for_each_callback.
CALLBACK_HELPERS = frozenset(
    {"bpf_loop", "bpf_for_each_map_elem", "bpf_user_ringbuf_drain", "bpf_find_vma"}
    | {"bpf_for_each_array_elem", "bpf_for_each_hash_elem"}
)
ZERO_ON_SUCCESS_MAP_OPS = re.compile(r"^\w*_(update|delete|push)_elem$")
# bpf_fib_lookup (bpf_skb_fib_lookup in tc): BPF_FIB_LKUP_RET_SUCCESS (0) .. _FRAG_NEEDED (8).
FIB_LOOKUP_RESULTS = frozenset(range(9))


def verdict_helper_result(name: str, regs: list[Value], pc: int) -> Consts:
    """bpf_redirect*() return TC_ACT_REDIRECT, or TC_ACT_SHOT when their flags are bad."""

    def all_known(reg: int, ok) -> bool:
        value = regs[reg]
        return isinstance(value, Consts) and all(ok(v) for v in value.values)

    if name == "bpf_redirect":
        valid = all_known(2, lambda v: v & ~BPF_F_INGRESS == 0)
    elif name == "bpf_redirect_peer":
        valid = all_known(2, lambda v: v == 0)
    else:  # bpf_redirect_neigh(ifindex, params, plen, flags): no params and no flags
        valid = all_known(3, lambda v: v == 0) and all_known(4, lambda v: v == 0)
    values = {TC_ACT_REDIRECT} if valid else {TC_ACT_REDIRECT, TC_ACT_SHOT}
    return Consts(frozenset(values), frozenset({f"{name}() at pc {pc}"}))


def reads_its_arguments_only(helper: str | None) -> bool:
    if helper is None:
        return False
    if helper in READ_ONLY_HELPERS:
        return True
    return "_and_" not in helper and READ_ONLY_MAP_OPS.match(helper) is not None


def helper_may_return(helper: str | None) -> frozenset[int]:
    """Values a helper's result is known to take on some calls (never all it can take)."""
    if helper is None:
        return frozenset()
    if helper in ZERO_ON_SUCCESS_HELPERS or ZERO_ON_SUCCESS_MAP_OPS.match(helper):
        return frozenset({0})
    if helper in ("bpf_skb_fib_lookup", "bpf_fib_lookup"):
        return FIB_LOOKUP_RESULTS
    return frozenset()


def clobber_arguments(
    regs: list[Value], stack: dict[SlotKey, tuple[Piece, ...]], pc: int, whole: bool = False
) -> dict[SlotKey, tuple[Piece, ...]]:
    """A helper may write through any stack pointer it is given, at and above it, and through
    the stack pointers stored where those point. A callback it runs (`whole`) may also write
    below it: anywhere in the frame the pointer points into."""
    reason = f"may be written by the call at pc {pc}"
    pending: list[tuple[int, int]] = []
    for reg in range(1, 6):
        arg = regs[reg]
        if isinstance(arg, FramePtr):
            pending.append((arg.frame, arg.off))
        elif may_point_to_stack(arg):
            return stack_clobber(stack, None, -(1 << 62), 1 << 62, reason)
    done: set[tuple[int, int]] = set()
    while pending:
        region = pending.pop()
        if region in done:
            continue
        done.add(region)
        frame, lo = region
        lo = -(1 << 62) if whole else lo
        for key, pieces in stack.items():
            if key[0] != frame or key[1] + 8 <= lo:
                continue
            for _start, _size, value in pieces:
                if isinstance(value, FramePtr):
                    pending.append((value.frame, value.off))
                elif may_point_to_stack(value):
                    return stack_clobber(stack, None, -(1 << 62), 1 << 62, reason)
        stack = stack_clobber(stack, frame, lo, 1 << 62, reason)
    return stack
