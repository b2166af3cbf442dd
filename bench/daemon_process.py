"""The tcprio daemon as a subprocess on loopback, for the benchmarks (daemon_bench.py and
churn_stress.py): start it, ask its endpoint, read its /proc figures, stop it."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def environment_without_systemd(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without systemd's WATCHDOG_* / NOTIFY_* (then `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "NOTIFY_"))}
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    proc: subprocess.Popen
    port: int
    log: Path

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()

    def status(self, field_name: str) -> int:
        """A field of /proc/<pid>/status: in bytes for the Vm* ones, else as a number."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == field_name:
                    number = int(value.split()[0])
                    return number * 1024 if key.startswith("Vm") else number
        raise KeyError(field_name)

    def resources(self) -> dict[str, int]:
        """Open fds, threads, RSS and its peak."""
        out = {"fds": len(os.listdir(f"/proc/{self.proc.pid}/fd"))}
        for key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = self.status(key)
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def idle_cpu(self, seconds: float = 5.0) -> float:
        """Share of one core the daemon uses over `seconds` with nothing changing, no scrapes."""
        before = self.cpu_seconds()
        time.sleep(seconds)
        return (self.cpu_seconds() - before) / seconds

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until /readyz answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if self.get("/readyz", timeout=5)[0] == 200:
                    return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError("the daemon never became ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_daemon(
    config_text: str,
    port: int,
    workdir: Path,
    env: Mapping[str, str],
    python_args: Sequence[str] = (),
) -> Iterator[Daemon]:
    """`python [python_args] -m tcprio --config <config_text written in workdir>`."""
    config = workdir / f"tcprio-{port}.yaml"
    config.write_text(config_text)
    log = workdir / f"daemon-{port}.log"
    argv = [str(PYTHON), *python_args, "-m", "tcprio", "--config", str(config)]
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=dict(env),
                                preexec_fn=die_with_parent)  # fmt: skip
    try:
        yield Daemon(proc, port, log)
    finally:
        stop(proc)
