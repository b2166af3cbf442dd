"""The context of a tc program as the verdict analysis models it: the pointer and its cb[] area.

A CNI keeps values in `skb->cb[]` across a tail call: its drop notification stores the reason in
cb[0] and the verdict in cb[1], tail-calls the notification program, and that program returns
cb[1]. In a sched_cls or sched_act program the verifier rewrites `skb->cb[i]` (net/core/filter.c,
bpf_convert_ctx_access) into a load or store of the same size and mode at
`offsetof(struct sk_buff, cb) + offsetof(struct qdisc_skb_cb, data) + 4 * i` from the context
register (48 + 4 * i on the 6.18 kernel the tests run on). That offset depends on the kernel
build: the kernel layer reads it from the running kernel's BTF, and the analysis gets it as data
(`CbArea`: first byte, length). Without it, or for other program types, the context stays an
unknown pointer and every context load an unknown value.

The model:
- r1 at the entry of a tc program is `CtxPtr`; copies, spills and BPF-to-BPF calls carry it, and
  a tail call gives the callee the context in r1 (the verifier demands it there);
- the 20 bytes of cb[] are kept as the stack slots of a pseudo frame, `CB_FRAME`, below every
  real frame: joins, calls, returns and tail calls (which keep the frames below the callee's)
  carry them, and narrow or wide accesses are read byte by byte, like spills;
- at a program's entry nothing is known of them: the kernel does not clear cb[] for tc;
- a load through the context inside cb[] reads them, any other context load is unknown; a store
  inside cb[] writes them, one that overlaps cb[] partly forgets the slots it touches, a store
  elsewhere in the context (mark, priority, tc_classid, ...) leaves them alone;
- a helper call forgets them, unless the helper is known to leave skb->cb alone or is given no
  argument that may be the context; a helper that runs a callback, one tcprio cannot name and a
  kfunc always do.
"""

from __future__ import annotations

import re

from tcprio.analysis.verdicts.domain import (
    Consts,
    CtxPtr,
    Piece,
    SlotKey,
    Unknown,
    Value,
    may_point_to_stack,
    stack_clobber,
    stack_load,
    stack_store,
)
from tcprio.analysis.verdicts.helpers import CALLBACK_HELPERS
from tcprio.analysis.verdicts.opcodes import U32
from tcprio.model import ProgramInfo

CbArea = tuple[int, int]  # (offset of cb[0] from the context pointer in xlated code, bytes)
Stack = dict[SlotKey, tuple[Piece, ...]]
CB_FRAME = -1  # the pseudo frame holding cb[]: below every real frame (0 .. call depth)
CB_SLOT_BYTES = 4  # __sk_buff.cb[] is u32[5]
TC_PROGRAM_TYPES = frozenset({3, 4})  # BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_SCHED_ACT
ENTRY_CONTEXT = Unknown("is the context pointer")  # when cb[] is not modelled
_EVERYWHERE = (-(1 << 62), 1 << 62)

# Helpers whose kernel code never writes the skb's cb[] (net/core/filter.c, kernel/bpf/helpers.c):
# they read or rewrite the packet, its checksums, tunnel metadata, vlan, hash or timestamp,
# clone it (bpf_clone_redirect sends the clone, whose cb[] is its own), look up routes, sockets
# or maps, or do not get the skb at all. The verifier's map operations match MAP_OPERATIONS.
CB_KEEPING_HELPERS = frozenset(
    {
        "bpf_skb_load_bytes",
        "bpf_skb_load_bytes_relative",
        "bpf_skb_store_bytes",
        "bpf_l3_csum_replace",
        "bpf_l4_csum_replace",
        "bpf_csum_diff",
        "bpf_csum_update",
        "bpf_csum_level",
        "bpf_skb_pull_data",
        "bpf_skb_change_proto",
        "bpf_skb_change_type",
        "bpf_skb_change_tail",
        "bpf_skb_change_head",
        "bpf_skb_adjust_room",
        "bpf_skb_vlan_push",
        "bpf_skb_vlan_pop",
        "bpf_skb_get_tunnel_key",
        "bpf_skb_set_tunnel_key",
        "bpf_skb_get_tunnel_opt",
        "bpf_skb_set_tunnel_opt",
        "bpf_redirect",
        "bpf_redirect_peer",
        "bpf_redirect_neigh",
        "bpf_clone_redirect",
        "bpf_skb_event_output",
        "bpf_perf_event_output",
        "bpf_skb_fib_lookup",
        "bpf_skb_check_mtu",
        "bpf_get_hash_recalc",
        "bpf_set_hash",
        "bpf_set_hash_invalid",
        "bpf_get_cgroup_classid",
        "bpf_skb_cgroup_classid",
        "bpf_skb_cgroup_id",
        "bpf_skb_ancestor_cgroup_id",
        "bpf_get_route_realm",
        "bpf_get_socket_cookie",
        "bpf_get_socket_uid",
        "bpf_skb_under_cgroup",
        "bpf_skb_ecn_set_ce",
        "bpf_skb_set_tstamp",
        "bpf_sk_lookup_tcp",
        "bpf_sk_lookup_udp",
        "bpf_skc_lookup_tcp",
        "bpf_sk_release",
        "bpf_user_rnd_u32",
        "bpf_get_prandom_u32",
        "bpf_ktime_get_ns",
        "bpf_ktime_get_boot_ns",
        "bpf_ktime_get_coarse_ns",
        "bpf_get_smp_processor_id",
        "bpf_get_raw_cpu_id",
        "bpf_get_numa_node_id",
        "bpf_jiffies64",
        "bpf_trace_printk",
        "bpf_ringbuf_output",
        "bpf_ringbuf_reserve",
        "bpf_ringbuf_submit",
        "bpf_ringbuf_discard",
        "bpf_spin_lock",
        "bpf_spin_unlock",
    }
)
MAP_OPERATIONS = re.compile(r"^\w*_(lookup|update|delete|push|pop|peek)_elem$")


