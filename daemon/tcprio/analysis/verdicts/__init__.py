"""What a BPF classifier can return: abstract interpretation of its translated (xlated) code.

Pure: the program images, the maps (with their prog-array slots) and the kernel's helper names
come in as data; the exit paths and the values r0 may hold there come out. The analysis follows
BPF-to-BPF calls and tail calls, and reports a path as unknown whenever it cannot model it.

Abstract values of a register or a stack slot:
- Consts: a small set of known 64-bit values (beyond AnalysisLimits.max_values: Unknown);
- Unknown: anything, with the reason it is unknown and whether it may point into a stack;
- FramePtr: the frame pointer of call frame N plus a known offset;
- MapPtr: the address of one of a few maps (ld_imm64 with BPF_PSEUDO_MAP_FD).
"""

from __future__ import annotations

import functools
import heapq
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from tcprio.analysis.semantics import describe_values
from tcprio.model import ExitPath, Instruction, MapInfo, ProgramInfo, ProgramVerdicts

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF

# Instruction classes, operations, sizes and modes (include/uapi/linux/bpf.h).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_OR, OP_AND, OP_LSH, OP_RSH = range(0x00, 0x80, 0x10)
OP_NEG, OP_MOD, OP_XOR, OP_MOV, OP_ARSH, OP_END = range(0x80, 0xE0, 0x10)
J_JA, J_JEQ, J_JGT, J_JGE, J_JSET, J_JNE, J_JSGT, J_JSGE = range(0x00, 0x80, 0x10)
J_CALL, J_EXIT, J_JLT, J_JLE, J_JSLT, J_JSLE, J_JCOND = range(0x80, 0xF0, 0x10)
SRC_X = 0x08
SIZE_BYTES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}
MODE_IMM, MODE_ABS, MODE_IND, MODE_MEM, MODE_MEMSX = 0x00, 0x20, 0x40, 0x60, 0x80
MODE_ATOMIC = 0xC0
LD_IMM64 = LD | MODE_IMM | 0x18
ST_NOSPEC = ST | 0xC0  # speculation barrier: does nothing to the state

PSEUDO_MAP_FD, PSEUDO_MAP_VALUE, PSEUDO_BTF_ID, PSEUDO_FUNC = 1, 2, 3, 4
PSEUDO_CALL, PSEUDO_KFUNC_CALL = 1, 2
BPF_FUNC_TAIL_CALL = 12

ATOMIC_FETCH = 0x01
ATOMIC_OPS = frozenset({OP_ADD, OP_OR, OP_AND, OP_XOR})
ATOMIC_XCHG, ATOMIC_CMPXCHG = 0xE0 | ATOMIC_FETCH, 0xF0 | ATOMIC_FETCH
ATOMIC_LOAD_ACQ, ATOMIC_STORE_REL = 0x100, 0x110

CONDITIONAL_JUMPS = frozenset(
    {J_JEQ, J_JGT, J_JGE, J_JSET, J_JNE, J_JSGT, J_JSGE, J_JLT, J_JLE, J_JSLT, J_JSLE}
)
# `if rX op rX`: these always hold, these never do (jset holds unless rX is 0).
_SELF_ALWAYS = frozenset({J_JEQ, J_JGE, J_JLE, J_JSGE, J_JSLE})
_SELF_NEVER = frozenset({J_JNE, J_JGT, J_JLT, J_JSGT, J_JSLT})

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
MAX_ORIGINS = 4
AX = 11  # the verifier's scratch register, seen in rewritten code (may_goto, ...)
WRITABLE = frozenset({*range(10), AX})
MAX_COMBINED_VALUES = 1024  # the join caps them again; this only bounds the work
# How far below its r10 a frame's stack reaches: MAX_BPF_STACK (512), plus the slots the verifier
# itself adds when it inlines bpf_loop or rewrites may_goto. The verifier refuses a store beyond
# it; the analysis does too, so that garbage offsets cannot make the stack (and each state) huge.
STACK_FRAME_BYTES = 512 + 64


@dataclass(frozen=True)
class AnalysisLimits:
    max_insn_visits: int = 1_000_000  # instructions interpreted, over every program and pass
    max_call_depth: int = 8  # call frames, like the kernel's MAX_CALL_FRAMES
    max_tail_call_depth: int = 33  # programs chained by tail calls, like MAX_TAIL_CALL_CNT
    max_programs: int = 64  # distinct programs followed through tail calls
    max_contexts: int = 4096  # (call stack, program) pairs analysed separately
    max_values: int = 32  # known values per register before it becomes Unknown
    # Wall-clock time per program, None for none. The visit budget alone bounds a pathological
    # program at tens of seconds: the daemon's event loop (and systemd's watchdog) cannot wait.
    max_seconds: float | None = None


# --- abstract values -----------------------------------------------------------------------


class Consts:
    __slots__ = ("origins", "values")

    def __init__(self, values: frozenset[int], origins: frozenset[str] = frozenset()) -> None:
        self.values = values
        self.origins = origins

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Consts)
            and self.values == other.values
            and self.origins == other.origins
        )

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        return f"Consts({sorted(self.values)})"


class Unknown:
    __slots__ = ("may_stack", "reason")

    def __init__(self, reason: str, may_stack: bool = False) -> None:
        self.reason = reason  # completes "r0 ...": "was loaded from memory at pc 17"
        self.may_stack = may_stack  # may point into a stack: stores through it clobber slots

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Unknown)
            and self.may_stack == other.may_stack
            and self.reason == other.reason
        )

    def __hash__(self) -> int:
        return hash(self.reason)

    def __repr__(self) -> str:
        return f"Unknown({self.reason!r}{', stack' if self.may_stack else ''})"


class FramePtr:
    __slots__ = ("frame", "off")

    def __init__(self, frame: int, off: int) -> None:
        self.frame = frame
        self.off = off

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FramePtr) and self.frame == other.frame and self.off == other.off

    def __hash__(self) -> int:
        return hash((self.frame, self.off))

    def __repr__(self) -> str:
        return f"FramePtr({self.frame}, {self.off})"


class MapPtr:
    __slots__ = ("ids",)

    def __init__(self, ids: frozenset[int]) -> None:
        self.ids = ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MapPtr) and self.ids == other.ids

    def __hash__(self) -> int:
        return hash(self.ids)

    def __repr__(self) -> str:
        return f"MapPtr({sorted(self.ids)})"


Value = Consts | Unknown | FramePtr | MapPtr
Piece = tuple[int, int, Value]  # (first byte in the 8-byte slot, size, value)
SlotKey = tuple[int, int]  # (call frame, offset of the slot from that frame's r10)

UNINIT_STACK = Unknown("was loaded from a stack slot not written on every path")


def may_point_to_stack(value: Value) -> bool:
    return isinstance(value, FramePtr) or (isinstance(value, Unknown) and value.may_stack)


def const(value: int, origin: str | None = None) -> Consts:
    return Consts(frozenset({value & U64}), frozenset({origin}) if origin else frozenset())


