"""Program images: a program's instructions decoded for the interpreter, and where its basic
blocks start.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tcprio.analysis.verdicts.domain import s32, to_signed
from tcprio.analysis.verdicts.opcodes import (
    ALU,
    ALU64,
    AX,
    J_CALL,
    J_EXIT,
    J_JA,
    JMP,
    JMP32,
    LD_IMM64,
    PSEUDO_CALL,
    SRC_X,
    ST,
    STX,
    U32,
)
from tcprio.model import Instruction, RawInstructions

Insn = tuple[int, int, int, int, int]  # code, dst, src, off, imm (imm: the full 64-bit value
# for ld_imm64)


@dataclass
class Image:
    """A program decoded for the interpreter."""

    insns: list[Insn | None]  # None: the second half of an ld_imm64
    leaders: frozenset[int]  # where blocks start: jump targets and the pcs after jumps and calls
    broken: dict[int, str]  # pc -> why that instruction cannot be interpreted
    # pcs whose immediate stands for "any value" (see sharing.py): their instruction reads the
    # scratch register AX instead, which the interpreter sets to unknown right before
    masked: frozenset[int] = frozenset()


def _fields(insns: Sequence[Instruction]) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) of each instruction, straight from the raw bytes if kept."""
    if isinstance(insns, RawInstructions):
        return [
            (code, regs & 0xF, regs >> 4, off, imm)
            for code, regs, off, imm in struct.iter_unpack("<BBhi", insns.raw)
        ]
    return [
        (
            int(i.code) & 0xFF,
            int(i.dst) & 0xF,
            int(i.src) & 0xF,
            to_signed(int(i.off) & 0xFFFF, 16),
            s32(int(i.imm)),
        )
        for i in insns
    ]


def decode(insns: Sequence[Instruction]) -> Image:
    fields = _fields(insns)
    decoded: list[Insn | None] = []
    broken: dict[int, str] = {}
    pc = 0
    while pc < len(fields):
        code, dst, src, off, imm = fields[pc]
        if code != LD_IMM64:
            decoded.append(fields[pc])
            pc += 1
            continue
        if pc + 1 >= len(fields) or fields[pc + 1][0] != 0:
            decoded.append(fields[pc])
            broken[pc] = "a 64-bit immediate load is cut short"
            pc += 1
            continue
        high = fields[pc + 1][4] & U32
        decoded.append((code, dst, src, off, (imm & U32) | high << 32))
        decoded.append(None)
        broken[pc + 1] = "a jump lands inside a 64-bit immediate load"
        pc += 2
    return Image(decoded, _leaders(decoded), broken)


def with_unknown_immediates(image: Image, pcs: frozenset[int]) -> Image:
    """`image` where the immediates at `pcs` (ALU, jump, store, 64-bit constant) are unknown."""
    insns = list(image.insns)
    for pc in pcs:
        insn = insns[pc] if 0 <= pc < len(insns) else None
        if insn is None:
            continue
        code, dst, _src, off, imm = insn
        cls = code & 7
        if cls in (ALU, ALU64, JMP, JMP32):
            insns[pc] = (code | SRC_X, dst, AX, off, imm)
        elif cls == ST:
            insns[pc] = ((code & ~7) | STX, dst, AX, off, imm)
        # a 64-bit constant keeps its instruction: the interpreter reads `masked` there
    return Image(insns, image.leaders, image.broken, frozenset(pcs))


def jump_target(insn: Insn, pc: int) -> int | None:
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
        target = jump_target(insn, pc)
        if target is not None and 0 <= target < len(insns):
            leaders.add(target)
        leaders.add(pc + 1)
    return frozenset(leaders)
