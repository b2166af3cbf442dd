"""Program images: a program's instructions decoded for the interpreter, and where its basic
blocks start.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcprio.analysis.verdicts.domain import s32, to_signed
from tcprio.analysis.verdicts.opcodes import (
    J_CALL,
    J_EXIT,
    J_JA,
    JMP,
    JMP32,
    LD_IMM64,
    PSEUDO_CALL,
    U32,
)
from tcprio.model import Instruction

Insn = tuple[int, int, int, int, int]  # code, dst, src, off, imm (imm: the full 64-bit value
# for ld_imm64)


@dataclass
class Image:
    """A program decoded for the interpreter."""

    insns: list[Insn | None]  # None: the second half of an ld_imm64
    leaders: frozenset[int]  # where blocks start: jump targets and the pcs after jumps and calls
    broken: dict[int, str]  # pc -> why that instruction cannot be interpreted


def decode(insns: tuple[Instruction, ...]) -> Image:
    decoded: list[Insn | None] = []
    broken: dict[int, str] = {}
    pc = 0
    while pc < len(insns):
        i = insns[pc]
        code, dst, src = int(i.code) & 0xFF, int(i.dst) & 0xF, int(i.src) & 0xF
        off = to_signed(int(i.off) & 0xFFFF, 16)
        imm = s32(int(i.imm))
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
    return Image(decoded, _leaders(decoded), broken)


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
