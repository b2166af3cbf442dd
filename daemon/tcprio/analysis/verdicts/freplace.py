"""freplace: an EXT program (BPF_PROG_TYPE_EXT) running instead of a global function.

A program's `replaced_functions` (read from the node's freplace links) name the functions whose
instructions never run: the kernel jumps into the EXT program instead, while the program's image
still shows the original body. A BPF-to-BPF call to such a function enters the EXT program's
image at its first instruction, in the callee's frame: its exits return r0 to the caller, its
tail calls replace it as they would replace the function. When the main function is replaced,
the EXT program is the whole program: its exits end it. A tail call into a program whose main
function is replaced may run either (an x86 tail call jumps past the patched entry; newer kernels
refuse the combination): both are followed. An EXT program that cannot be followed makes
the call unknown, never transparent.
"""

from __future__ import annotations

from collections.abc import Mapping

from tcprio.analysis.verdicts.domain import State
from tcprio.analysis.verdicts.images import Image, decode
from tcprio.model import ProgramInfo

Callers = tuple[tuple[int, int, int], ...]


class Replacements:
    """The freplace semantics of the interpreter's analysis, which this class is mixed into.

    The analysis provides the attributes below, its limits (an AnalysisLimits) and the methods
    _unknown and _propagate.
    """

    programs: Mapping[int, ProgramInfo]
    images: dict[int, Image]
    tail_depth: dict[int, int]
    tail_notes: dict[int, str]

    def _enter(
        self,
        callers: Callers,
        prog: int,
        target: int,
        state: State,
        src: tuple[int, int] | None,
        tail_call: bool = False,
    ) -> None:
        """Run the function at `target` of `prog` with `state` (its start, when `target` is 0
        and `callers` is empty), or the EXT program replacing it."""
        entry = self._replacement(prog, target)
        if entry is None or tail_call:
            self._propagate((callers, prog, target), target, state, src)
        if entry is not None and self._ext_image(prog, target, entry, src or (prog, target)):
            self._propagate((callers, entry[1], 0), 0, state, src)

    def _replacement(self, prog: int, target: int) -> tuple[int, int] | None:
        """The (offset, EXT program) entry that replaces the function at `target` of `prog`;
        an entry that could not be placed may be this one."""
        info = self.programs.get(prog)
        if info is None or not info.replaced_functions:
            return None
        unplaced = [e for e in info.replaced_functions if e[0] < 0]
        if unplaced:
            return unplaced[0]
        return next((e for e in info.replaced_functions if e[0] == target), None)

    def _ext_image(
        self, prog: int, target: int, entry: tuple[int, int], where: tuple[int, int]
    ) -> bool:
        """Decode the EXT program of `entry` once; False (and the path unknown) when it cannot
        be followed."""
        offset, ext = entry
        if offset < 0:
            who = f"EXT prog {ext}" if ext else "an EXT program (the freplace links were not read)"
            self._unknown(
                *where, f"{who} replaces a function of prog {prog} that tcprio cannot place; "
                f"it may be the one at pc {target}"
            )  # fmt: skip
            return False
        how = f"freplace: EXT prog {ext} runs instead of the function at pc {target} of prog {prog}"
        info = self.programs.get(ext)
        if info is None or info.insns is None:
            self._unknown(*where, f"{how}: the EXT program's code is not available")
            return False
        if not info.insns:
            self._unknown(*where, f"{how}: the EXT program has no instructions")
            return False
        if ext not in self.images:
            if len(self.images) >= self.limits.max_programs:
                self._unknown(*where, f"{how}: more than {self.limits.max_programs} programs")
                return False
            self.images[ext] = decode(info.insns)
            self.tail_depth[ext] = self.tail_depth[prog]
            self.tail_notes[ext] = how
        return True
