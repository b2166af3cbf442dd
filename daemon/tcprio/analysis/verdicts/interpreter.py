"""The interpreter of the verdict analysis: it runs the abstract machine over the decoded
programs, one basic block at a time, through BPF-to-BPF calls, helper calls and tail calls.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from tcprio.analysis.verdicts.ctx import (
    CbArea,
    cb_after_helper,
    cb_area_of,
    cb_clobber,
    cb_forget,
    cb_load,
    cb_store,
    entry_context,
)
from tcprio.analysis.verdicts.domain import (
    Consts,
    Ctx,
    CtxPtr,
    FramePtr,
    MapPtr,
    Piece,
    SlotKey,
    State,
    Unknown,
    Value,
    arith,
    bounded_result,
    branch_edges,
    byte_mask,
    byte_order,
    const,
    join,
    join_origins,
    join_states,
    map_consts,
    may_point_to_stack,
    s32,
    stack_clobber,
    stack_load,
    stack_store,
    to_signed,
    uninit_regs,
    unknown_from,
)
from tcprio.analysis.verdicts.freplace import Replacements
from tcprio.analysis.verdicts.helpers import (
    CALLBACK_HELPERS,
    VERDICT_HELPERS,
    clobber_arguments,
    helper_may_return,
    reads_its_arguments_only,
    verdict_helper_result,
)
from tcprio.analysis.verdicts.images import (
    Image,
    Insn,
    decode,
    jump_target,
    with_unknown_immediates,
)
from tcprio.analysis.verdicts.opcodes import (
    ALU,
    ALU64,
    ATOMIC_CMPXCHG,
    ATOMIC_FETCH,
    ATOMIC_LOAD_ACQ,
    ATOMIC_OPS,
    ATOMIC_STORE_REL,
    ATOMIC_XCHG,
    AX,
    BPF_FUNC_TAIL_CALL,
    CONDITIONAL_JUMPS,
    J_CALL,
    J_EXIT,
    J_JA,
    J_JCOND,
    JMP,
    JMP32,
    LD,
    LD_IMM64,
    LDX,
    MODE_ABS,
    MODE_ATOMIC,
    MODE_IND,
    MODE_MEM,
    MODE_MEMSX,
    OP_ADD,
    OP_AND,
    OP_DIV,
    OP_END,
    OP_MOD,
    OP_MOV,
    OP_NEG,
    OP_SUB,
    OP_XOR,
    PSEUDO_CALL,
    PSEUDO_FUNC,
    PSEUDO_KFUNC_CALL,
    PSEUDO_MAP_FD,
    PSEUDO_MAP_VALUE,
    SIZE_BYTES,
    SRC_X,
    ST,
    ST_NOSPEC,
    STX,
    U32,
    U64,
    WRITABLE,
)
from tcprio.analysis.verdicts.tail_calls import TailCalls
from tcprio.model import ExitPath, MapInfo, ProgramInfo, ProgramVerdicts

# How far below its r10 a frame's stack reaches: MAX_BPF_STACK (512), plus the slots the verifier
# itself adds when it inlines bpf_loop or rewrites may_goto. The verifier refuses a store beyond
# it; the analysis does too, so that garbage offsets cannot make the stack (and each state) huge.
STACK_FRAME_BYTES = 512 + 64
# Units of work (AnalysisLimits.max_work) besides one per instruction: a join compares every
# register of every frame and every stack slot; a state handed on to a block, and a helper
# call, cost about ten instructions each (measured: with these weights a unit costs 0.6 to
# 1.1 us on the costliest shapes found, a call fan-out joining wide states and one calling
# helpers between its calls).
STATE_REGISTERS = 12  # r0 .. r10 and AX
PROPAGATE_WORK = 10
HELPER_CALL_WORK = 10


@dataclass(frozen=True)
class AnalysisLimits:
    max_insn_visits: int = 1_000_000  # instructions interpreted, over every program and pass
    max_call_depth: int = 8  # call frames, like the kernel's MAX_CALL_FRAMES
    max_tail_call_depth: int = 33  # programs chained by tail calls, like MAX_TAIL_CALL_CNT
    max_programs: int = 64  # distinct programs followed through tail calls
    max_contexts: int = 4096  # (call stack, program) pairs analysed separately
    max_values: int = 32  # known values per register before it becomes Unknown
    # Work per root program, in deterministic units: one per instruction interpreted, plus one
    # per register or stack slot compared when two states meet. It bounds what the visits
    # alone do not (wide states joined at every call site), so the same program gets the same
    # verdict on a busy node as on an idle one; at most about 3 s of analysis on one core here.
    max_work: int = 3_000_000


# --- the interpreter -----------------------------------------------------------------------


class _Abort(Exception):
    """A global limit was reached: the analysis stops and the result is unknown."""


class _Analysis(TailCalls, Replacements):
    def __init__(
        self,
        root: int,
        programs: Mapping[int, ProgramInfo],
        maps: Mapping[int, MapInfo],
        helper_names: Mapping[int, str],
        limits: AnalysisLimits,
        unknown_immediates: Mapping[int, frozenset[int]] | None = None,
        ctx_cb: CbArea | None = None,
    ) -> None:
        self.root = root
        self.cb_area = cb_area_of(ctx_cb, programs.get(root))  # None: cb[] is not modelled
        self.unknown_immediates = unknown_immediates or {}
        self.programs = programs
        self.maps = maps
        self.helper_names = helper_names
        self.limits = limits
        self.cap = limits.max_values
        self.images: dict[int, Image] = {}
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
        self.other_work = 0  # joins, states handed on, helper calls (see STATE_REGISTERS)

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
        self.images[self.root] = self._decode(self.root, info)
        self.tail_depth[self.root] = 0
        regs = uninit_regs(0)
        regs[1] = entry_context(self.cb_area)
        self._enter((), self.root, 0, State(tuple(regs), {}, ()), None)  # or its EXT program
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

    def _decode(self, prog: int, info: ProgramInfo) -> Image:
        image = decode(info.insns)
        pcs = self.unknown_immediates.get(prog)
        return with_unknown_immediates(image, pcs) if pcs else image

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
        self.other_work += PROPAGATE_WORK
        if old is None:
            self.states[node] = state
        else:
            self.other_work += STATE_REGISTERS * (1 + len(state.frames)) + len(state.stack)
            self._check_work()
            merged = join_states(old, state, self.cap)
            if merged is None:
                return
            self.states[node] = merged
        if node not in self.queued:
            self.queued.add(node)
            heapq.heappush(self.queue, node)

    @property
    def work(self) -> int:
        return self.visits + self.other_work

    def _check_work(self) -> None:
        if self.visits + self.other_work > self.limits.max_work:
            raise _Abort(
                f"analysis stopped after {self.limits.max_work:,} units of work (limit reached)"
            )

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
        insns, leaders, broken, masked = image.insns, image.leaders, image.broken, image.masked
        regs = list(state.regs)
        stack = state.stack
        limit = self.limits.max_insn_visits
        while True:
            self.visits += 1
            if self.visits > limit:
                raise _Abort(f"analysis stopped after {limit} instructions (limit reached)")
            if not self.visits & 0xFF:
                self._check_work()
            if pc in broken:
                self._unknown(prog, pc, broken[pc])
                return
            if pc in masked:  # its instruction reads AX for the immediate: any value
                regs[AX] = Unknown(f"is a constant that differs between copies (pc {pc})")
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
            regs[dst] = self._unary(regs[dst], lambda v: byte_order(v, use_x, imm, is64), pc)
            return None
        if op == OP_NEG:
            if use_x:
                return f"unknown ALU operation {code:#04x} at pc {pc}"
            bits = 64 if is64 else 32
            regs[dst] = self._unary(
                regs[dst], lambda v: -(v & byte_mask(bits // 8)) & byte_mask(bits // 8), pc
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
        if use_x and src == dst and op in (OP_XOR, OP_SUB):
            regs[dst] = Consts(frozenset({0}))  # `r0 ^= r0`, `r0 -= r0`: 0 whatever r0 held
            return None
        regs[dst] = self._binary(op, regs[dst], operand, 64 if is64 else 32, off == 1, pc)
        return None

    def _unary(self, value: Value, fn, pc: int) -> Value:
        if isinstance(value, Consts):
            return map_consts(value, fn, self.cap)
        return unknown_from(f"is computed from a pointer at pc {pc}", value)

    def _mov(self, value: Value, is64: bool, off: int, use_x: bool, pc: int) -> Value:
        if is64 and off == 0:
            return value
        if off not in (0, 8, 16, 32) or (off == 32 and not is64) or (off and not use_x):
            return Unknown(f"is computed by an unsupported move at pc {pc}")
        if not isinstance(value, Consts):
            return unknown_from(f"is a truncated pointer (pc {pc})", value)
        if off:
            bits = off

            def extend(v: int) -> int:
                return to_signed(v & ((1 << bits) - 1), bits) & (U64 if is64 else U32)

            return map_consts(value, extend, self.cap)
        if all(v <= U32 for v in value.values):
            return value
        return map_consts(value, lambda v: v & U32, self.cap)

    def _binary(self, op: int, d: Value, s: Value, bits: int, signed: bool, pc: int) -> Value:
        if isinstance(d, Consts) and isinstance(s, Consts):
            results = frozenset(arith(op, x, y, bits, signed) for x in d.values for y in s.values)
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
            bounded = bounded_result(op, k & ((1 << bits) - 1), bits, signed, self.cap)
            if bounded is not None:
                return bounded
        may_stack = (
            bits == 64
            and op in (OP_ADD, OP_SUB)
            and (may_point_to_stack(d) or may_point_to_stack(s))
        )
        result = unknown_from(f"is computed from a pointer at pc {pc}", d, s)
        return Unknown(result.reason, True) if may_stack else result

    @staticmethod
    def _pointer_arith(op: int, d: Value, s: Value) -> Value | None:
        if isinstance(d, FramePtr) and isinstance(s, Consts) and len(s.values) == 1:
            (k,) = s.values
            delta = to_signed(k, 64)
            return FramePtr(d.frame, d.off + delta if op == OP_ADD else d.off - delta)
        if (
            op == OP_ADD
            and isinstance(s, FramePtr)
            and isinstance(d, Consts)
            and len(d.values) == 1
        ):
            (k,) = d.values
            return FramePtr(s.frame, s.off + to_signed(k, 64))
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
        if mode in (MODE_MEM, MODE_MEMSX) and isinstance(base, FramePtr | CtxPtr):
            if isinstance(base, CtxPtr):
                value = cb_load(self.cb_area, stack, off, size, pc)
            else:
                value = stack_load(stack, base.frame, base.off + off, size)
                if isinstance(value, Unknown) and value.reason.startswith("was loaded from"):
                    value = Unknown(f"{value.reason} (pc {pc})", also=value.also)
            if mode == MODE_MEMSX and size < 8:
                value = self._sign_extend(value, size * 8, pc)
            regs[dst] = value
            return None
        # Through a pointer that may hit a stack, the value may be a spilled stack pointer.
        regs[dst] = Unknown(f"was loaded from memory at pc {pc}", may_point_to_stack(base))
        return None

    def _sign_extend(self, value: Value, bits: int, pc: int) -> Value:
        if isinstance(value, Consts):
            return map_consts(
                value, lambda v: to_signed(v & ((1 << bits) - 1), bits) & U64, self.cap
            )
        return unknown_from(f"was loaded from the stack at pc {pc}", value)

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
        if isinstance(target, CtxPtr):
            return None, cb_store(self.cb_area, stack, off, size, value, pc)
        return None, self._clobber_through(target, off, size, stack, pc)

    def _clobber_through(
        self, target: Value, off: int, size: int, stack: dict[SlotKey, tuple[Piece, ...]], pc: int
    ) -> dict[SlotKey, tuple[Piece, ...]]:
        reason = f"was overwritten at pc {pc}"
        if isinstance(target, CtxPtr):
            return cb_clobber(self.cb_area, stack, off, size, pc)
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
            if pc in self.images[prog].masked:
                regs[dst] = Unknown(f"is a constant that differs between copies (pc {pc})")
            else:
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
        self.other_work += HELPER_CALL_WORK
        name = self.helper_names.get(imm)
        if name is not None:
            name = name.split(".", 1)[0]
        if name in VERDICT_HELPERS:
            regs[0] = verdict_helper_result(name, regs, pc)
        else:
            what = f"{name}()" if name else f"an unidentified helper (call imm {imm})"
            regs[0] = Unknown(f"is returned by {what} at pc {pc}", also=helper_may_return(name))
            if not reads_its_arguments_only(name):
                whole = name in CALLBACK_HELPERS or name is None
                stack = clobber_arguments(regs, stack, pc, whole)
        stack = cb_after_helper(self.cb_area, name, regs, stack, pc)
        self._clobber_scratch(regs, pc)
        return None, stack

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
                self._kfunc_call(ctx, pc, state, insn[4])
            else:
                self._unknown(prog, pc, f"unknown kind of call (src {src}) at pc {pc}")
        elif op == J_JA or (cls == JMP and op == J_JCOND):
            target = jump_target(insn, pc)
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
            r0 = Consts(r0.values, join_origins(r0.origins, returned))
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
        regs = uninit_regs(depth)
        regs[1:6] = state.regs[1:6]
        stack = {k: v for k, v in state.stack.items() if k[0] < depth}
        callee = State(tuple(regs), stack, (*state.frames, state.regs[6:11]))
        self._enter((*callers, (prog, entry, pc)), prog, target, callee, (prog, pc))

    def _kfunc_call(self, ctx: Ctx, pc: int, state: State, imm: int) -> None:
        prog = ctx[1]
        name = self.helper_names.get(imm)
        name = name.split(".", 1)[0] if name else None
        if name == "bpf_throw":
            # The program ends here, from any frame, with what its exception callback returns:
            # the cookie (r1) for the default callback, anything for a custom one.
            cookie = state.regs[1]
            also = cookie.values if isinstance(cookie, Consts) else frozenset()
            reason = f"is bpf_throw's cookie at pc {pc}, or what an exception callback returns"
            self._exit(prog, pc, Unknown(reason, also=also))
            return
        if name is None:
            self._unknown(
                prog, pc, f"a kfunc at pc {pc} that tcprio cannot name may end the program "
                "with a value of its own (as bpf_throw does)"
            )  # fmt: skip
        regs = list(state.regs)
        stack = clobber_arguments(regs, state.stack, pc)
        stack = cb_forget(self.cb_area, stack, f"may be written by the kfunc at pc {pc}")
        regs[0] = Unknown(f"is returned by a kernel function (kfunc) at pc {pc}")
        self._clobber_scratch(regs, pc)
        self._goto(ctx, pc, pc + 1, State(tuple(regs), stack, state.frames))

    # -- results --

    def result(self) -> ProgramVerdicts:
        exits: list[ExitPath] = []
        reasons: list[str] = []
        for (prog, pc), r0 in self.exits.items():
            values = _return_values(r0)
            note = self._exit_note(prog, r0, values)
            also = frozenset(s32(v) for v in r0.also) if isinstance(r0, Unknown) else frozenset()
            exits.append(ExitPath(pc, prog, values, note, also))
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
        return ProgramVerdicts(
            self.root, values, tuple(exits), tuple(dict.fromkeys(reasons)), self.work
        )

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


def _return_values(r0: Value) -> frozenset[int] | None:
    """The program's return value: r0's lower 32 bits, read as a signed int."""
    if not isinstance(r0, Consts):
        return None
    return frozenset(s32(v) for v in r0.values)


# --- public API ----------------------------------------------------------------------------


def analyse_program(
    prog_id: int,
    programs: Mapping[int, ProgramInfo],
    maps: Mapping[int, MapInfo],
    helper_names: Mapping[int, str],
    limits: AnalysisLimits = AnalysisLimits(),
    unknown_immediates: Mapping[int, frozenset[int]] | None = None,
    ctx_cb: CbArea | None = None,
) -> ProgramVerdicts:
    """Every value program `prog_id` can return, following its calls and tail calls.

    `unknown_immediates` (program id -> pcs) makes those instructions' immediates unknown: the
    result then holds for every copy of the programs that differs only there (sharing.py).
    `ctx_cb` (where skb->cb[] lies from the context pointer, and its bytes: the kernel's
    layout) models a tc program's cb[] (ctx.py); None keeps every context load unknown.
    Never raises: whatever cannot be followed makes the result unknown, with the reason.
    """
    analysis = _Analysis(prog_id, programs, maps, helper_names, limits, unknown_immediates, ctx_cb)
    try:
        analysis.run()
        return analysis.result()
    except Exception as exc:  # a bug here must not take the scan down: report it as unknown
        reason = f"internal error in the verdict analysis: {type(exc).__name__}: {exc}"
        return ProgramVerdicts(prog_id, None, (), (reason,))
