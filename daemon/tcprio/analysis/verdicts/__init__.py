"""What a BPF classifier can return: abstract interpretation of its translated (xlated) code.

Pure: the program images, the maps (with their prog-array slots) and the kernel's helper names
come in as data; the exit paths and the values r0 may hold there come out. The analysis follows
BPF-to-BPF calls and tail calls, and reports a path as unknown whenever it cannot model it.

The modules: `opcodes` (the instruction encoding), `domain` (abstract values, the stack, the
machine state, arithmetic, the refinement by conditional jumps), `images` (programs decoded, with
their blocks), `helpers` (what it knows of kernel helpers), `ctx` (a tc program's context and
its skb->cb[] words), `interpreter` (the analysis itself, its limits and the results), `tail_calls`
(following tail calls), `explain` (the lines of --explain) and `sharing` (one analysis for
programs that differ only in constants). Callers use the names below.
"""

from tcprio.analysis.verdicts.explain import explain
from tcprio.analysis.verdicts.interpreter import AnalysisLimits, analyse_program
from tcprio.analysis.verdicts.sharing import SharedVerdicts

__all__ = ["AnalysisLimits", "SharedVerdicts", "analyse_program", "explain"]
