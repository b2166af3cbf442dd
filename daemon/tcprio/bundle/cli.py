"""`tcprio bundle`'s command: where the archive goes (checked writable before anything is
collected), the listing of its files, the y/N confirmation, the exit statuses. Nothing is
uploaded."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tcprio.bundle.archive import Bundle, collect_bundle, write_archive
from tcprio.bundle.collect import Context
from tcprio.bundle.commands import first_line
from tcprio.bundle.common import exists, human_size, safe_name
from tcprio.bundle.redact import redact_text
from tcprio.model import NetNamespace

EXIT_WRITTEN, EXIT_DECLINED, EXIT_CANNOT_PROMPT, EXIT_NOT_WRITTEN = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

PROG = "tcprio bundle"
DEFAULT_FOLDER = Path("/var/tmp")


# --- where, showing, asking ------------------------------------------------------------------


def default_output(node: str, now: datetime) -> Path:
    return DEFAULT_FOLDER / f"tcprio-bundle-{safe_name(node)}-{now:%Y%m%dT%H%M%SZ}.tar.gz"


def output_path(requested: str | None, node: str, now: datetime) -> Path:
    """Where to write: --output (a folder gets the default file name), else /var/tmp/..."""
    default = default_output(node, now)
    if requested is None:
        return default
    path = Path(requested).absolute()  # the path printed at the end is one to copy
    return path / default.name if path.is_dir() else path


class NotWritable(Exception):
    pass


def check_writable(path: Path) -> None:
    """Fail early (before collecting and asking) when `path` cannot be written."""
    if exists(path):
        raise NotWritable(f"{path} already exists: choose another --output")
    folder = path.parent
    if not folder.is_dir():
        raise NotWritable(f"cannot write {path}: {folder} is not an existing folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tcprio-bundle-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise NotWritable(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def listing(bundle: Bundle, full: bool) -> str:
    lines = [
        f"tcprio bundle: {len(bundle.members)} files, {human_size(bundle.total_size)} "
        "before compression, secrets redacted:"
    ]
    if full:
        width = max(len(human_size(len(m.data))) for m in bundle.members)
        lines += [f"  {human_size(len(m.data)):>{width}}  {m.path}" for m in bundle.members]
    for outcome in bundle.failed:
        error = first_line(redact_text(outcome.error or ""), 160)
        lines.append(
            f"  ! {outcome.collector} failed: {error} (see errors/{outcome.collector}.txt)"
        )
    return "\n".join(lines) + "\n"


def ask(question: str) -> bool:
    """y / yes (any case) is yes; anything else, or end of input, is no."""
    sys.stdout.write(question)
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not answer:
        sys.stdout.write("\n")
    return answer.strip().lower() in ("y", "yes")


def run_bundle(args: argparse.Namespace, discover: Callable[[], list[NetNamespace]]) -> int:
    """Collect, show, ask (unless --yes), write. Exit status: 0 written, 1 declined, 2 cannot
    ask (not on a terminal, no --yes), 3 not written (the output, I/O), 130 interrupted."""
    try:
        return _run_bundle(args, discover)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\n{PROG}: interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # collectors are guarded: this is a bug, still one line
        print(f"{PROG}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN


def _run_bundle(args: argparse.Namespace, discover: Callable[[], list[NetNamespace]]) -> int:
    if not args.yes and not sys.stdin.isatty():
        print(
            f"{PROG}: not on a terminal and --yes not given: refusing to wait for a confirmation",
            file=sys.stderr,
        )
        return EXIT_CANNOT_PROMPT
    now = datetime.now(UTC).replace(microsecond=0)
    node = socket.gethostname()
    path = output_path(args.output, node, now)
    try:
        check_writable(path)
    except NotWritable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    print(f"{PROG}: collecting (read-only; nothing is uploaded)...", file=sys.stderr, flush=True)
    bundle = collect_bundle(Context(args, discover), node, now.isoformat())
    sys.stdout.write(listing(bundle, full=not args.yes))
    if not args.yes and not ask(f"Write this bundle to {path}? [y/N] "):
        print("Not written.")
        return EXIT_DECLINED
    try:
        write_archive(path, bundle, now)
    except OSError as exc:
        print(f"{PROG}: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    print(f"Bundle written: {path}")
    print(
        f"({human_size(path.stat().st_size)}, mode 0600. Nothing was uploaded: attach it to your "
        "support case yourself.)"
    )
    return EXIT_WRITTEN
