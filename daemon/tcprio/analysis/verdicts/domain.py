"""The abstract domain of the verdict analysis: abstract values, the stack, the machine state,
arithmetic on abstract values and the refinement of operands by conditional jumps.

Abstract values of a register or a stack slot:
- Consts: a small set of known 64-bit values (beyond AnalysisLimits.max_values: Unknown);
- Unknown: anything, with the reason it is unknown, whether it may point into a stack, and
  the constants it is known to hold on some of the paths that reach it (`also`: joining
  `r0 = TC_ACT_SHOT` with a verdict read from a map keeps the SHOT; a classifier that may
  return it may end the chain whatever else it returns);
- FramePtr: the frame pointer of call frame N plus a known offset;
- MapPtr: the address of one of a few maps (ld_imm64 with BPF_PSEUDO_MAP_FD);
- CtxPtr: the program's context (a tc program's struct __sk_buff; see ctx.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from tcprio.analysis.verdicts.opcodes import (
    J_JEQ,
    J_JGE,
    J_JGT,
    J_JLE,
    J_JLT,
    J_JNE,
    J_JSET,
    J_JSGE,
    J_JSGT,
    J_JSLE,
    J_JSLT,
    OP_ADD,
    OP_AND,
    OP_DIV,
    OP_LSH,
    OP_MOD,
    OP_MUL,
    OP_OR,
    OP_RSH,
    OP_SUB,
    OP_XOR,
    U32,
    U64,
)

MAX_ORIGINS = 4
MAX_ALSO = 64  # constants an Unknown remembers; the smallest are kept (TC_ACT_* codes first)
MAX_COMBINED_VALUES = 1024  # the join caps them again; this only bounds the work
# `if rX op rX`: these always hold, these never do (jset holds unless rX is 0).
_SELF_ALWAYS = frozenset({J_JEQ, J_JGE, J_JLE, J_JSGE, J_JSLE})
_SELF_NEVER = frozenset({J_JNE, J_JGT, J_JLT, J_JSGT, J_JSLT})


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
    __slots__ = ("also", "may_stack", "reason")

    def __init__(
        self, reason: str, may_stack: bool = False, also: frozenset[int] = frozenset()
    ) -> None:
        self.reason = reason  # completes "r0 ...": "was loaded from memory at pc 17"
        self.may_stack = may_stack  # may point into a stack: stores through it clobber slots
        # 64-bit values it holds on some paths (a may-fact, never a bound): only joins add
        # them; every operation that changes the value drops them, branches filter them.
        self.also = also

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Unknown)
            and self.may_stack == other.may_stack
            and self.reason == other.reason
            and self.also == other.also
        )

    def __hash__(self) -> int:
        return hash(self.reason)

    def __repr__(self) -> str:
        extra = f", also {sorted(self.also)}" if self.also else ""
        return f"Unknown({self.reason!r}{', stack' if self.may_stack else ''}{extra})"


def _also(value: Value) -> frozenset[int]:
    """The constants a value is known to hold on some paths."""
    if isinstance(value, Consts):
        return value.values
    if isinstance(value, Unknown):
        return value.also
    return frozenset()


def _capped_also(values: frozenset[int]) -> frozenset[int]:
    return values if len(values) <= MAX_ALSO else frozenset(sorted(values)[:MAX_ALSO])


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


class CtxPtr:
    """The context pointer a tc program gets in r1 (only where its cb[] is modelled)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CtxPtr)

    def __hash__(self) -> int:
        return hash(CtxPtr)

    def __repr__(self) -> str:
        return "CtxPtr()"


Value = Consts | Unknown | FramePtr | MapPtr | CtxPtr
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
        return Consts(values, join_origins(a.origins, b.origins))
    if isinstance(a, Unknown):
        may_stack = a.may_stack or may_point_to_stack(b)
        also = _capped_also(a.also | _also(b))
        if may_stack == a.may_stack and also == a.also:
            return a
        return Unknown(a.reason, may_stack, also)
    if isinstance(b, Unknown):
        also = _capped_also(b.also | _also(a))
        return Unknown(b.reason, b.may_stack or may_point_to_stack(a), also)
    if a == b:
        return a
    if isinstance(a, MapPtr) and isinstance(b, MapPtr):
        return MapPtr(a.ids | b.ids)
    if isinstance(a, FramePtr) and isinstance(b, FramePtr):
        return Unknown("is a stack pointer whose offset varies", True)
    return Unknown("mixes numbers and pointers", may_point_to_stack(a) or may_point_to_stack(b))


