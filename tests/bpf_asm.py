"""A tiny eBPF assembler for the tests: builds model.Instruction tuples like the kernel's xlated
image (ld_imm64 in two slots, maps by id, helper calls by imm, BPF-to-BPF calls by `off`).

Jumps and calls take either a numeric offset or a label name; `assemble` resolves labels:

    assemble(jeq_imm(1, 0, "out"), mov64_imm(0, 2), exit_(), label("out"), mov64_imm(0, 0), exit_())
"""

from __future__ import annotations

from dataclasses import dataclass

from tcprio.model import Instruction

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

ALU_OPS = {
    "add": 0x00,
    "sub": 0x10,
    "mul": 0x20,
    "div": 0x30,
    "or": 0x40,
    "and": 0x50,
    "lsh": 0x60,
    "rsh": 0x70,
    "neg": 0x80,
    "mod": 0x90,
    "xor": 0xA0,
    "mov": 0xB0,
    "arsh": 0xC0,
}
JMP_OPS = {
    "jeq": 0x10,
    "jgt": 0x20,
    "jge": 0x30,
    "jset": 0x40,
    "jne": 0x50,
    "jsgt": 0x60,
    "jsge": 0x70,
    "jlt": 0xA0,
    "jle": 0xB0,
    "jslt": 0xC0,
    "jsle": 0xD0,
}
SIZES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
ALU, JMP, JMP32, ALU64 = 0x04, 0x05, 0x06, 0x07
LDX_MEM, ST_MEM, STX_MEM, STX_ATOMIC = 0x61, 0x62, 0x63, 0xC3
BPF_X = 0x08
TAIL_CALL = 12
PSEUDO_FUNC = 4  # ld_imm64 src: the address of a function of the program


@dataclass(frozen=True)
class Label:
    name: str


@dataclass(frozen=True)
class Pending:
    """A jump or call whose offset is a label, resolved by `assemble`."""

    insn: Instruction
    target: str
    use_imm: bool = False  # gotol keeps its offset in imm


Item = Instruction | Label | Pending | list


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> Instruction:
    return Instruction(code=code, dst=dst, src=src, off=off, imm=imm)


def _jump(code: int, dst: int, src: int, target: int | str, imm: int = 0) -> Instruction | Pending:
    if isinstance(target, str):
        return Pending(_insn(code, dst, src, 0, imm), target)
    return _insn(code, dst, src, target, imm)


def label(name: str) -> Label:
    return Label(name)


# --- ALU ---


def alu64_imm(op: str, dst: int, imm: int) -> Instruction:
    return _insn(ALU64 | ALU_OPS[op], dst, 0, 0, imm)


def alu64_reg(op: str, dst: int, src: int) -> Instruction:
    return _insn(ALU64 | ALU_OPS[op] | BPF_X, dst, src)


def alu32_imm(op: str, dst: int, imm: int) -> Instruction:
    return _insn(ALU | ALU_OPS[op], dst, 0, 0, imm)


def alu32_reg(op: str, dst: int, src: int) -> Instruction:
    return _insn(ALU | ALU_OPS[op] | BPF_X, dst, src)


def sdiv64_imm(dst: int, imm: int) -> Instruction:
    return _insn(ALU64 | ALU_OPS["div"], dst, 0, 1, imm)


def smod64_imm(dst: int, imm: int) -> Instruction:
    return _insn(ALU64 | ALU_OPS["mod"], dst, 0, 1, imm)


def movsx64(dst: int, src: int, bits: int) -> Instruction:
    return _insn(ALU64 | ALU_OPS["mov"] | BPF_X, dst, src, bits)


def neg64(dst: int) -> Instruction:
    return _insn(ALU64 | ALU_OPS["neg"], dst)


def end(dst: int, width: int, big: bool) -> Instruction:
    return _insn(ALU | 0xD0 | (BPF_X if big else 0), dst, 0, 0, width)


def bswap64(dst: int, width: int) -> Instruction:
    return _insn(ALU64 | 0xD0, dst, 0, 0, width)


def mov64_imm(dst: int, imm: int) -> Instruction:
    return alu64_imm("mov", dst, imm)


def mov64_reg(dst: int, src: int) -> Instruction:
    return alu64_reg("mov", dst, src)


def mov32_imm(dst: int, imm: int) -> Instruction:
    return alu32_imm("mov", dst, imm)


def mov32_reg(dst: int, src: int) -> Instruction:
    return alu32_reg("mov", dst, src)


# --- loads and stores ---


def ld_imm64(dst: int, value: int, src: int = 0) -> list[Instruction]:
    value &= (1 << 64) - 1
    low, high = value & 0xFFFFFFFF, value >> 32
    return [
        _insn(0x18, dst, src, 0, low - (1 << 32) if low >> 31 else low),
        _insn(0x00, 0, 0, 0, high - (1 << 32) if high >> 31 else high),
    ]


def ld_map(dst: int, map_id: int) -> list[Instruction]:
    """`dst = map[id:N]` as the xlated dump shows it (BPF_PSEUDO_MAP_FD with the map id)."""
    return ld_imm64(dst, map_id, src=1)