def cb_area_of(ctx_cb: CbArea | None, root: ProgramInfo | None) -> CbArea | None:
    """The cb[] area the analysis of `root` models: only a tc program's, and only when known."""
    if ctx_cb is None or root is None or root.type not in TC_PROGRAM_TYPES:
        return None
    return ctx_cb


def entry_context(area: CbArea | None) -> Value:
    """What r1 holds at a program's entry."""
    return ENTRY_CONTEXT if area is None else CtxPtr()


def _overlap(area: CbArea, off: int, size: int) -> tuple[int, int] | None:
    """[lo, hi) of cb[] (counted from cb[0]) that `size` bytes at context offset `off` touch."""
    start, length = area
    lo, hi = max(off - start, 0), min(off - start + size, length)
    return (lo, hi) if lo < hi else None


def cb_load(area: CbArea | None, stack: Stack, off: int, size: int, pc: int) -> Value:
    """A load of `size` bytes at offset `off` from the context pointer."""
    rel = -1 if area is None else off - area[0]
    if area is None or _overlap(area, off, size) != (rel, rel + size):
        return Unknown(f"was loaded from memory at pc {pc}")  # another field, or partly cb[]
    value = stack_load(stack, CB_FRAME, rel, size)
    if not isinstance(value, Unknown) or not value.reason.startswith(_STACK_REASONS):
        return value  # what the program stored there (a constant, or its own unknown)
    why = _why(value.reason)
    where = f"skb->cb[{rel // CB_SLOT_BYTES}]"
    return Unknown(f"was loaded from {where} at pc {pc}, which {why}", value.may_stack, value.also)


# Reasons the stack model gives for slots it does not know (domain.py, helpers.py, interpreter)
_STACK_REASONS = (
    "was loaded from a stack slot",
    "was loaded from part of a stack slot",
    "was loaded from a partly",
    "was loaded from a misaligned",
    "mixes different stack layouts",
    "may be written by the call",
    "was overwritten",
    "is part of a pointer",
)


def _why(reason: str) -> str:
    if "never written" in reason:
        return "nothing set before (the kernel does not clear cb[] for tc)"
    if "not written on every path" in reason:
        return "is not set on every path"
    if reason.startswith(("may be written", "was overwritten")):
        return reason
    return "is only partly known"


def cb_store(
    area: CbArea | None, stack: Stack, off: int, size: int, value: Value, pc: int
) -> Stack:
    """A store of `size` bytes of `value` at offset `off` from the context pointer."""
    touched = None if area is None else _overlap(area, off, size)
    if touched is None:
        return stack  # another field of the context: mark, priority, tc_classid, ...
    assert area is not None
    rel = off - area[0]
    if touched != (rel, rel + size):
        return stack_clobber(stack, CB_FRAME, *touched, f"was overwritten at pc {pc}")
    # Two words at once (clang merges `cb[0] = a; cb[1] = b;`): kept word by word, so that
    # paths storing them one at a time join without loss. A pointer is kept whole.
    number = isinstance(value, Consts | Unknown) and not may_point_to_stack(value)
    if size == 8 and rel % 8 == 0 and isinstance(value, Consts | Unknown) and number:
        for half in (0, 1):
            stack = stack_store(stack, CB_FRAME, rel + 4 * half, 4, _half(value, half))
        return stack
    return stack_store(stack, CB_FRAME, rel, size, value)


def _half(value: Consts | Unknown, half: int) -> Value:
    """The lower (0) or upper (1) 4 bytes of an 8-byte number."""
    if isinstance(value, Consts):
        return Consts(frozenset((v >> 32 * half) & U32 for v in value.values), value.origins)
    return Unknown(value.reason, also=frozenset((v >> 32 * half) & U32 for v in value.also))


def cb_clobber(area: CbArea | None, stack: Stack, off: int, size: int, pc: int) -> Stack:
    """Another write at offset `off` from the context pointer (an atomic operation, say)."""
    touched = None if area is None else _overlap(area, off, size)
    if touched is None:
        return stack
    return stack_clobber(stack, CB_FRAME, *touched, f"was overwritten at pc {pc}")


def cb_after_helper(
    area: CbArea | None, name: str | None, regs: list[Value], stack: Stack, pc: int
) -> Stack:
    """What a helper call leaves of cb[] (`name` None: a helper tcprio cannot name)."""
    if area is None or not _may_write_cb(name, regs):
        return stack
    return cb_forget(area, stack, f"may be written by the call at pc {pc}")


def _may_write_cb(name: str | None, regs: list[Value]) -> bool:
    if name is None or name in CALLBACK_HELPERS:
        return True
    if name in CB_KEEPING_HELPERS or MAP_OPERATIONS.match(name):
        return False
    # An unknown argument may be the context whose identity a join lost.
    return any(isinstance(regs[reg], CtxPtr | Unknown) for reg in range(1, 6))


def cb_forget(area: CbArea | None, stack: Stack, reason: str) -> Stack:
    """Nothing is known of cb[] any more (a kfunc call, say)."""
    if area is None:
        return stack
    return stack_clobber(stack, CB_FRAME, *_EVERYWHERE, reason)
