"""What a classic BPF filter (`tc filter ... bpf bytecode '...'`) can return (pure).

cls_bpf runs classic bytecode in its class-id mode only (direct-action needs eBPF): 0 is "no
match, next filter", any other value a match that ends the chain through the filter's actions.
Classic BPF only jumps forward, so every instruction a jump or a fall-through reaches is taken
as reachable (both sides of every conditional jump); the accumulator is followed only through
`ld #k` / `ldx`-free straight code, which is all `ret a` needs in the common shapes. A packet
load beyond the packet and a division by an X of 0 end the program with 0 (the kernel's
conversion to eBPF): a reachable one adds 0 to what it can return.
"""

from __future__ import annotations

from dataclasses import dataclass

# include/uapi/linux/filter.h and bpf_common.h
BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
BPF_IMM = 0x00  # BPF_LD mode
PACKET_MODES = frozenset({0x20, 0x40, 0xA0})  # BPF_ABS, BPF_IND, BPF_MSH
BPF_DIV, BPF_MOD = 0x30, 0x90
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10  # BPF_RET sources
BPF_JA = 0x00
BPF_TAX, BPF_TXA = 0x00, 0x80  # BPF_MISC
U32 = 0xFFFFFFFF

Op = tuple[int, int, int, int]  # code, jt, jf, k


@dataclass(frozen=True)
class ClassicReturns:
    """The values its reachable `ret` instructions return (32-bit, signed), and why some could
    not be read (`ret a` after an unknown load, `ret x`, a jump out of the program)."""

    values: frozenset[int]
    unknown: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.unknown


def _signed(value: int) -> int:
    value &= U32
    return value - (1 << 32) if value & 0x80000000 else value


def _successors(pc: int, op: Op) -> tuple[int, ...]:
    code, jt, jf, k = op
    cls = code & 0x07
    if cls == BPF_RET:
        return ()
    if cls == BPF_JMP:
        if code & 0xF0 == BPF_JA:
            return (pc + 1 + k,)
        return (pc + 1 + jt, pc + 1 + jf)
    return (pc + 1,)


def _may_end_with_zero(op: Op) -> bool:
    """A packet load (it fails beyond the packet) or a division by X (X may be 0)."""
    code = op[0]
    cls = code & 0x07
    if cls in (BPF_LD, BPF_LDX):
        return code & 0xE0 in PACKET_MODES
    return cls == BPF_ALU and code & 0xF0 in (BPF_DIV, BPF_MOD) and bool(code & BPF_X)


def _accumulator(op: Op, a: int | None) -> int | None:
    """A after `op` when it is a known constant, else None."""
    code, _jt, _jf, k = op
    cls = code & 0x07
    if cls == BPF_LD and code & 0xE0 == BPF_IMM:
        return k & U32
    if cls in (BPF_RET, BPF_JMP) or code in (BPF_MISC | BPF_TAX,):
        return a  # jumps and `tax` leave A alone
    return None  # loads from the packet, ALU ops, `txa`...: unknown


def analyse_classic(ops: tuple[Op, ...]) -> ClassicReturns:
    if not ops:
        return ClassicReturns(frozenset(), ("the classic program is empty",))
    # Forward jumps only: one pass in order sees every predecessor of an instruction first.
    a_at: dict[int, int | None] = {0: None}
    reached = {0}
    values: set[int] = set()
    unknown: list[str] = []
    for pc, op in enumerate(ops):
        if pc not in reached:
            continue
        code, _jt, _jf, k = op
        a = a_at.get(pc)
        if code & 0x07 == BPF_RET:
            source = code & 0x18
            if source == BPF_K:
                values.add(_signed(k))
            elif source == BPF_A and a is not None:
                values.add(_signed(a))
            else:
                unknown.append(f"ret at {pc} returns {'x' if source == BPF_X else 'a'}")
            continue
        if _may_end_with_zero(op):
            values.add(0)
        a_after = _accumulator(op, a)
        for nxt in _successors(pc, op):
            if not pc < nxt < len(ops):
                unknown.append(f"jump at {pc} leaves the program")
                continue
            if nxt in reached and a_at.get(nxt) != a_after:
                a_at[nxt] = None  # two paths, two accumulators: not a constant any more
            elif nxt not in reached:
                a_at[nxt] = a_after
            reached.add(nxt)
    if not values and not unknown:
        unknown.append("no reachable ret")
    return ClassicReturns(frozenset(values), tuple(unknown))
