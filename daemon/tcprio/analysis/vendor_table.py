"""The README's vendor table, generated from data/vendors.yaml.

`python -m tcprio.analysis.vendor_table` prints it; `--update README.md` rewrites the part of
that file between the two marker comments (tests/test_vendors.py checks they agree).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tcprio.analysis.vendors import VendorRule, default_rules

START = "<!-- vendor-table:start (generated from daemon/tcprio/data/vendors.yaml) -->"
END = "<!-- vendor-table:end -->"
HEADER = ("vendor", "role", "identified by", "hooks", "what it returns", "vendor-side fix")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "-"


def _row(rule: VendorRule) -> tuple[str, ...]:
    role = "Datadog's classifier" if rule.datadog_classifier else rule.role
    return (
        rule.name,
        role,
        rule.identified_by,
        ", ".join(rule.hooks),
        rule.returns,
        rule.remedy_summary,
    )


def render_table(rules: Sequence[VendorRule] | None = None) -> str:
    """The Markdown table, one row per vendor, in the file's order."""
    rows = [HEADER, tuple("---" for _ in HEADER)]
    rows += [_row(rule) for rule in (default_rules() if rules is None else rules)]
    return "\n".join("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows) + "\n"


def table_in(text: str) -> str | None:
    """What stands between the markers of `text`, or None when they are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(START) : end].strip("\n") + "\n"


def with_table(text: str, table: str) -> str:
    """`text` with the part between the markers replaced by `table`."""
    if table_in(text) is None:
        raise ValueError(f"the markers {START!r} and {END!r} are missing")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}{END}{after}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcprio.analysis.vendor_table")
    parser.add_argument("--update", metavar="README", help="rewrite the table in this file")
    args = parser.parse_args(argv)
    table = render_table()
    if args.update is None:
        sys.stdout.write(table)
        return 0
    path = Path(args.update)
    path.write_text(with_table(path.read_text(), table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
