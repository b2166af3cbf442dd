"""The test classifiers of bpf/classifiers.c, compiled once with BCC and loaded into the kernel.

`ClassifierPrograms` gives the fd and program id of every program. The session fixture
`classifier_programs` shares one instance between all tests (conftest imports it); the module
functions `attach_filter` / `attach_tcx` hang a program on a hook inside a test namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bcc_support import prepare_bcc_environment
from tcprio.model import ETH_P_ALL, Direction
from tests.kernel import TestNetns

CLASSIFIERS_C = Path(__file__).resolve().parent.parent / "bpf" / "classifiers.c"

# Program name -> its slot in the `seen` counter array (None: it counts nothing).
SEEN_SLOT: dict[str, int | None] = {
    "term_ok": 0,
    "term_shot": 1,
    "term_redirect": 2,
    "pass_unspec": 3,
    "pass_pipe": 4,
    "pass_42": 5,
    "by_packet": 6,
    "bpf2bpf_call": 7,
    "tail_entry": 8,
    "tail_target_ok": 9,
    "classid_match": 10,
    "classid_none": 11,
    "classifier_egress": 12,
    "classifier_ingress": 13,
    "decide_by_length_sub": None,
}
PROGRAM_NAMES: tuple[str, ...] = tuple(SEEN_SLOT)

CLSACT_PARENT = {Direction.INGRESS: 0xFFFFFFF2, Direction.EGRESS: 0xFFFFFFF3}
PROTOCOLS = {"all": ETH_P_ALL, "ip": 0x0800, "ipv6": 0x86DD, "arp": 0x0806}

_BPF_CALL = 0x85
_BPF_PSEUDO_CALL = 1


def link_subprogram(main: bytes, subprogram: bytes) -> bytes:
    """`main` followed by `subprogram`, with main's unresolved pseudo-call aimed at it.

    BCC loads one function at a time and leaves a call to another function as
    `call src=1 imm=-1`; a BPF-to-BPF call's imm is the callee's offset from the next insn.
    """
    insns = bytearray(main)
    insn_count = len(main) // 8
    calls = [
        pc
        for pc in range(insn_count)
        if insns[pc * 8] == _BPF_CALL and insns[pc * 8 + 1] >> 4 == _BPF_PSEUDO_CALL
    ]
    if len(calls) != 1:
        raise ValueError(f"expected one BPF-to-BPF call in the main program, found {len(calls)}")
    call_pc = calls[0]
    struct.pack_into("<i", insns, call_pc * 8 + 4, insn_count - (call_pc + 1))
    return bytes(insns) + subprogram


class ClassifierPrograms:
    """Every program of bpf/classifiers.c, loaded as sched_cls; verdict_jmp[0] = tail_target_ok.

    Keep the instance alive while the programs are in use: it holds the BPF object, and with it
    the last user reference to the prog array (the kernel empties a prog array without one).
    """

    def __init__(self, source: Path = CLASSIFIERS_C) -> None:
        prepare_bcc_environment()
        from bcc import BPF  # late: importing bcc is only worth it when compiling

        self._bpf = BPF(src_file=str(source).encode())
        self._own_fds: list[int] = []
        self._fds: dict[str, int] = {}
        self._ids: dict[str, int] = {}
        try:
            for name in PROGRAM_NAMES:
                self._fds[name] = self._load(name)
            self._fill_tail_calls()
        except BaseException:
            self.close()
            raise

    def _load(self, name: str) -> int:
        from bcc import BPF

        if name == "bpf2bpf_call":
            linked = link_subprogram(
                self._bpf.dump_func(b"bpf2bpf_call"),
                self._bpf.dump_func(b"decide_by_length_sub"),
            )
            fd = bpf_syscalls.prog_load_raw(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, linked, name)
            self._own_fds.append(fd)
            return fd
        return self._bpf.load_func(name.encode(), BPF.SCHED_CLS).fd

    def _fill_tail_calls(self) -> None:
        table = self._bpf.get_table(b"verdict_jmp")
        table[ctypes.c_int(0)] = ctypes.c_int(self._fds["tail_target_ok"])

    def set_tail_call(self, slot: int, name: str | None) -> None:
        """Put program `name` in verdict_jmp[slot], or empty the slot when name is None."""
        table = self._bpf.get_table(b"verdict_jmp")
        if name is None:
            del table[ctypes.c_int(slot)]
        else:
            table[ctypes.c_int(slot)] = ctypes.c_int(self._fds[name])

    @property
    def names(self) -> tuple[str, ...]:
        return PROGRAM_NAMES

    def fd(self, name: str) -> int:
        return self._fds[name]

    def prog_id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = bpf_syscalls.prog_id_of_fd(self._fds[name])
        return self._ids[name]

    def map_id(self, table_name: str) -> int:
        """The kernel id of one of the program's maps ("verdict_jmp", "seen")."""
        return bpf_syscalls.map_info_from_fd(self._bpf.get_table(table_name.encode()).get_fd()).id

    def seen(self, name: str) -> int:
        """How many packets the program `name` has counted (its slot of the `seen` array)."""
        slot = SEEN_SLOT[name]
        if slot is None:
            raise ValueError(f"{name} counts nothing")
        return int(self._bpf.get_table(b"seen")[ctypes.c_int(slot)].value)

    def close(self) -> None:
        for fd in self._own_fds:
            os.close(fd)
        self._own_fds.clear()
        self._fds.clear()
        self._bpf.cleanup()

    def __enter__(self) -> ClassifierPrograms:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_shared: ClassifierPrograms | None = None


