"""Programs with BTF for the freplace tests: a minimal BTF blob, a target sched_cls program whose
global function an EXT program (BPF_PROG_TYPE_EXT) replaces, and the freplace link.

Everything here is made for a test and closed by it; nothing touches the node's own programs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls.syscall import (
    NR_BPF,
    BpfCmd,
    BpfError,
    LinkCreateAttr,
    ProgLoadAttr,
    bpf,
    libc_syscall,
    u32,
    u64,
)
from tcprio.model import Instruction

# BTF kinds and the linkage of a FUNC (its vlen)
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_STRUCT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 1, 2, 4, 12, 13
BTF_FUNC_GLOBAL = 1
BTF_INT_SIGNED = 1

# The type ids of `btf_blob()`: its FUNCs, in the order of FUNCS
INT_ID, PROTO_VOID_ID, SK_BUFF_ID, SK_BUFF_PTR_ID, PROTO_CTX_ID = 1, 2, 3, 4, 5
FUNCS = (("main_fn", PROTO_CTX_ID), ("sub_fn", PROTO_VOID_ID), ("ext_fn", PROTO_VOID_ID),
         ("ext_main", PROTO_CTX_ID))  # fmt: skip
MAIN_ID, SUB_ID, EXT_ID, EXT_MAIN_ID = 6, 7, 8, 9


def btf_blob() -> bytes:
    """`int`, `int (void)`, `struct __sk_buff`, `int (struct __sk_buff *skb)`, and four global
    functions: main_fn (a main function must take the context, or the verifier marks its BTF
    unreliable and no EXT program may replace it), sub_fn, ext_fn (void) and ext_main (ctx)."""
    names = ["int", "__sk_buff", "skb", *(name for name, _ in FUNCS)]
    strings = b"\0" + b"".join(name.encode() + b"\0" for name in names)

    def name_off(name: str) -> int:
        return strings.index(b"\0" + name.encode() + b"\0") + 1

    types = struct.pack("<IIII", name_off("int"), BTF_KIND_INT << 24, 4, BTF_INT_SIGNED << 24 | 32)
    types += struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24, INT_ID)  # int (void)
    types += struct.pack("<III", name_off("__sk_buff"), BTF_KIND_STRUCT << 24, 0)  # no members
    types += struct.pack("<III", 0, BTF_KIND_PTR << 24, SK_BUFF_ID)
    types += struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24 | 1, INT_ID)  # int (ctx)
    types += struct.pack("<II", name_off("skb"), SK_BUFF_PTR_ID)
    for name, proto in FUNCS:
        types += struct.pack("<III", name_off(name), BTF_KIND_FUNC << 24 | BTF_FUNC_GLOBAL, proto)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = (
        ("btf", u64),
        ("btf_log_buf", u64),
        ("btf_size", u32),
        ("btf_log_size", u32),
        ("btf_log_level", u32),
    )


def btf_load(blob: bytes) -> int:
    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(1 << 16)
    attr = _BtfLoadAttr(
        btf=ctypes.addressof(data),
        btf_size=len(blob),
        btf_log_buf=ctypes.addressof(log),
        btf_log_size=len(log),
        btf_log_level=1,
    )
    fd = libc_syscall(NR_BPF, BpfCmd.BTF_LOAD, ctypes.addressof(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise BpfError(BpfCmd.BTF_LOAD, ctypes.get_errno(), log.value.decode(errors="replace"))
    return fd


def for_loading(insns: tuple[Instruction, ...]) -> bytes:
    """The assembler writes BPF-to-BPF calls as the xlated image shows them (offset in `off`);
    the loader wants the offset in `imm` and `off` 0."""
    out = bytearray()
    for i in insns:
        off, imm = (0, i.off) if i.code == 0x85 and i.src == 1 else (i.off, i.imm)
        out += struct.pack("<BBhi", i.code, (i.src << 4) | i.dst, off, imm)
    return bytes(out)


def prog_load_btf(
    prog_type: int,
    insns: tuple[Instruction, ...],
    name: str,
    btf_fd: int,
    funcs: list[tuple[int, int]],
    attach_prog_fd: int = 0,
    attach_btf_id: int = 0,
) -> int:
    """Load with BTF and func_info (`funcs`: (insn_off, FUNC type id), one per function)."""
    code = for_loading(insns)
    code_buf = ctypes.create_string_buffer(code, len(code))
    license_buf = ctypes.create_string_buffer(b"GPL")
    records = b"".join(struct.pack("<II", off, type_id) for off, type_id in funcs)
    func_buf = ctypes.create_string_buffer(records, len(records))
    log = ctypes.create_string_buffer(1 << 20)
    attr = ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(code) // 8,
        insns=ctypes.addressof(code_buf),
        license=ctypes.addressof(license_buf),
        log_level=1,
        log_size=len(log),
        log_buf=ctypes.addressof(log),
        prog_name=name.encode()[:15],
        prog_btf_fd=btf_fd,
        func_info_rec_size=8,
        func_info=ctypes.addressof(func_buf),
        func_info_cnt=len(funcs),
        attach_btf_id=attach_btf_id,
        attach_prog_fd=attach_prog_fd,
    )
    fd = libc_syscall(NR_BPF, BpfCmd.PROG_LOAD, ctypes.addressof(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        text = log.value.decode(errors="replace").strip().splitlines()[-6:]
        raise BpfError(BpfCmd.PROG_LOAD, err, f"{name}: " + (" | ".join(text) or "empty log"))
    return fd


def freplace_link(ext_fd: int, target_fd: int, btf_id: int) -> int:
    """BPF_LINK_CREATE for an EXT program: attach type 0, the target's fd and the replaced
    function's BTF id (the tracing union's first field sits where tcx's relative_fd does)."""
    attr = LinkCreateAttr(prog_fd=ext_fd, target_ifindex=target_fd, attach_type=0,
                          relative_fd=btf_id)  # fmt: skip
    return bpf(BpfCmd.LINK_CREATE, attr)


@dataclass
class Loaded:
    """The fds a test made; `close` closes them all, the link first."""

    fds: list[int]

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in reversed(self.fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


@contextlib.contextmanager
def loaded() -> Iterator[Loaded]:
    fds = Loaded([])
    try:
        yield fds
    finally:
        fds.close()


def ext_unavailable() -> str | None:
    """Why this kernel cannot load an EXT program, or None when it can. Probed with an EXT
    program aimed at nothing: a kernel that has them refuses it in the verifier (EINVAL, "must
    provide btf_id"); one without them refuses it before (EPERM, empty log, as it does fentry,
    fexit and LSM programs: no BPF trampolines)."""
    code = for_loading((Instruction(0xB7, 0, 0, 0, 0), Instruction(0x95, 0, 0, 0, 0)))
    try:
        fd = bpf_syscalls.prog_load_raw(bpf_syscalls.BPF_PROG_TYPE_EXT, code, "ext_probe")
    except BpfError as exc:
        if exc.errno == errno.EPERM:
            return (
                "this kernel refuses every BPF_PROG_TYPE_EXT program with EPERM before the "
                "verifier runs (empty verifier log; fentry, fexit and LSM programs too: no BPF "
                "trampolines), so no freplace link can exist on it"
            )
        return None
    os.close(fd)
    return None