def join_origins(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    both = a | b
    if len(both) <= MAX_ORIGINS:
        return both
    return frozenset(sorted(both)[:MAX_ORIGINS])


# --- the stack -----------------------------------------------------------------------------


def byte_mask(nbytes: int) -> int:
    return (1 << (8 * nbytes)) - 1


def _narrow(value: Value, size: int) -> Value:
    """What a `size`-byte store of `value` leaves in memory."""
    if size == 8:
        return value
    if isinstance(value, Consts):
        return Consts(frozenset(v & byte_mask(size) for v in value.values), value.origins)
    if isinstance(value, Unknown):
        if not value.may_stack and not value.also:
            return value
        return Unknown(value.reason, also=frozenset(v & byte_mask(size) for v in value.also))
    return Unknown("is part of a pointer")


def _extract(value: Value, start: int, size: int) -> Value:
    """Bytes [start, start+size) of a stored value, little-endian."""
    if isinstance(value, Consts):
        return Consts(frozenset((v >> (8 * start)) & byte_mask(size) for v in value.values))
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

# A context: (callers, program, entry pc). callers = ((program, entry pc, call pc), ...), one per
# caller frame, outermost first. Each context is analysed on its own (call strings).
Ctx = tuple[tuple[tuple[int, int, int], ...], int, int]


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


def uninit_regs(frame: int) -> list[Value]:
    regs: list[Value] = [Unknown("is never set")] * 12
    regs[10] = FramePtr(frame, 0)
    return regs


# --- arithmetic ----------------------------------------------------------------------------


def to_signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def s32(value: int) -> int:
    return to_signed(value & U32, 32)


def arith(op: int, x: int, y: int, bits: int, signed: bool) -> int:
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
        r = to_signed(x, bits) >> (y & (bits - 1))
    return r & mask


def _sdiv(x: int, y: int, bits: int) -> int:
    sx, sy = to_signed(x, bits), to_signed(y, bits)
    q = abs(sx) // abs(sy)
    return q if (sx < 0) == (sy < 0) else -q


def _smod(x: int, y: int, bits: int) -> int:
    sx, sy = to_signed(x, bits), to_signed(y, bits)
    m = abs(sx) % abs(sy)
    return -m if sx < 0 else m


def _bswap(value: int, nbytes: int) -> int:
    return int.from_bytes((value & byte_mask(nbytes)).to_bytes(nbytes, "little"), "big")


def byte_order(value: int, to_be: bool, width: int, unconditional: bool) -> int:
    nbytes = width // 8
    if unconditional or to_be:  # the host is little-endian: to_le only truncates
        return _bswap(value, nbytes)
    return value & byte_mask(nbytes)


def map_consts(value: Consts, fn, cap: int) -> Value:
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


def bounded_result(op: int, operand: int, bits: int, signed: bool, cap: int) -> Value | None:
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


def unknown_from(reason: str, *operands: Value) -> Unknown:
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
    sa, sb = to_signed(a, bits), to_signed(b, bits)
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
    taken, fall = _branch_edges(op, d, s, bits, same_reg)
    if not (isinstance(d, Unknown) and d.also) and not (isinstance(s, Unknown) and s.also):
        return taken, fall
    return (
        _edge_filtering_also(taken, op, bits, True, same_reg),
        _edge_filtering_also(fall, op, bits, False, same_reg),
    )


def _edge_filtering_also(edge: Edge, op: int, bits: int, holds: bool, same_reg: bool) -> Edge:
    """Keep, in an Unknown operand's `also`, only the values that can take this edge (against a
    known other operand; against an unknown one, every value may)."""
    feasible, d, s = edge
    mask = (1 << bits) - 1

    def takes(a: int, b: int) -> bool:
        return _holds(op, a & mask, b & mask, bits) == holds

    if isinstance(d, Unknown) and d.also:
        if same_reg:
            d = _keep_also(d, lambda v: takes(v, v))
        elif isinstance(s, Consts):
            d = _keep_also(d, lambda v: any(takes(v, w) for w in s.values))
    if isinstance(s, Unknown) and s.also and not same_reg and isinstance(d, Consts):
        s = _keep_also(s, lambda w: any(takes(v, w) for v in d.values))
    return feasible, d, s


def _keep_also(value: Unknown, keep: Callable[[int], bool]) -> Unknown:
    return Unknown(value.reason, value.may_stack, frozenset(v for v in value.also if keep(v)))


def _branch_edges(op: int, d: Value, s: Value, bits: int, same_reg: bool) -> tuple[Edge, Edge]:
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