def shared_programs() -> ClassifierPrograms:
    """The programs of this test process, compiled on first use."""
    global _shared
    if _shared is None:
        _shared = ClassifierPrograms()
    return _shared


def close_shared_programs() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


@pytest.fixture(scope="session")
def classifier_programs() -> Iterator[ClassifierPrograms]:
    yield shared_programs()
    close_shared_programs()


# --- attaching to hooks in test namespaces ---------------------------------------------------


def _protocol_number(protocol: str | int) -> int:
    return protocol if isinstance(protocol, int) else PROTOCOLS[protocol]


def attach_filter(
    ns: TestNetns,
    ifname: str,
    direction: Direction | str,
    prio: int,
    prog_name: str,
    handle: int | None = None,
    direct_action: bool = True,
    protocol: str | int = "all",
    filter_name: str | None = None,
    replace: bool = False,
    prog_fd: int | None = None,
) -> None:
    """Add a cls_bpf filter running `prog_name` on the clsact qdisc of `ifname` (which must
    exist: `kernel.add_clsact`). The filter lives until the namespace goes away (or
    `tc filter del`); it keeps its own reference to the program. `prog_fd`: a program of the
    test's own (then `prog_name` only names the filter)."""
    from pyroute2 import IPRoute

    if prog_fd is None:  # only then: compiling the shared programs takes a while
        prog_fd = shared_programs().fd(prog_name)
    with ns.entered():
        ifindex = socket.if_nametoindex(ifname)
        # Created inside the namespace: the netlink socket stays bound to it.
        with IPRoute() as ipr:
            ipr.tc(
                "replace-filter" if replace else "add-filter",
                "bpf",
                ifindex,
                handle,
                fd=prog_fd,
                name=filter_name or prog_name,
                parent=CLSACT_PARENT[Direction(direction)],
                classid=1,
                direct_action=direct_action,
                prio=prio,
                protocol=_protocol_number(protocol),
            )


TCX_MISSING_PREFIX = "no tcx on this kernel"


@functools.cache
def tcx_missing() -> str | None:
    """Why this kernel has no tcx (it came in 6.6: before, BPF_PROG_QUERY with a tcx attach
    type fails with EINVAL), or None. A read-only query on `lo` of the current namespace."""
    try:
        bpf_syscalls.tcx_query(1, Direction.INGRESS)
    except bpf_syscalls.TcxUnsupported:
        return f"{TCX_MISSING_PREFIX} (BPF_PROG_QUERY with BPF_TCX_INGRESS fails with EINVAL)"
    except bpf_syscalls.BpfError:
        return None  # tcx is there; `lo` answered something else
    return None


requires_tcx = pytest.mark.skipif(tcx_missing() is not None, reason=str(tcx_missing()))


def attach_tcx(ns: TestNetns, ifname: str, direction: Direction | str, prog_name: str) -> int:
    """Append `prog_name` to the tcx chain of `ifname`; returns the link fd (close it to detach;
    deleting the namespace's interface also ends the link)."""
    programs = shared_programs()
    with ns.entered():
        ifindex = socket.if_nametoindex(ifname)
        return bpf_syscalls.tcx_attach(programs.fd(prog_name), ifindex, Direction(direction))


@contextlib.contextmanager
def tcx_attached(
    ns: TestNetns, ifname: str, direction: Direction | str, prog_name: str
) -> Iterator[int]:
    """`attach_tcx` for a with-block: the link fd, detached at the end."""
    link_fd = attach_tcx(ns, ifname, direction, prog_name)
    try:
        yield link_fd
    finally:
        os.close(link_fd)