def ld_func(dst: int, target: int | str) -> list[Instruction | Pending]:
    """`dst = the address of a function` (ld_imm64 with src BPF_PSEUDO_FUNC = 4), a callback for
    bpf_loop & co: the function starts at pc + imm + 1, in the loadable and the xlated form."""
    first: Instruction | Pending
    if isinstance(target, str):
        first = Pending(_insn(0x18, dst, PSEUDO_FUNC), target, use_imm=True)
    else:
        first = _insn(0x18, dst, PSEUDO_FUNC, 0, target)
    return [first, _insn(0x00)]


def ldx(size: int, dst: int, src: int, off: int) -> Instruction:
    return _insn(LDX_MEM | SIZES[size], dst, src, off)


def stx(size: int, dst: int, src: int, off: int) -> Instruction:
    return _insn(STX_MEM | SIZES[size], dst, src, off)


def st_imm(size: int, dst: int, off: int, imm: int) -> Instruction:
    return _insn(ST_MEM | SIZES[size], dst, 0, off, imm)


def atomic(size: int, dst: int, src: int, off: int, op: int) -> Instruction:
    return _insn(STX_ATOMIC | SIZES[size], dst, src, off, op)


def ld_abs(size: int, imm: int) -> Instruction:
    return _insn(0x20 | SIZES[size], 0, 0, 0, imm)


# --- jumps and calls ---


def jmp_imm(op: str, dst: int, imm: int, target: int | str) -> Instruction | Pending:
    return _jump(JMP | JMP_OPS[op], dst, 0, target, imm)


def jmp_reg(op: str, dst: int, src: int, target: int | str) -> Instruction | Pending:
    return _jump(JMP | JMP_OPS[op] | BPF_X, dst, src, target)


def jmp32_imm(op: str, dst: int, imm: int, target: int | str) -> Instruction | Pending:
    return _jump(JMP32 | JMP_OPS[op], dst, 0, target, imm)


def jmp32_reg(op: str, dst: int, src: int, target: int | str) -> Instruction | Pending:
    return _jump(JMP32 | JMP_OPS[op] | BPF_X, dst, src, target)


def jeq_imm(dst: int, imm: int, target: int | str) -> Instruction | Pending:
    return jmp_imm("jeq", dst, imm, target)


def jne_imm(dst: int, imm: int, target: int | str) -> Instruction | Pending:
    return jmp_imm("jne", dst, imm, target)


def ja(target: int | str) -> Instruction | Pending:
    return _jump(JMP, 0, 0, target)


def gotol(target: int | str) -> Instruction | Pending:
    if isinstance(target, str):
        return Pending(_insn(JMP32), target, use_imm=True)
    return _insn(JMP32, 0, 0, 0, target)


def call_helper(imm: int) -> Instruction:
    return _insn(JMP | 0x80, 0, 0, 0, imm)


def call_pseudo(target: int | str) -> Instruction | Pending:
    """BPF-to-BPF call: the callee starts at pc + off + 1 (xlated keeps the offset in `off`)."""
    return _jump(JMP | 0x80, 0, 1, target, imm=1)


def call_kfunc(imm: int) -> Instruction:
    return _insn(JMP | 0x80, 0, 2, 0, imm)


def tail_call() -> Instruction:
    return call_helper(TAIL_CALL)


def tail_call_to(map_id: int, slot: int | None) -> list[Instruction]:
    """r2 = prog array, r3 = slot (left as is when None), call bpf_tail_call."""
    parts = ld_map(R2, map_id)
    if slot is not None:
        parts.append(mov64_imm(R3, slot))
    return [*parts, tail_call()]


def exit_() -> Instruction:
    return _insn(JMP | 0x90)


def ret(value: int) -> list[Instruction]:
    return [mov64_imm(R0, value), exit_()]


# --- assembly ---


def _flatten(items: tuple[Item, ...]) -> list[Instruction | Label | Pending]:
    out: list[Instruction | Label | Pending] = []
    for item in items:
        if isinstance(item, list | tuple):
            out.extend(_flatten(tuple(item)))
        else:
            out.append(item)
    return out


def label_pcs(*items: Item) -> dict[str, int]:
    """Where each label of `items` lands in the assembled program (a function's start, for
    func_info)."""
    labels: dict[str, int] = {}
    pc = 0
    for item in _flatten(items):
        if isinstance(item, Label):
            labels[item.name] = pc
        else:
            pc += 1
    return labels


def assemble(*items: Item) -> tuple[Instruction, ...]:
    flat = _flatten(items)
    labels = label_pcs(*flat)
    out: list[Instruction] = []
    for item in flat:
        if isinstance(item, Label):
            continue
        if isinstance(item, Pending):
            delta = labels[item.target] - len(out) - 1
            insn = item.insn
            if item.use_imm:
                item = Instruction(insn.code, insn.dst, insn.src, insn.off, delta)
            else:
                item = Instruction(insn.code, insn.dst, insn.src, delta, insn.imm)
        out.append(item)
    return tuple(out)
