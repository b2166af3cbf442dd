"""Programs with BTF for the freplace and callback tests: a minimal BTF builder (functions by
name and prototype), loading with func_info (a callback's address, ld_imm64 BPF_PSEUDO_FUNC,
needs it), a target sched_cls program whose global function an EXT program (BPF_PROG_TYPE_EXT)
replaces, and the freplace link.

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
from tests.bpf_asm import Item, assemble, label_pcs

# BTF kinds and the linkage of a FUNC (its vlen)
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_STRUCT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 1, 2, 4, 12, 13
BTF_FUNC_STATIC, BTF_FUNC_GLOBAL = 0, 1
BTF_INT_SIGNED = 1

# The type ids every blob of `btf_functions` starts with; the FUNCs of `btf_blob()`, in the
# order of FUNCS, follow them.
INT_ID, PROTO_VOID_ID, SK_BUFF_ID, SK_BUFF_PTR_ID, PROTO_CTX_ID = 1, 2, 3, 4, 5
FUNCS = (("main_fn", PROTO_CTX_ID), ("sub_fn", PROTO_VOID_ID), ("ext_fn", PROTO_VOID_ID),
         ("ext_main", PROTO_CTX_ID))  # fmt: skip
MAIN_ID, SUB_ID, EXT_ID, EXT_MAIN_ID = 6, 7, 8, 9

# The parameter types a function of `btf_functions` may take: the context, a u64, a void *.
CTX, U64, VOID_PTR = "ctx", "u64", "void *"


@dataclass(frozen=True)
class BtfFunc:
    """A function of the program: its name, its parameters (CTX, U64, VOID_PTR; it returns
    int) and its linkage (a bpf_loop callback is static, as clang emits it)."""

    name: str
    params: tuple[str, ...] = ()
    linkage: int = BTF_FUNC_GLOBAL


class _BtfTypes:
    """The type section being built: ids from 1, strings deduplicated."""

    def __init__(self) -> None:
        self.types: list[bytes] = []
        self.strings = bytearray(b"\0")
        self.offsets: dict[str, int] = {}

    def name(self, text: str) -> int:
        if text not in self.offsets:
            self.offsets[text] = len(self.strings)
            self.strings += text.encode() + b"\0"
        return self.offsets[text]

    def add(self, record: bytes) -> int:
        self.types.append(record)
        return len(self.types)

    def blob(self) -> bytes:
        types = b"".join(self.types)
        sizes = (len(types), len(types), len(self.strings))
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, *sizes)
        return header + types + bytes(self.strings)


def _base_types(btf: _BtfTypes) -> None:
    """`int`, `int (void)`, `struct __sk_buff`, its pointer, `int (struct __sk_buff *skb)`."""
    btf.add(struct.pack("<IIII", btf.name("int"), BTF_KIND_INT << 24, 4, BTF_INT_SIGNED << 24 | 32))
    btf.add(struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24, INT_ID))
    btf.add(struct.pack("<III", btf.name("__sk_buff"), BTF_KIND_STRUCT << 24, 0))  # no members
    btf.add(struct.pack("<III", 0, BTF_KIND_PTR << 24, SK_BUFF_ID))
    ctx_param = struct.pack("<II", btf.name("skb"), SK_BUFF_PTR_ID)
    btf.add(struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24 | 1, INT_ID) + ctx_param)


def _proto(btf: _BtfTypes, params: tuple[str, ...], param_types: dict[str, int]) -> int:
    """The FUNC_PROTO `int (params)`, with the u64 and void * types added when first used."""
    if params == ():
        return PROTO_VOID_ID
    if params == (CTX,):
        return PROTO_CTX_ID
    if U64 in params and U64 not in param_types:
        u64_type = struct.pack("<IIII", btf.name("u64"), BTF_KIND_INT << 24, 8, 64)
        param_types[U64] = btf.add(u64_type)
    if VOID_PTR in params and VOID_PTR not in param_types:
        param_types[VOID_PTR] = btf.add(struct.pack("<III", 0, BTF_KIND_PTR << 24, 0))
    record = struct.pack("<III", 0, BTF_KIND_FUNC_PROTO << 24 | len(params), INT_ID)
    for n, param in enumerate(params):
        record += struct.pack("<II", btf.name(f"arg{n}"), param_types[param])
    return btf.add(record)


def btf_functions(funcs: list[BtfFunc]) -> tuple[bytes, dict[str, int]]:
    """A BTF blob holding `funcs` (after the base types), and each one's FUNC type id."""
    btf = _BtfTypes()
    _base_types(btf)
    param_types: dict[str, int] = {CTX: SK_BUFF_PTR_ID}
    protos = [_proto(btf, func.params, param_types) for func in funcs]
    ids = {}
    for func, proto in zip(funcs, protos, strict=True):
        kind = BTF_KIND_FUNC << 24 | func.linkage
        ids[func.name] = btf.add(struct.pack("<III", btf.name(func.name), kind, proto))
    return btf.blob(), ids


def btf_blob() -> bytes:
    """`int`, `int (void)`, `struct __sk_buff`, `int (struct __sk_buff *skb)`, and four global
    functions: main_fn (a main function must take the context, or the verifier marks its BTF
    unreliable and no EXT program may replace it), sub_fn, ext_fn (void) and ext_main (ctx)."""
    params = {PROTO_CTX_ID: (CTX,), PROTO_VOID_ID: ()}
    blob, ids = btf_functions([BtfFunc(name, params[proto]) for name, proto in FUNCS])
    assert [ids[name] for name, _ in FUNCS] == [MAIN_ID, SUB_ID, EXT_ID, EXT_MAIN_ID]
    return blob


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
    return prog_load_btf_code(
        prog_type, for_loading(insns), name, btf_fd, funcs, attach_prog_fd, attach_btf_id
    )


def prog_load_btf_code(
    prog_type: int,
    code: bytes,
    name: str,
    btf_fd: int,
    funcs: list[tuple[int, int]],
    attach_prog_fd: int = 0,
    attach_btf_id: int = 0,
) -> int:
    """`prog_load_btf` of loadable bytes (BPF-to-BPF call offsets in imm)."""
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


def prog_load_functions(
    prog_type: int, items: list[Item], name: str, funcs: list[tuple[str, BtfFunc]]
) -> int:
    """Assemble `items` (tests.bpf_asm) and load them with BTF describing `funcs`: (the label
    where a function starts, the function), the main function first, at pc 0."""
    pcs = label_pcs(*items)
    blob, ids = btf_functions([func for _, func in funcs])
    btf_fd = btf_load(blob)
    try:  # the program keeps its own reference to the BTF
        records = [(pcs[start], ids[func.name]) for start, func in funcs]
        return prog_load_btf(prog_type, assemble(*items), name, btf_fd, records)
    finally:
        os.close(btf_fd)


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
