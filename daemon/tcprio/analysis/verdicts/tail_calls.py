"""Following tail calls: the program in a prog-array's slot replaces the caller in its frame.

Each program reached by a tail call is decoded once, with its depth in the chain of tail calls
(bounded like the kernel's MAX_TAIL_CALL_CNT) and a note on how it was first reached; a cycle of
tail calls reaches programs already decoded, whose states then join. Whatever the slots hold, the
call may also fail (empty slot, limit reached): execution then continues after it.
"""

from __future__ import annotations

from collections.abc import Mapping

from tcprio.analysis.verdicts.domain import (
    Consts,
    Ctx,
    CtxPtr,
    MapPtr,
    State,
    Unknown,
    Value,
    uninit_regs,
)
from tcprio.analysis.verdicts.images import Image
from tcprio.analysis.verdicts.opcodes import U32
from tcprio.model import MapInfo, ProgramInfo


class TailCalls:
    """The tail-call semantics of the interpreter's analysis, which this class is mixed into.

    The analysis provides the attributes below, its limits (an AnalysisLimits) and the methods
    _unknown, _goto, _clobber_scratch, _decode (a program's image) and _enter (freplace.py: a
    program's start, or the EXT program replacing its main function).
    """

    programs: Mapping[int, ProgramInfo]
    maps: Mapping[int, MapInfo]
    images: dict[int, Image]
    tail_depth: dict[int, int]  # program -> how many tail calls lead to it from the root
    tail_notes: dict[int, str]  # program -> how it was first reached
    cb_area: tuple[int, int] | None  # where skb->cb[] is, when modelled (ctx.py)

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
        read = info.max_entries if info.prog_array_read is None else info.prog_array_read
        if isinstance(index, Consts):
            wanted = sorted({v & U32 for v in index.values})
            if any(read <= s < info.max_entries for s in wanted):
                self._unread_slots(prog, pc, map_id, info)
            empty = [s for s in wanted if s not in slots and s < info.max_entries]
            if empty:
                self._empty_slots(prog, pc, map_id, f"slot {empty[0]}")
            return [(slot, slots[slot]) for slot in wanted if slot in slots]
        if read < info.max_entries:
            self._unread_slots(prog, pc, map_id, info)
        elif len(slots) < info.max_entries:
            self._empty_slots(prog, pc, map_id, "a slot the index may pick")
        return sorted(slots.items())

    def _unread_slots(self, prog: int, pc: int, map_id: int, info: MapInfo) -> None:
        """A huge prog array is read only so far (a bound on the scan's work)."""
        self._unknown(
            prog, pc, f"tail call at pc {pc}: map {map_id} has {info.max_entries} slots and "
            f"only the first {info.prog_array_read} were read"
        )  # fmt: skip

    def _empty_slots(self, prog: int, pc: int, map_id: int, which: str) -> None:
        """A slot that is empty now: the call fails today, but the program's owner can put a
        program there at any moment (Cilium and Calico fill their policy slots after attaching),
        and that program decides the verdict. Unknown, not transparent."""
        self._unknown(
            prog, pc, f"tail call at pc {pc}: {which} of map {map_id} is empty now; "
            "a program put there later decides"
        )  # fmt: skip

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
            self.images[target] = self._decode(target, info)
            self.tail_depth[target] = depth
            self.tail_notes[target] = f"{how} (from prog {prog} pc {pc})"
        frame = len(callers)
        regs = uninit_regs(frame)
        # The callee gets the context in r1, and the caller's cb[] (CB_FRAME is below `frame`).
        regs[1] = CtxPtr() if self.cb_area is not None else state.regs[1]
        stack = {k: v for k, v in state.stack.items() if k[0] < frame}
        entered = State(tuple(regs), stack, state.frames)
        self._enter(callers, target, 0, entered, (prog, pc), tail_call=True)
