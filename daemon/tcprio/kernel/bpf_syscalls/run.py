"""Loading programs and running them: BPF_PROG_TEST_RUN, prog arrays, run statistics."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator

from tcprio.kernel.bpf_syscalls.syscall import (
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_OBJ_NAME_LEN,
    BPF_PROG_TYPE_TRACING,
    BPF_STATS_RUN_TIME,
    BPF_TRACE_FEXIT,
    INSN_SIZE,
    NR_BPF,
    BpfCmd,
    BpfError,
    EnableStatsAttr,
    MapCreateAttr,
    MapElemAttr,
    ProgLoadAttr,
    TestRunAttr,
    bpf,
    libc_syscall,
    u32,
)

# --- running programs ------------------------------------------------------------------------


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None) -> int:
    """Run the program on `data` (a whole packet for sched_cls), with `ctx` as its context
    (a struct __sk_buff: the kernel lets mark, priority and cb[] be set); its return value,
    signed."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 4096)  # room for a packet that grew
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    attr = TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=len(data_out),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
        ctx_size_in=len(ctx) if ctx else 0,
        ctx_in=ctypes.addressof(ctx_in) if ctx_in is not None else 0,
    )
    try:
        bpf(BpfCmd.PROG_TEST_RUN, attr)
    except BpfError as exc:
        if exc.errno != errno.ENOSPC:  # output larger than our buffer: retval is still set
            raise
    return ctypes.c_int32(attr.retval).value


def prog_array_create(slots: int) -> int:
    """A new prog array (tail-call table) of `slots` entries; its fd. For tests and the
    self-test only: the scan and the daemon never create anything."""
    attr = MapCreateAttr(
        map_type=BPF_MAP_TYPE_PROG_ARRAY, key_size=4, value_size=4, max_entries=slots
    )
    return bpf(BpfCmd.MAP_CREATE, attr)


def prog_array_set(map_fd: int, slot: int, prog_fd: int) -> None:
    """Put program `prog_fd` in slot `slot` of a prog array made by `prog_array_create`."""
    key, value = u32(slot), u32(prog_fd)
    attr = MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    bpf(BpfCmd.MAP_UPDATE_ELEM, attr)


def enable_run_stats() -> int:
    """An fd that makes every program count run_cnt / run_time_ns until it is closed."""
    return bpf(BpfCmd.ENABLE_STATS, EnableStatsAttr(type=BPF_STATS_RUN_TIME))


@contextlib.contextmanager
def run_stats() -> Iterator[None]:
    """BPF run statistics counted while the body runs."""
    fd = enable_run_stats()
    try:
        yield
    finally:
        os.close(fd)


def _verifier_log_tail(log: bytes, lines: int = 8) -> str:
    text = log.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return " | ".join(text.splitlines()[-lines:])


def _load(attr: ProgLoadAttr) -> tuple[int, int]:
    """(fd, 0) on success, (-1, errno) on failure."""
    ret = libc_syscall(NR_BPF, BpfCmd.PROG_LOAD, ctypes.addressof(attr), ctypes.sizeof(attr))
    return (ret, 0) if ret >= 0 else (-1, ctypes.get_errno())


def _prog_load_attr(
    prog_type: int, insns: bytes, name: str, license: str, **fields: int
) -> tuple[ProgLoadAttr, tuple[ctypes.Array, ...]]:
    """The attr that loads `insns`, and the buffers it points into (keep them alive)."""
    insns_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(license.encode())
    attr = ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // INSN_SIZE,
        insns=ctypes.addressof(insns_buf),
        license=ctypes.addressof(license_buf),
        prog_name=name.encode()[: BPF_OBJ_NAME_LEN - 1],
        **fields,
    )
    return attr, (insns_buf, license_buf)


def prog_load_raw(prog_type: int, insns: bytes, name: str, license: str = "GPL") -> int:
    """Load raw eBPF bytecode; returns the program fd. On failure the BpfError carries the
    verifier log's last lines (the load is retried with a log only when it failed)."""
    if not insns or len(insns) % INSN_SIZE:
        raise ValueError(f"{len(insns)} bytes is not a whole number of eBPF instructions")
    attr, _buffers = _prog_load_attr(prog_type, insns, name, license)
    fd, err = _load(attr)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(1 << 20)
    attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    fd, _ = _load(attr)
    if fd >= 0:  # a load that only failed the first time: keep it
        return fd
    raise BpfError(BpfCmd.PROG_LOAD, err, f"{name}: {_verifier_log_tail(log.raw)}")


def prog_load_tracing(
    insns: bytes,
    name: str,
    attach_btf_id: int,
    attach_prog_fd: int = 0,
    attach_type: int = BPF_TRACE_FEXIT,
    license: str = "GPL",
) -> int:
    """Load a BPF_PROG_TYPE_TRACING program (fexit by default) aimed at a kernel function
    (attach_prog_fd 0, attach_btf_id in vmlinux BTF) or at a BPF program (its fd, and its
    function's id in the program's BTF: `main_func_btf_id`); returns the program fd. Loaded
    with a verifier log: the BpfError of a failure carries its last lines, or "empty verifier
    log" when the kernel refused before the verifier ran."""
    log = ctypes.create_string_buffer(1 << 16)
    attr, _buffers = _prog_load_attr(
        BPF_PROG_TYPE_TRACING,
        insns,
        name,
        license,
        log_level=1,
        log_size=len(log),
        log_buf=ctypes.addressof(log),
        expected_attach_type=attach_type,
        attach_btf_id=attach_btf_id,
        attach_prog_fd=attach_prog_fd,
    )
    fd, err = _load(attr)
    if fd < 0:
        raise BpfError(
            BpfCmd.PROG_LOAD, err, _verifier_log_tail(log.raw, 6) or "empty verifier log"
        )
    return fd