def join(a: Value, b: Value, cap: int) -> Value:
    """Least upper bound; returns `a` itself whenever it already covers `b`."""
    if a is b:
        return a
    if isinstance(a, Consts) and isinstance(b, Consts):
        if b.values <= a.values and b.origins <= a.origins:
            return a
        values = a.values | b.values
        if len(values) > cap:
            return Unknown(f"has more than {cap} possible values")
        return Consts(values, _join_origins(a.origins, b.origins))
    if isinstance(a, Unknown):
        if a.may_stack or not may_point_to_stack(b):
            return a
        return Unknown(a.reason, True)
    if isinstance(b, Unknown):
        return Unknown(b.reason, b.may_stack or may_point_to_stack(a))
    if a == b:
        return a
    if isinstance(a, MapPtr) and isinstance(b, MapPtr):
        return MapPtr(a.ids | b.ids)
    if isinstance(a, FramePtr) and isinstance(b, FramePtr):
        return Unknown("is a stack pointer whose offset varies", True)
    return Unknown("mixes numbers and pointers", may_point_to_stack(a) or may_point_to_stack(b))


def _join_origins(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    both = a | b
    if len(both) <= MAX_ORIGINS:
        return both
    return frozenset(sorted(both)[:MAX_ORIGINS])


# --- the stack -----------------------------------------------------------------------------


def _mask(nbytes: int) -> int:
    return (1 << (8 * nbytes)) - 1


def _narrow(value: Value, size: int) -> Value:
    """What a `size`-byte store of `value` leaves in memory."""
    if size == 8:
        return value
    if isinstance(value, Consts):
        return Consts(frozenset(v & _mask(size) for v in value.values), value.origins)
    if isinstance(value, Unknown):
        return Unknown(value.reason) if value.may_stack else value
    return Unknown("is part of a pointer")


def _extract(value: Value, start: int, size: int) -> Value:
    """Bytes [start, start+size) of a stored value, little-endian."""
    if isinstance(value, Consts):
        return Consts(frozenset((v >> (8 * start)) & _mask(size) for v in value.values))
    return Unknown("was loaded from part of a stack slot")


def _clobbered(pieces: tuple[Piece, ...], reason: str) -> tuple[Piece, ...]:
    may_stack = any(may_point_to_stack(v) for _, _, v in pieces)
    return ((0, 8, Unknown(reason, may_stack)),)


def stack_store(
    stack: dict[SlotKey, tuple[Piece, ...]], frame: int, off: int, size: int, value: Value
) -> dict[SlotKey, tuple[Piece, ...]]:
    base = off - off % 8
    start = off - base
    if start % size or start + size > 8:  # the verifier refuses misaligned stack accesses
        return stack_clobber(stack, frame, off, off + size, "was overwritten by a misaligned store")
    key = (frame, base)
    end = start + size
    kept: list[Piece] = []
    for p_start, p_size, p_value in stack.get(key, ()):
        p_end = p_start + p_size
        if p_end <= start or p_start >= end:
            kept.append((p_start, p_size, p_value))
            continue
        if p_start < start:
            kept.append((p_start, start - p_start, _extract(p_value, 0, start - p_start)))
        if p_end > end:
            kept.append((end, p_end - end, _extract(p_value, end - p_start, p_end - end)))
    kept.append((start, size, _narrow(value, size)))
    kept.sort(key=lambda p: p[0])
    new = dict(stack)
    new[key] = tuple(kept)
    return new


def stack_load(
    stack: Mapping[SlotKey, tuple[Piece, ...]], frame: int, off: int, size: int
) -> Value:
    base = off - off % 8
    start = off - base
    if start % size or start + size > 8:
        return Unknown("was loaded from a misaligned stack address")
    pieces = stack.get((frame, base))
    if not pieces:
        return Unknown("was loaded from a stack slot never written")
    end = start + size
    for p_start, p_size, p_value in pieces:
        if p_start == start and p_size == size:
            if size == 8 or not isinstance(p_value, Unknown) or not p_value.may_stack:
                return p_value
            return Unknown(p_value.reason)
        if p_start <= start and end <= p_start + p_size:
            return _extract(p_value, start - p_start, size)
    return _combine_pieces(pieces, start, end)


def _combine_pieces(pieces: tuple[Piece, ...], start: int, end: int) -> Value:
    """Bytes [start, end) assembled from several known pieces (e.g. two 4-byte stores)."""
    results = frozenset({0})
    covered = start
    for p_start, p_size, p_value in pieces:
        p_end = p_start + p_size
        if p_end <= start or p_start >= end:
            continue
        lo, hi = max(p_start, start), min(p_end, end)
        if lo != covered or not isinstance(p_value, Consts):
            return Unknown("was loaded from a partly known stack slot")
        part = _extract(p_value, lo - p_start, hi - lo)
        assert isinstance(part, Consts)
        shift = 8 * (lo - start)
        results = frozenset(r | v << shift for r in results for v in part.values)
        if len(results) > MAX_COMBINED_VALUES:
            return Unknown("was loaded from a stack slot with too many possible values")
        covered = hi
    if covered != end:
        return Unknown("was loaded from a partly written stack slot")
    return Consts(results)


def stack_clobber(
    stack: dict[SlotKey, tuple[Piece, ...]],
    frame: int | None,
    lo: int,
    hi: int,
    reason: str,
) -> dict[SlotKey, tuple[Piece, ...]]:
    """Forget what the slots overlapping [lo, hi) of `frame` (every frame when None) hold."""
    hit = [
        key
        for key in stack
        if (frame is None or key[0] == frame) and key[1] < hi and key[1] + 8 > lo
    ]
    if not hit:
        return stack
    new = dict(stack)
    for key in hit:
        new[key] = _clobbered(new[key], reason)
    return new


def _join_slot(a: tuple[Piece, ...], b: tuple[Piece, ...], cap: int) -> tuple[Piece, ...]:
    if a == b:
        return a
    if len(a) == len(b) and all(x[0] == y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True)):
        joined = tuple((x[0], x[1], join(x[2], y[2], cap)) for x, y in zip(a, b, strict=True))
        return a if all(j[2] is x[2] for j, x in zip(joined, a, strict=True)) else joined
    # Different layouts: group the overlapping pieces of both sides.
    # By offset, size and side only: two pieces at the same place must never compare values.
    tagged = sorted(
        [(s, z, v, 0) for s, z, v in a] + [(s, z, v, 1) for s, z, v in b],
        key=lambda item: (item[0], item[1], item[3]),
    )
    groups: list[list[tuple[int, int, Value, int]]] = []
    group_end = -1
    for item in tagged:
        if item[0] >= group_end:
            groups.append([])
        groups[-1].append(item)
        group_end = max(group_end, item[0] + item[1])
    out: list[Piece] = []
    for group in groups:
        first, *rest = group
        if not rest:
            out.append((first[0], first[1], join(first[2], UNINIT_STACK, cap)))
        elif len(rest) == 1 and rest[0][:2] == first[:2] and rest[0][3] != first[3]:
            out.append((first[0], first[1], join(first[2], rest[0][2], cap)))
        else:
            lo = min(p[0] for p in group)
            hi = max(p[0] + p[1] for p in group)
            may_stack = any(may_point_to_stack(p[2]) for p in group)
            out.append((lo, hi - lo, Unknown("mixes different stack layouts", may_stack)))
    return tuple(out)


