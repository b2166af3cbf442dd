"""Running one show/list command for `tcprio bundle`: inside a network namespace when asked
(through `nsenter --net`), bounded in time and output, never raising for the command's own
failure."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

COMMAND_TIMEOUT = 10.0  # seconds, for each command
MAX_OUTPUT = 8 << 20  # bytes kept of each command's output


@dataclasses.dataclass(frozen=True)
class CommandResult:
    shown: str  # the command as a person would type it
    stdout: bytes
    stderr: str
    error: str | None  # None: it ran and exited 0
    truncated: bool = False


def first_line(text: str, limit: int = 300) -> str:
    line = next((line for line in text.splitlines() if line.strip()), "").strip()
    return line[:limit]


def _read_capped(f: Any, limit: int) -> tuple[bytes, bool]:
    f.seek(0)
    data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def run_command(
    argv: Sequence[str],
    shown: str | None = None,
    netns_fd: int | None = None,
    timeout: float = COMMAND_TIMEOUT,
    limit: int = MAX_OUTPUT,
) -> CommandResult:
    """Run a show/list command (inside the namespace open on `netns_fd`, through nsenter),
    bounded in time and output; never raises for the command's own failure."""
    shown = shown or " ".join(argv)
    program = shutil.which(argv[0])
    if program is None:
        return CommandResult(shown, b"", "", f"{argv[0]}: command not found in PATH")
    full = [program, *argv[1:]]
    if netns_fd is not None:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            return CommandResult(shown, b"", "", "nsenter: command not found in PATH")
        full = [nsenter, f"--net=/proc/self/fd/{netns_fd}", "--", *full]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(netns_fd,) if netns_fd is not None else (),
                start_new_session=True,  # killable as a group on timeout
            )
        except OSError as exc:
            return CommandResult(shown, b"", "", f"{argv[0]}: cannot run: {exc.strerror}")
        error = None
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            status, error = None, f"timed out after {timeout:g} s"
        except BaseException:  # Ctrl-C: leave nothing running behind
            _kill(proc)
            raise
        stdout, truncated = _read_capped(out, limit)
        stderr_bytes, _ = _read_capped(err, 64 << 10)
    stderr = stderr_bytes.decode("utf-8", "replace")
    if status:
        error = f"exit status {status}" + (f": {first_line(stderr)}" if stderr.strip() else "")
    if truncated:
        stdout += f"\n[tcprio bundle: output cut at {limit} bytes]\n".encode()
    return CommandResult(shown, stdout, stderr, error, truncated)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
