"""`--explain`: a program's verdicts told line by line (values, each exit path, the reasons)."""

from __future__ import annotations

from tcprio.analysis.semantics import describe_values
from tcprio.model import ProgramVerdicts


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
        if path.values is None and path.may_return:
            shown += f", among them {describe_values(path.may_return)}"
        lines.append(f"  exit at {where}: {shown}" + (f" ({path.note})" if path.note else ""))
    if verdicts.unknown_reasons:
        lines.append("  unknown because:")
        lines.extend(f"    {reason}" for reason in verdicts.unknown_reasons)
    return lines