def _join_stack(
    a: dict[SlotKey, tuple[Piece, ...]], b: dict[SlotKey, tuple[Piece, ...]], cap: int
) -> dict[SlotKey, tuple[Piece, ...]]:
    if a is b:
        return a
    out: dict[SlotKey, tuple[Piece, ...]] = {}
    changed = False
    for key in a.keys() | b.keys():
        pa = a.get(key, ())
        merged = _join_slot(pa, b.get(key, ()), cap)
        out[key] = merged
        if merged is not pa and merged != pa:
            changed = True
    return out if changed else a


# --- the machine state ---------------------------------------------------------------------

Regs = tuple[Value, ...]  # r0 .. r10, then r11: the verifier's scratch register AX


class State:
    __slots__ = ("frames", "regs", "stack")

    def __init__(
        self, regs: Regs, stack: dict[SlotKey, tuple[Piece, ...]], frames: tuple[Regs, ...]
    ) -> None:
        self.regs = regs
        self.stack = stack  # never mutated once in a State: copy on write
        self.frames = frames  # r6..r10 saved by each caller frame, outermost first


def _join_regs(a: Regs, b: Regs, cap: int) -> Regs:
    if a is b:
        return a
    joined = tuple(join(x, y, cap) for x, y in zip(a, b, strict=True))
    return a if all(j is x for j, x in zip(joined, a, strict=True)) else joined


def join_states(old: State, new: State, cap: int) -> State | None:
    """The join of two states, or None when `old` already covers `new`."""
    regs = _join_regs(old.regs, new.regs, cap)
    stack = _join_stack(old.stack, new.stack, cap)
    if len(old.frames) != len(new.frames):  # cannot happen: contexts fix the depth
        frames = old.frames
    else:
        frames = tuple(_join_regs(x, y, cap) for x, y in zip(old.frames, new.frames, strict=True))
        if all(f is g for f, g in zip(frames, old.frames, strict=True)):
            frames = old.frames
    if regs is old.regs and stack is old.stack and frames is old.frames:
        return None
    return State(regs, stack, frames)


# --- arithmetic ----------------------------------------------------------------------------


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def _s32(value: int) -> int:
    return _signed(value & U32, 32)


