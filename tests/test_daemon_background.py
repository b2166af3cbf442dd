"""The daemon keeps answering while it analyses costly programs (service/background.py).

The programs: a call fan-out of global functions (BTF func_info), which the verifier checks one
function at a time (cheap) but which costs tcprio's analysis its whole work bound (one context
per call stack). Each analysis is bounded in deterministic units; while they run on the
analysis thread, /healthz answers at once and the process stays up; the snapshot comes when
they are done, with these classifiers unknown (work bound reached).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tcprio.analysis.verdicts import AnalysisLimits, analyse_program
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.programs import collect_programs
from tcprio.model import Direction, Instruction
from tests.bpf_asm import R0, assemble, call_helper, call_pseudo, exit_, jeq_imm, label, mov64_imm
from tests.bpf_programs import attach_filter
from tests.freplace_programs import btf_load, loaded, prog_load_btf
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import daemon, find
from tests.timing import HANG_GUARD_S

BPF_FUNC_GET_PRANDOM_U32 = 7
FUNCTIONS = 8  # f0 (the program) calls f1 from SITES places, f1 calls f2, ...
SITES = 8
PROGRAMS = 3
# The daemon pings every 0.5 s; a loop busy analysing the three programs would go quiet for
# their whole analysis (6 s here).
WATCHDOG_GAP_S = 4.0
# Ready once the first analysis is done: about 6 s here (3 programs of about 2 s), at most 3 x
# 3.5 s at the work bound; the hang guard is ten times that.
READY_GUARD_S = 120.0


def fan_out(variant: int) -> tuple[tuple[Instruction, ...], list[int]]:
    """The program (variant: a constant in f0, so that copies are other programs) and the
    instruction offset of each function."""
    items: list = []
    for f in range(FUNCTIONS):
        items += [label(f"f{f}"), mov64_imm(R0, variant if f == 0 else 100 + f)]  # no TC_ACT_*
        if f < FUNCTIONS - 1:
            for site in range(SITES):
                items += [call_helper(BPF_FUNC_GET_PRANDOM_U32), jeq_imm(R0, 10 + site, 1)]
                items.append(call_pseudo(f"f{f + 1}"))
        items.append(exit_())
    insns = assemble(*items)
    per_function = 1 + 3 * SITES + 1  # r0 = ..., the call sites, exit
    starts = [f * per_function for f in range(FUNCTIONS - 1)] + [(FUNCTIONS - 1) * per_function]
    return insns, starts


def btf_functions() -> bytes:
    """`int`, `int (void)`, `struct __sk_buff`, `int (struct __sk_buff *)`, then f0 (ctx) and
    f1 .. f7 (void), all global: the verifier checks each once, whatever calls it."""
    names = ["int", "__sk_buff", "skb", *(f"f{f}" for f in range(FUNCTIONS))]
    strings = b"\0" + b"".join(n.encode() + b"\0" for n in names)

    def off(name: str) -> int:
        return strings.index(b"\0" + name.encode() + b"\0") + 1

    types = struct.pack("<IIII", off("int"), 1 << 24, 4, 1 << 24 | 32)  # 1: int
    types += struct.pack("<III", 0, 13 << 24, 1)  # 2: int (void)
    types += struct.pack("<III", off("__sk_buff"), 4 << 24, 0)  # 3: struct __sk_buff
    types += struct.pack("<III", 0, 2 << 24, 3)  # 4: pointer to it
    types += struct.pack("<III", 0, 13 << 24 | 1, 1) + struct.pack("<II", off("skb"), 4)  # 5
    for f in range(FUNCTIONS):  # 6 .. : the functions
        types += struct.pack("<III", off(f"f{f}"), 12 << 24 | 1, 5 if f == 0 else 2)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_fan_out_costs_a_large_share_of_the_work_bound() -> None:
    """The premise, in the analysis' own units: one such program costs it about two thirds of
    its bound (the call contexts run out first), some 2 s here."""
    insns, _ = fan_out(0)
    verdicts = analyse_program(1, {1: _info(insns)}, {}, {BPF_FUNC_GET_PRANDOM_U32: "prandom"})
    assert verdicts.values is None
    assert verdicts.work >= AnalysisLimits().max_work // 2, verdicts.work
    assert verdicts.work <= AnalysisLimits().max_work


def _info(insns: tuple[Instruction, ...]):
    from tcprio.model import ProgramInfo

    return ProgramInfo(1, "fan", "0" * 16, 3, "sched_cls", 0, (), insns)


@contextlib.contextmanager
def watchdog_listener() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """An abstract unix socket standing for systemd's notify socket, and the environment that
    makes the daemon feed its watchdog there every 0.5 s (WatchdogSec=1)."""
    name = f"tcprio-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield sock, {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"}


def _drain(sock: socket.socket, pings: list[float]) -> None:
    with contextlib.suppress(BlockingIOError):
        while True:
            if sock.recv(4096) == b"WATCHDOG=1":
                pings.append(time.monotonic())


def test_the_daemon_answers_while_it_analyses_costly_programs(tmp_path: Path) -> None:
    """Three programs of some 2 s of analysis each: while the daemon analyses them, /healthz
    answers at once and the watchdog is fed every 0.5 s (a loop busy analysing would leave a
    gap as long as the analysis); then they are published, unknown."""
    with netns("d-slow") as ns, loaded() as fds, watchdog_listener() as (sock, env):
        veth_in_one(ns, "slow0", "slow1")
        add_clsact(ns, "slow0")
        btf_fd = fds.add(btf_load(btf_functions()))
        prog_ids = []
        for n in range(PROGRAMS):
            insns, starts = fan_out(200 + n)
            funcs = [(start, 6 + f) for f, start in enumerate(starts)]
            fd = fds.add(prog_load_btf(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, insns,
                                       f"fan{n}", btf_fd, funcs))  # fmt: skip
            prog_ids.append(bpf_syscalls.prog_id_of_fd(fd))
            attach_filter(ns, "slow0", Direction.INGRESS, 1 + n, "fan", prog_fd=fd,
                          filter_name=f"fan{n}")  # fmt: skip
        assert len(collect_programs(prog_ids).programs) == PROGRAMS
        health: list[tuple[float, int]] = []
        pings: list[float] = []

        def while_analysing(running) -> None:
            started = time.perf_counter()
            status, _ = running.get("/healthz")
            health.append((time.perf_counter() - started, status))
            _drain(sock, pings)
            time.sleep(0.1)

        with daemon(tmp_path, while_waiting=while_analysing, env=env,
                    ready_guard_s=READY_GUARD_S) as running:  # fmt: skip
            ready_at = time.monotonic()
            samples = running.metrics()
            assert running.proc.poll() is None
    classes = {
        dict(labels)["prog_id"]: dict(labels)["verdict_class"]
        for (name, labels), _ in samples.items()
        if name == "tcprio_classifier_info" and dict(labels).get("netns") == ns.name
    }
    assert sorted(classes) == sorted(str(i) for i in prog_ids)
    assert set(classes.values()) == {"unknown"}, classes
    assert find(samples, "tcprio_scans_total", kind="full") == [1.0]
    assert len(health) >= 5 and {status for _, status in health} == {200}, health
    assert max(seconds for seconds, _ in health) < HANG_GUARD_S / 10, health
    assert pings, "the watchdog was not fed while the programs were analysed"
    gaps = [b - a for a, b in zip(pings, [*pings[1:], ready_at], strict=True)]
    assert max(gaps) < WATCHDOG_GAP_S, gaps