def _arith(op: int, x: int, y: int, bits: int, signed: bool) -> int:
    mask = (1 << bits) - 1
    x &= mask
    y &= mask
    if op == OP_ADD:
        r = x + y
    elif op == OP_SUB:
        r = x - y
    elif op == OP_MUL:
        r = x * y
    elif op == OP_DIV:
        r = 0 if y == 0 else (_sdiv(x, y, bits) if signed else x // y)
    elif op == OP_MOD:
        r = x if y == 0 else (_smod(x, y, bits) if signed else x % y)
    elif op == OP_OR:
        r = x | y
    elif op == OP_AND:
        r = x & y
    elif op == OP_XOR:
        r = x ^ y
    elif op == OP_LSH:
        r = x << (y & (bits - 1))
    elif op == OP_RSH:
        r = x >> (y & (bits - 1))
    else:  # OP_ARSH
        r = _signed(x, bits) >> (y & (bits - 1))
    return r & mask


def _sdiv(x: int, y: int, bits: int) -> int:
    sx, sy = _signed(x, bits), _signed(y, bits)
    q = abs(sx) // abs(sy)
    return q if (sx < 0) == (sy < 0) else -q


def _smod(x: int, y: int, bits: int) -> int:
    sx, sy = _signed(x, bits), _signed(y, bits)
    m = abs(sx) % abs(sy)
    return -m if sx < 0 else m


def _bswap(value: int, nbytes: int) -> int:
    return int.from_bytes((value & _mask(nbytes)).to_bytes(nbytes, "little"), "big")


def _end(value: int, to_be: bool, width: int, unconditional: bool) -> int:
    nbytes = width // 8
    if unconditional or to_be:  # the host is little-endian: to_le only truncates
        return _bswap(value, nbytes)
    return value & _mask(nbytes)


def _map_consts(value: Consts, fn, cap: int) -> Value:
    results = frozenset(fn(v) for v in value.values)
    return Consts(results) if len(results) <= cap else Unknown(f"has more than {cap} values")


def _submasks(mask: int) -> frozenset[int]:
    out = {0}
    bit = 1
    while bit <= mask:
        if mask & bit:
            out |= {v | bit for v in out}
        bit <<= 1
    return frozenset(out)


def _bounded_result(op: int, operand: int, bits: int, signed: bool, cap: int) -> Value | None:
    """What `unknown op K` can be when K alone bounds the result to a few values."""
    if op == OP_AND and bin(operand).count("1") <= cap.bit_length() - 1:
        return Consts(_submasks(operand))
    if op == OP_MOD and not signed and 0 < operand <= cap:
        return Consts(frozenset(range(operand)))
    if op == OP_RSH:
        width = bits - (operand & (bits - 1))
        if (1 << width) <= cap:
            return Consts(frozenset(range(1 << width)))
    return None


def _unknown_from(reason: str, *operands: Value) -> Unknown:
    for operand in operands:
        if isinstance(operand, Unknown):
            return Unknown(operand.reason)
    return Unknown(reason)


# --- conditional jumps ---------------------------------------------------------------------


def _holds(op: int, a: int, b: int, bits: int) -> bool:
    if op == J_JEQ:
        return a == b
    if op == J_JNE:
        return a != b
    if op == J_JGT:
        return a > b
    if op == J_JGE:
        return a >= b
    if op == J_JLT:
        return a < b
    if op == J_JLE:
        return a <= b
    if op == J_JSET:
        return a & b != 0
    sa, sb = _signed(a, bits), _signed(b, bits)
    if op == J_JSGT:
        return sa > sb
    if op == J_JSGE:
        return sa >= sb
    if op == J_JSLT:
        return sa < sb
    return sa <= sb  # J_JSLE


def _witnesses(known: int, bits: int) -> tuple[int, ...]:
    """Values of an unknown operand that decide whether a comparison with `known` can go
    either way: the extremes of both orders, `known` itself and a neighbour."""
    mask = (1 << bits) - 1
    return (0, mask, 1 << (bits - 1), mask >> 1, known, (known + 1) & mask)


Edge = tuple[bool, Value, Value]  # (possible, refined dst, refined src)


def branch_edges(op: int, d: Value, s: Value, bits: int, same_reg: bool) -> tuple[Edge, Edge]:
    """(taken, fall-through) edges of `if d op s`, with the operands refined on each."""
    mask = (1 << bits) - 1
    if same_reg:
        return _self_branch_edges(op, d, mask, bits)
    if isinstance(d, Consts) and isinstance(s, Consts):
        taken_d, taken_s, fall_d, fall_s = set(), set(), set(), set()
        for a in d.values:
            for b in s.values:
                if _holds(op, a & mask, b & mask, bits):
                    taken_d.add(a)
                    taken_s.add(b)
                else:
                    fall_d.add(a)
                    fall_s.add(b)
        return (
            (bool(taken_d), _refined(d, taken_d), _refined(s, taken_s)),
            (bool(fall_d), _refined(d, fall_d), _refined(s, fall_s)),
        )
    if isinstance(d, Consts) and _is_scalar_unknown(s):
        taken, fall = _split_against_unknown(op, d, bits, known_on_left=True)
        taken_s = fall_s = s
        if bits == 64 and op == J_JEQ and taken:
            taken_s = Consts(frozenset(taken))
        if bits == 64 and op == J_JNE and fall:
            fall_s = Consts(frozenset(fall))
        return (bool(taken), _refined(d, taken), taken_s), (bool(fall), _refined(d, fall), fall_s)
    if _is_scalar_unknown(d) and isinstance(s, Consts):
        taken, fall = _split_against_unknown(op, s, bits, known_on_left=False)
        taken_d = fall_d = d
        if bits == 64 and op == J_JEQ and taken:
            taken_d = Consts(frozenset(taken))
        if bits == 64 and op == J_JNE and fall:
            fall_d = Consts(frozenset(fall))
        return (bool(taken), taken_d, _refined(s, taken)), (bool(fall), fall_d, _refined(s, fall))
    return (True, d, s), (True, d, s)


def _self_branch_edges(op: int, d: Value, mask: int, bits: int) -> tuple[Edge, Edge]:
    if isinstance(d, Consts):
        taken = {a for a in d.values if _holds(op, a & mask, a & mask, bits)}
        fall = set(d.values) - taken
        return (bool(taken), _refined(d, taken), d), (bool(fall), _refined(d, fall), d)
    if op in _SELF_ALWAYS:
        return (True, d, d), (False, d, d)
    if op in _SELF_NEVER:
        return (False, d, d), (True, d, d)
    return (True, d, d), (True, d, d)


def _is_scalar_unknown(value: Value) -> bool:
    return isinstance(value, Unknown) and not value.may_stack


def _split_against_unknown(
    op: int, known: Consts, bits: int, known_on_left: bool
) -> tuple[set[int], set[int]]:
    """Split the known operand's values into those that can take / can skip the branch."""
    mask = (1 << bits) - 1
    taken: set[int] = set()
    fall: set[int] = set()
    for value in known.values:
        can_take, can_fall = _outcomes_against_unknown(op, value & mask, bits, known_on_left)
        if can_take:
            taken.add(value)
        if can_fall:
            fall.add(value)
    return taken, fall


@functools.lru_cache(maxsize=4096)
def _outcomes_against_unknown(
    op: int, known: int, bits: int, known_on_left: bool
) -> tuple[bool, bool]:
    outcomes = {
        _holds(op, known, w, bits) if known_on_left else _holds(op, w, known, bits)
        for w in _witnesses(known, bits)
    }
    return True in outcomes, False in outcomes


def _refined(value: Value, kept: set[int]) -> Value:
    if not isinstance(value, Consts) or not kept or len(kept) == len(value.values):
        return value
    return Consts(frozenset(kept), value.origins)


# --- program images ------------------------------------------------------------------------


Insn = tuple[int, int, int, int, int]  # code, dst, src, off, imm (imm: the full 64-bit value
# for ld_imm64)


@dataclass
class _Image:
    """A program decoded for the interpreter."""

    insns: list[Insn | None]  # None: the second half of an ld_imm64
    leaders: frozenset[int]  # where blocks start: jump targets and the pcs after jumps and calls
    broken: dict[int, str]  # pc -> why that instruction cannot be interpreted


def _decode(insns: tuple[Instruction, ...]) -> _Image:
    decoded: list[Insn | None] = []
    broken: dict[int, str] = {}
    pc = 0
    while pc < len(insns):
        i = insns[pc]
        code, dst, src = int(i.code) & 0xFF, int(i.dst) & 0xF, int(i.src) & 0xF
        off = _signed(int(i.off) & 0xFFFF, 16)
        imm = _s32(int(i.imm))
        if code != LD_IMM64:
            decoded.append((code, dst, src, off, imm))
            pc += 1
            continue
        if pc + 1 >= len(insns) or int(insns[pc + 1].code) & 0xFF != 0:
            decoded.append((code, dst, src, off, imm))
            broken[pc] = "a 64-bit immediate load is cut short"
            pc += 1
            continue
        high = int(insns[pc + 1].imm) & U32
        decoded.append((code, dst, src, off, (imm & U32) | high << 32))
        decoded.append(None)
        broken[pc + 1] = "a jump lands inside a 64-bit immediate load"
        pc += 2
    return _Image(decoded, _leaders(decoded), broken)


def _jump_target(insn: Insn, pc: int) -> int | None:
    """Where a jump (or a BPF-to-BPF call) goes; None for other instructions."""
    code, _dst, src, off, imm = insn
    cls, op = code & 7, code & 0xF0
    if cls == JMP and op == J_CALL:
        return pc + off + 1 if src == PSEUDO_CALL else None
    if cls == JMP32 and op == J_JA:
        return pc + imm + 1  # gotol
    if cls in (JMP, JMP32) and op not in (J_CALL, J_EXIT):
        return pc + off + 1
    return None


def _leaders(insns: list[Insn | None]) -> frozenset[int]:
    leaders = {0}
    for pc, insn in enumerate(insns):
        if insn is None or insn[0] & 7 not in (JMP, JMP32):
            continue
        target = _jump_target(insn, pc)
        if target is not None and 0 <= target < len(insns):
            leaders.add(target)
        leaders.add(pc + 1)
    return frozenset(leaders)


# --- the interpreter -----------------------------------------------------------------------

# A context: (callers, program, entry pc). callers = ((program, entry pc, call pc), ...), one per
# caller frame, outermost first. Each context is analysed on its own (call strings).
Ctx = tuple[tuple[tuple[int, int, int], ...], int, int]


class _Abort(Exception):
    """A global limit was reached: the analysis stops and the result is unknown."""


def _uninit_regs(frame: int) -> list[Value]:
    regs: list[Value] = [Unknown("is never set")] * 12
    regs[10] = FramePtr(frame, 0)
    return regs


class _Analysis:
    def __init__(
        self,
        root: int,
        programs: Mapping[int, ProgramInfo],
        maps: Mapping[int, MapInfo],
        helper_names: Mapping[int, str],
        limits: AnalysisLimits,
    ) -> None:
        self.root = root
        self.programs = programs
        self.maps = maps
        self.helper_names = helper_names
        self.limits = limits
        self.cap = limits.max_values
        self.images: dict[int, _Image] = {}
        self.tail_depth: dict[int, int] = {}
        self.tail_notes: dict[int, str] = {}
        self.contexts: list[Ctx] = []
        self.context_ids: dict[Ctx, int] = {}
        self.states: dict[tuple[int, int], State] = {}
        self.queue: list[tuple[int, int]] = []
        self.queued: set[tuple[int, int]] = set()
        self.exits: dict[tuple[int, int], Value] = {}
        self.unknown_paths: dict[tuple[int, int], str] = {}
        self.global_reasons: list[str] = []
        self.visits = 0
        self.deadline = (
            None if limits.max_seconds is None else time.monotonic() + limits.max_seconds
        )

    # -- driver --

    def run(self) -> None:
        info = self.programs.get(self.root)
        if info is None:
            self.global_reasons.append(f"program {self.root} is not available")
            return
        if info.insns is None:
            why = f": {info.error}" if info.error else ""
            self.global_reasons.append(f"the kernel did not show program {self.root}'s code{why}")
            return
        if not info.insns:
            self.global_reasons.append(f"program {self.root} has no instructions")
            return
        self.images[self.root] = _decode(info.insns)
        self.tail_depth[self.root] = 0
        regs = _uninit_regs(0)
        regs[1] = Unknown("is the context pointer")
        self._propagate(((), self.root, 0), 0, State(tuple(regs), {}, ()))
        try:
            while self.queue:
                node = heapq.heappop(self.queue)
                self.queued.discard(node)
                self._run_block(node[0], node[1], self.states[node])
        except _Abort as stop:
            self.global_reasons.append(str(stop))
            return
        if not self.exits and not self.unknown_paths:
            self.global_reasons.append("no reachable exit was found")

    def _context_id(self, ctx: Ctx, prog: int, pc: int) -> int | None:
        found = self.context_ids.get(ctx)
        if found is not None:
            return found
        if len(self.contexts) >= self.limits.max_contexts:
            self._unknown(prog, pc, f"more than {self.limits.max_contexts} call contexts")
            return None
        self.context_ids[ctx] = len(self.contexts)
        self.contexts.append(ctx)
        return len(self.contexts) - 1

    def _propagate(
        self, ctx: Ctx, pc: int, state: State, src: tuple[int, int] | None = None
    ) -> None:
        prog = ctx[1]
        ci = self._context_id(ctx, *(src or (prog, pc)))
        if ci is None:
            return
        image = self.images[prog]
        if not 0 <= pc < len(image.insns):
            where = src or (prog, pc)
            self._unknown(where[0], where[1], f"execution leaves the program (pc {pc})")
            return
        node = (ci, pc)
        old = self.states.get(node)
        if old is None:
            self.states[node] = state
        else:
            merged = join_states(old, state, self.cap)
            if merged is None:
                return
            self.states[node] = merged
        if node not in self.queued:
            self.queued.add(node)
            heapq.heappush(self.queue, node)

    def _unknown(self, prog: int, pc: int, reason: str) -> None:
        self.unknown_paths.setdefault((prog, pc), reason)

    def _exit(self, prog: int, pc: int, r0: Value) -> None:
        old = self.exits.get((prog, pc))
        self.exits[(prog, pc)] = r0 if old is None else join(old, r0, self.cap)

    # -- one basic block --

    def _run_block(self, ci: int, pc: int, state: State) -> None:
        ctx = self.contexts[ci]
        prog = ctx[1]
        image = self.images[prog]
        insns, leaders, broken = image.insns, image.leaders, image.broken
        regs = list(state.regs)
        stack = state.stack
        limit = self.limits.max_insn_visits
        while True:
            self.visits += 1
            if self.visits > limit:
                raise _Abort(f"analysis stopped after {limit} instructions (limit reached)")
            if not self.visits & 0xFFF and self.deadline and time.monotonic() > self.deadline:
                raise _Abort(
                    f"analysis stopped after {self.limits.max_seconds:g} s (time limit reached)"
                )
            if pc in broken:
                self._unknown(prog, pc, broken[pc])
                return
            insn = insns[pc]
            assert insn is not None
            code = insn[0]
            cls = code & 7
            if cls in (ALU, ALU64):
                problem = self._alu(regs, insn, pc)
                next_pc = pc + 1
            elif cls == LDX:
                problem = self._load(regs, stack, insn, pc)
                next_pc = pc + 1
            elif cls in (ST, STX):
                problem, stack = self._store(regs, stack, insn, pc)
                next_pc = pc + 1
            elif cls == LD:
                problem = self._ld(regs, insn, pc, prog, len(ctx[0]))
                next_pc = pc + 2 if code == LD_IMM64 else pc + 1
            elif code == JMP | J_CALL and insn[2] == 0 and insn[4] != BPF_FUNC_TAIL_CALL:
                problem, stack = self._helper_call(regs, stack, insn, pc)
                next_pc = pc + 1
            else:
                self._jump(ctx, pc, insn, State(tuple(regs), stack, state.frames))
                return
            if problem:
                self._unknown(prog, pc, problem)
                return
            if next_pc >= len(insns):
                self._unknown(prog, pc, "execution runs past the end of the program")
                return
            if next_pc in leaders:
                self._propagate(ctx, next_pc, State(tuple(regs), stack, state.frames), (prog, pc))
                return
            pc = next_pc

    # -- ALU --

    def _alu(self, regs: list[Value], insn: Insn, pc: int) -> str | None:
        code, dst, src, off, imm = insn
        is64 = code & 7 == ALU64
        op = code & 0xF0
        use_x = bool(code & SRC_X)
        if dst not in WRITABLE or (use_x and op not in (OP_NEG, OP_END) and src > AX):
            return f"invalid register in an ALU instruction at pc {pc}"
        if op == OP_END:
            if imm not in (16, 32, 64) or (is64 and use_x):
                return f"unsupported byte swap {code:#04x} (width {imm}) at pc {pc}"
            regs[dst] = self._unary(regs[dst], lambda v: _end(v, use_x, imm, is64), pc)
            return None
        if op == OP_NEG:
            if use_x:
                return f"unknown ALU operation {code:#04x} at pc {pc}"
            bits = 64 if is64 else 32
            regs[dst] = self._unary(
                regs[dst], lambda v: -(v & _mask(bits // 8)) & _mask(bits // 8), pc
            )
            return None
        if op > OP_END:
            return f"unknown ALU operation {code:#04x} at pc {pc}"
        operand = regs[src] if use_x else Consts(frozenset({(imm & U64) if is64 else imm & U32}))
        if op == OP_MOV:
            regs[dst] = self._mov(operand, is64, off, use_x, pc)
            return None
        if off not in (0, 1) or (off == 1 and op not in (OP_DIV, OP_MOD)):
            regs[dst] = Unknown(f"is computed by an unsupported ALU encoding at pc {pc}")
            return None
        regs[dst] = self._binary(op, regs[dst], operand, 64 if is64 else 32, off == 1, pc)
        return None

    def _unary(self, value: Value, fn, pc: int) -> Value:
        if isinstance(value, Consts):
            return _map_consts(value, fn, self.cap)
        return _unknown_from(f"is computed from a pointer at pc {pc}", value)

    def _mov(self, value: Value, is64: bool, off: int, use_x: bool, pc: int) -> Value:
        if is64 and off == 0:
            return value
        if off not in (0, 8, 16, 32) or (off == 32 and not is64) or (off and not use_x):
            return Unknown(f"is computed by an unsupported move at pc {pc}")
        if not isinstance(value, Consts):
            return _unknown_from(f"is a truncated pointer (pc {pc})", value)
        if off:
            bits = off

            def extend(v: int) -> int:
                return _signed(v & ((1 << bits) - 1), bits) & (U64 if is64 else U32)

            return _map_consts(value, extend, self.cap)
        if all(v <= U32 for v in value.values):
            return value
        return _map_consts(value, lambda v: v & U32, self.cap)

    def _binary(self, op: int, d: Value, s: Value, bits: int, signed: bool, pc: int) -> Value:
        if isinstance(d, Consts) and isinstance(s, Consts):
            results = frozenset(_arith(op, x, y, bits, signed) for x in d.values for y in s.values)
            if len(results) > self.cap:
                return Unknown(f"has more than {self.cap} possible values (pc {pc})")
            return Consts(results)
        if bits == 64 and op in (OP_ADD, OP_SUB):
            moved = self._pointer_arith(op, d, s)
            if moved is not None:
                return moved
        known = s if isinstance(s, Consts) else d if op in (OP_AND,) else None
        if isinstance(known, Consts) and len(known.values) == 1:
            (k,) = known.values
            bounded = _bounded_result(op, k & ((1 << bits) - 1), bits, signed, self.cap)
            if bounded is not None:
                return bounded
        may_stack = (
            bits == 64
            and op in (OP_ADD, OP_SUB)
            and (may_point_to_stack(d) or may_point_to_stack(s))
        )
        result = _unknown_from(f"is computed from a pointer at pc {pc}", d, s)
        return Unknown(result.reason, True) if may_stack else result

    @staticmethod
    def _pointer_arith(op: int, d: Value, s: Value) -> Value | None:
        if isinstance(d, FramePtr) and isinstance(s, Consts) and len(s.values) == 1:
            (k,) = s.values
            delta = _signed(k, 64)
            return FramePtr(d.frame, d.off + delta if op == OP_ADD else d.off - delta)
        if (
            op == OP_ADD
            and isinstance(s, FramePtr)
            and isinstance(d, Consts)
            and len(d.values) == 1
        ):
            (k,) = d.values
            return FramePtr(s.frame, s.off + _signed(k, 64))
        return None

    # -- memory --

    def _load(
        self, regs: list[Value], stack: dict[SlotKey, tuple[Piece, ...]], insn: Insn, pc: int
    ) -> str | None:
        code, dst, src, off, _imm = insn
        if dst not in WRITABLE or src > AX:
            return f"invalid register in a load at pc {pc}"
        size = SIZE_BYTES[code & 0x18]
        mode = code & 0xE0
        base = regs[src]
        if mode in (MODE_MEM, MODE_MEMSX) and isinstance(base, FramePtr):
            value = stack_load(stack, base.frame, base.off + off, size)
            if isinstance(value, Unknown) and value.reason.startswith("was loaded from"):
                value = Unknown(f"{value.reason} (pc {pc})")
            if mode == MODE_MEMSX and size < 8:
                value = self._sign_extend(value, size * 8, pc)
            regs[dst] = value
            return None
        # Through a pointer that may hit a stack, the value may be a spilled stack pointer.
        regs[dst] = Unknown(f"was loaded from memory at pc {pc}", may_point_to_stack(base))
        return None

    def _sign_extend(self, value: Value, bits: int, pc: int) -> Value:
        if isinstance(value, Consts):
            return _map_consts(
                value, lambda v: _signed(v & ((1 << bits) - 1), bits) & U64, self.cap
            )
        return _unknown_from(f"was loaded from the stack at pc {pc}", value)

    def _store(
        self, regs: list[Value], stack: dict[SlotKey, tuple[Piece, ...]], insn: Insn, pc: int
    ) -> tuple[str | None, dict[SlotKey, tuple[Piece, ...]]]:
        code, dst, src, off, imm = insn
        if code == ST_NOSPEC:
            return None, stack
        if dst > AX or (code & 7 == STX and src > AX):
            return f"invalid register in a store at pc {pc}", stack
        size = SIZE_BYTES[code & 0x18]
        mode = code & 0xE0
        if code & 7 == STX and mode == MODE_ATOMIC:
            return self._atomic(regs, stack, insn, size, pc)
        if mode != MODE_MEM:
            return None, self._clobber_through(regs[dst], off, size, stack, pc)
        value = regs[src] if code & 7 == STX else Consts(frozenset({imm & U64}))
        target = regs[dst]
        if isinstance(target, FramePtr):
            at = target.off + off
            if at < -STACK_FRAME_BYTES or at + size > 0:
                return f"store outside the stack frame (r10 {at:+d}) at pc {pc}", stack
            return None, stack_store(stack, target.frame, at, size, value)
        return None, self._clobber_through(target, off, size, stack, pc)

    @staticmethod
    def _clobber_through(
        target: Value, off: int, size: int, stack: dict[SlotKey, tuple[Piece, ...]], pc: int
    ) -> dict[SlotKey, tuple[Piece, ...]]:
        reason = f"was overwritten at pc {pc}"
        if isinstance(target, FramePtr):
            lo = target.off + off
            return stack_clobber(stack, target.frame, lo, lo + size, reason)
        if may_point_to_stack(target):
            return stack_clobber(stack, None, -(1 << 62), 1 << 62, reason)
        return stack

    def _atomic(
        self,
        regs: list[Value],
        stack: dict[SlotKey, tuple[Piece, ...]],
        insn: Insn,
        size: int,
        pc: int,
    ) -> tuple[str | None, dict[SlotKey, tuple[Piece, ...]]]:
        code, dst, src, off, imm = insn
        if imm == ATOMIC_LOAD_ACQ:
            if dst not in WRITABLE:
                return f"invalid register in an atomic load at pc {pc}", stack
            problem = self._load(
                regs, stack, (LDX | MODE_MEM | (code & 0x18), dst, src, off, 0), pc
            )
            return problem, stack
        if imm == ATOMIC_STORE_REL:
            return self._store(regs, stack, (STX | MODE_MEM | (code & 0x18), dst, src, off, 0), pc)
        if imm & ~ATOMIC_FETCH not in ATOMIC_OPS and imm not in (ATOMIC_XCHG, ATOMIC_CMPXCHG):
            return f"unknown atomic operation {imm:#x} at pc {pc}", stack
        stack = self._clobber_through(regs[dst], off, size, stack, pc)
        if imm == ATOMIC_CMPXCHG:
            regs[0] = Unknown(f"is the old value of an atomic compare-exchange at pc {pc}")
        elif imm & ATOMIC_FETCH:
            if src not in WRITABLE:
                return f"invalid register in an atomic operation at pc {pc}", stack
            regs[src] = Unknown(f"is the old value of an atomic operation at pc {pc}")
        return None, stack

    def _ld(self, regs: list[Value], insn: Insn, pc: int, prog: int, depth: int) -> str | None:
        code, dst, src, _off, imm = insn
        if code == LD_IMM64:
            if dst not in WRITABLE:
                return f"invalid register in a 64-bit immediate load at pc {pc}"
            regs[dst] = self._imm64(src, imm, pc)
            return None
        if code & 0xE0 in (MODE_ABS, MODE_IND) and code & 0x18 != 0x18:
            # Legacy packet load: a failed load ends the program with 0.
            if depth == 0:
                self._exit(prog, pc, const(0, f"failed packet load (LD_ABS/LD_IND) at pc {pc}"))
            else:
                self._unknown(prog, pc, "legacy packet load inside a subprogram")
            regs[0] = Unknown(f"was loaded from the packet at pc {pc}")
            for reg in range(1, 6):
                regs[reg] = Unknown(f"is clobbered by the packet load at pc {pc}")
            return None
        return f"unknown instruction {code:#04x} at pc {pc}"

    @staticmethod
    def _imm64(src: int, imm: int, pc: int) -> Value:
        if src == 0:
            return Consts(frozenset({imm}))
        map_id = imm & U32
        if src == PSEUDO_MAP_FD:
            return MapPtr(frozenset({map_id}))
        if src == PSEUDO_MAP_VALUE:
            return Unknown(f"is a pointer into map {map_id}'s value (pc {pc})")
        if src == PSEUDO_FUNC:
            return Unknown(f"is the address of a callback function (pc {pc})")
        return Unknown(f"is a kernel address (pc {pc})")

    # -- calls --

    def _helper_call(
        self, regs: list[Value], stack: dict[SlotKey, tuple[Piece, ...]], insn: Insn, pc: int
    ) -> tuple[str | None, dict[SlotKey, tuple[Piece, ...]]]:
        imm = insn[4]
        name = self.helper_names.get(imm)
        if name is not None:
            name = name.split(".", 1)[0]
        if name in VERDICT_HELPERS:
            regs[0] = self._verdict_helper_result(name, regs, pc)
        else:
            what = f"{name}()" if name else f"an unidentified helper (call imm {imm})"
            regs[0] = Unknown(f"is returned by {what} at pc {pc}")
            if not _reads_its_arguments_only(name):
                stack = self._clobber_arguments(regs, stack, pc)
        self._clobber_scratch(regs, pc)
        return None, stack

    @staticmethod
    def _verdict_helper_result(name: str, regs: list[Value], pc: int) -> Consts:
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

    @staticmethod
    def _clobber_arguments(
        regs: list[Value], stack: dict[SlotKey, tuple[Piece, ...]], pc: int
    ) -> dict[SlotKey, tuple[Piece, ...]]:
        """A helper (or a callback it runs) may write through any stack pointer it is given, and
        through the stack pointers stored where those point."""
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

    @staticmethod
    def _clobber_scratch(regs: list[Value], pc: int) -> None:
        for reg in (1, 2, 3, 4, 5, AX):
            regs[reg] = Unknown(f"is clobbered by the call at pc {pc}")

    # -- jumps, calls that leave the block, exits --

    def _jump(self, ctx: Ctx, pc: int, insn: Insn, state: State) -> None:
        code, _dst, src, off, _imm = insn
        prog = ctx[1]
        cls, op = code & 7, code & 0xF0
        if cls == JMP and op == J_EXIT:
            self._do_exit(ctx, pc, state)
        elif cls == JMP and op == J_CALL:
            if src == PSEUDO_CALL:
                self._bpf_call(ctx, pc, off, state)
            elif src == 0:
                self._tail_call(ctx, pc, state)
            elif src == PSEUDO_KFUNC_CALL:
                self._kfunc_call(ctx, pc, state)
            else:
                self._unknown(prog, pc, f"unknown kind of call (src {src}) at pc {pc}")
        elif op == J_JA or (cls == JMP and op == J_JCOND):
            target = _jump_target(insn, pc)
            assert target is not None
            self._goto(ctx, pc, target, state)
            if op == J_JCOND:  # may_goto: either way
                self._goto(ctx, pc, pc + 1, state)
        elif op in CONDITIONAL_JUMPS:
            self._conditional(ctx, pc, insn, state)
        else:
            self._unknown(prog, pc, f"unknown jump instruction {code:#04x} at pc {pc}")

    def _goto(self, ctx: Ctx, pc: int, target: int, state: State) -> None:
        image = self.images[ctx[1]]
        if not 0 <= target < len(image.insns):
            self._unknown(ctx[1], pc, f"jump to pc {target}, outside the program")
            return
        self._propagate(ctx, target, state, (ctx[1], pc))

    def _conditional(self, ctx: Ctx, pc: int, insn: Insn, state: State) -> None:
        code, dst, src, off, imm = insn
        use_x = bool(code & SRC_X)
        if dst > AX or (use_x and src > AX):
            self._unknown(ctx[1], pc, f"invalid register in a jump at pc {pc}")
            return
        bits = 32 if code & 7 == JMP32 else 64
        regs = state.regs
        right = regs[src] if use_x else Consts(frozenset({imm & U64}))
        taken, fall = branch_edges(code & 0xF0, regs[dst], right, bits, use_x and src == dst)
        for (possible, new_d, new_s), target in ((taken, pc + off + 1), (fall, pc + 1)):
            if not possible:
                continue
            if new_d is regs[dst] and (not use_x or new_s is regs[src]):
                edge_state = state
            else:
                refined = list(regs)
                if use_x:
                    refined[src] = new_s
                refined[dst] = new_d
                edge_state = State(tuple(refined), state.stack, state.frames)
            self._goto(ctx, pc, target, edge_state)

    def _do_exit(self, ctx: Ctx, pc: int, state: State) -> None:
        callers, prog, _entry = ctx
        r0 = state.regs[0]
        if not callers:
            self._exit(prog, pc, r0)
            return
        caller_prog, caller_entry, call_pc = callers[-1]
        depth = len(callers)
        if isinstance(r0, Consts):
            returned = frozenset({f"the subprogram called at pc {call_pc}"})
            r0 = Consts(r0.values, _join_origins(r0.origins, returned))
        clobbered = Unknown(f"is clobbered by the call at pc {call_pc}")
        regs = (r0, *(clobbered,) * 5, *state.frames[-1], clobbered)
        stack = {k: v for k, v in state.stack.items() if k[0] < depth}
        back = State(regs, stack, state.frames[:-1])
        self._propagate((callers[:-1], caller_prog, caller_entry), call_pc + 1, back, (prog, pc))

    def _bpf_call(self, ctx: Ctx, pc: int, off: int, state: State) -> None:
        callers, prog, entry = ctx
        target = pc + off + 1
        image = self.images[prog]
        depth = len(callers) + 1
        if not 0 <= target < len(image.insns):
            self._unknown(prog, pc, f"call to pc {target}, outside the program")
            return
        if depth >= self.limits.max_call_depth:
            self._unknown(prog, pc, f"calls nested deeper than {self.limits.max_call_depth}")
            return
        active = {(p, e) for p, e, _ in callers} | {(prog, entry)}
        if (prog, target) in active:
            self._unknown(prog, pc, f"recursive call to pc {target} at pc {pc}")
            return
        regs = _uninit_regs(depth)
        regs[1:6] = state.regs[1:6]
        stack = {k: v for k, v in state.stack.items() if k[0] < depth}
        callee = State(tuple(regs), stack, (*state.frames, state.regs[6:11]))
        self._propagate(((*callers, (prog, entry, pc)), prog, target), target, callee, (prog, pc))

    def _kfunc_call(self, ctx: Ctx, pc: int, state: State) -> None:
        regs = list(state.regs)
        stack = self._clobber_arguments(regs, state.stack, pc)
        regs[0] = Unknown(f"is returned by a kernel function (kfunc) at pc {pc}")
        self._clobber_scratch(regs, pc)
        self._goto(ctx, pc, pc + 1, State(tuple(regs), stack, state.frames))

    def _tail_call(self, ctx: Ctx, pc: int, state: State) -> None:
        prog = ctx[1]
        regs = state.regs
        table = regs[2]
        if not isinstance(table, MapPtr):
            self._unknown(prog, pc, f"tail call at pc {pc} through an unknown map")
        else:
            for map_id in sorted(table.ids):
                for slot, target in self._tail_targets(prog, pc, map_id, regs[3]):
                    self._enter_tail_call(ctx, pc, map_id, slot, target, state)
        # An empty slot, or the tail-call limit, lets execution continue after the call.
        after = list(regs)
        after[0] = Unknown(f"is not set after the failed tail call at pc {pc}")
        self._clobber_scratch(after, pc)
        self._goto(ctx, pc, pc + 1, State(tuple(after), state.stack, state.frames))

    def _tail_targets(self, prog: int, pc: int, map_id: int, index: Value) -> list[tuple[int, int]]:
        info = self.maps.get(map_id)
        if info is None or info.prog_array is None:
            why = "is not available" if info is None else "is not a program array"
            self._unknown(prog, pc, f"tail call at pc {pc}: map {map_id} {why}")
            return []
        slots = info.prog_array
        if isinstance(index, Consts):
            wanted = sorted({v & U32 for v in index.values})
            return [(slot, slots[slot]) for slot in wanted if slot in slots]
        return sorted(slots.items())

    def _enter_tail_call(
        self, ctx: Ctx, pc: int, map_id: int, slot: int, target: int, state: State
    ) -> None:
        callers, prog, _entry = ctx
        how = f"tail call to prog {target} via map {map_id} slot {slot}"
        info = self.programs.get(target)
        if info is None or info.insns is None:
            self._unknown(prog, pc, f"{how}: the program's code is not available")
            return
        if not info.insns:
            self._unknown(prog, pc, f"{how}: the program has no instructions")
            return
        if target not in self.images:
            if len(self.images) >= self.limits.max_programs:
                self._unknown(prog, pc, f"{how}: more than {self.limits.max_programs} programs")
                return
            depth = self.tail_depth[prog] + 1
            if depth > self.limits.max_tail_call_depth:
                self._unknown(
                    prog,
                    pc,
                    f"{how}: chain of more than {self.limits.max_tail_call_depth} tail calls",
                )
                return
            self.images[target] = _decode(info.insns)
            self.tail_depth[target] = depth
            self.tail_notes[target] = f"{how} (from prog {prog} pc {pc})"
        frame = len(callers)
        regs = _uninit_regs(frame)
        regs[1] = state.regs[1]
        stack = {k: v for k, v in state.stack.items() if k[0] < frame}
        self._propagate(
            (callers, target, 0), 0, State(tuple(regs), stack, state.frames), (prog, pc)
        )

    # -- results --

    def result(self) -> ProgramVerdicts:
        exits: list[ExitPath] = []
        reasons: list[str] = []
        for (prog, pc), r0 in self.exits.items():
            values = _return_values(r0)
            note = self._exit_note(prog, r0, values)
            exits.append(ExitPath(pc, prog, values, note))
            if values is None:
                reasons.append(f"exit at pc {pc} of prog {prog}: {note}")
        for (prog, pc), reason in self.unknown_paths.items():
            prefix = self.tail_notes.get(prog)
            note = f"unknown: {reason}" + (
                f" (in prog {prog}, reached by {prefix})" if prefix else ""
            )
            exits.append(ExitPath(pc, prog, None, note))
            reasons.append(f"pc {pc} of prog {prog}: {reason}")
        exits.sort(key=lambda e: (e.prog_id != self.root, e.prog_id, e.pc))
        reasons.extend(self.global_reasons)
        complete = not reasons and all(e.values is not None for e in exits)
        values = frozenset().union(*(e.values or () for e in exits)) if complete else None
        return ProgramVerdicts(self.root, values, tuple(exits), tuple(dict.fromkeys(reasons)))

    def _exit_note(self, prog: int, r0: Value, values: frozenset[int] | None) -> str:
        parts = []
        if prog in self.tail_notes:
            parts.append(self.tail_notes[prog])
        if values is None:
            if isinstance(r0, Unknown):
                parts.append(f"unknown: r0 {r0.reason}")
            else:
                parts.append("unknown: r0 holds a pointer")
        elif isinstance(r0, Consts) and r0.origins:
            parts.append("r0 from " + ", ".join(sorted(r0.origins)))
        else:
            parts.append("r0 is a constant")
        return "; ".join(parts)


def _reads_its_arguments_only(helper: str | None) -> bool:
    if helper is None:
        return False
    if helper in READ_ONLY_HELPERS:
        return True
    return "_and_" not in helper and READ_ONLY_MAP_OPS.match(helper) is not None


def _return_values(r0: Value) -> frozenset[int] | None:
    """The program's return value: r0's lower 32 bits, read as a signed int."""
    if not isinstance(r0, Consts):
        return None
    return frozenset(_s32(v) for v in r0.values)


# --- public API ----------------------------------------------------------------------------


def analyse_program(
    prog_id: int,
    programs: Mapping[int, ProgramInfo],
    maps: Mapping[int, MapInfo],
    helper_names: Mapping[int, str],
    limits: AnalysisLimits = AnalysisLimits(),
) -> ProgramVerdicts:
    """Every value program `prog_id` can return, following its calls and tail calls.

    Never raises: whatever cannot be followed makes the result unknown, with the reason.
    """
    analysis = _Analysis(prog_id, programs, maps, helper_names, limits)
    try:
        analysis.run()
        return analysis.result()
    except Exception as exc:  # a bug here must not take the scan down: report it as unknown
        reason = f"internal error in the verdict analysis: {type(exc).__name__}: {exc}"
        return ProgramVerdicts(prog_id, None, (), (reason,))


def explain(verdicts: ProgramVerdicts) -> list[str]:
    """Readable lines for --explain: the program's values, each exit path, why it is unknown."""
    if verdicts.values is None:
        lines = [f"prog {verdicts.prog_id}: return values unknown"]
    else:
        lines = [f"prog {verdicts.prog_id}: returns {describe_values(verdicts.values)}"]
    for path in verdicts.exits:
        where = f"pc {path.pc}"
        if path.prog_id != verdicts.prog_id:
            where += f" of prog {path.prog_id}"
        shown = "unknown" if path.values is None else describe_values(path.values)
        lines.append(f"  exit at {where}: {shown}" + (f" ({path.note})" if path.note else ""))
    if verdicts.unknown_reasons:
        lines.append("  unknown because:")
        lines.extend(f"    {reason}" for reason in verdicts.unknown_reasons)
    return lines
