"""A thin, typed layer over the bpf(2) syscall: programs, maps, links, tcx, test runs.

Only ctypes and the kernel's UAPI structures (include/uapi/linux/bpf.h of kernel 6.18); no BCC,
no libbpf, no netlink. Every failing call raises `BpfError`, naming the bpf command and errno.

Notes for whoever reads the translated ("xlated") instructions that `prog_info` returns. They are
the verifier's output, not what the compiler emitted:
- A helper call is `code 0x85, src 0` with `imm = helper address - address of __bpf_call_base`;
  `helper_symbols()` maps such an imm to the kernel function's name ("bpf_redirect"). The verifier
  may have rewritten a helper into another function (a hash map lookup becomes e.g.
  `__htab_map_lookup_elem`) or inlined it into plain instructions (array map lookups,
  bpf_get_smp_processor_id ...). When the reader may not see kernel addresses, imm is 0.
- A tail call shows as `code 0x85, imm 12` (BPF_FUNC_tail_call); r2 holds the prog array, r3 the
  slot. The kernel shows it that way whatever it rewrote it into internally.
- A BPF-to-BPF call is `code 0x85, src 1` with `off` = relative offset of the callee (target
  pc = pc + off + 1) and imm = the callee's subprogram index (JIT-ed programs).
- A 64-bit load of a map (`code 0x18`, two slots) carries the map's *id* in imm with src 1
  (BPF_PSEUDO_MAP_FD: the map itself) or src 2 (BPF_PSEUDO_MAP_VALUE: a pointer into its value,
  offset in the second slot's imm).
- `ldx` of the PROBE_MEM kinds is shown as a plain `ldx mem`.
- With net.core.bpf_jit_harden set, constants may be blinded: extra moves and xors through the
  verifier's scratch register 11 (BPF_REG_AX).
"""

from __future__ import annotations

import binascii
import contextlib
import ctypes
import errno
import functools
import os
import platform
import re
import struct
import sys
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType

from tcprio.kernel.btf import parse_btf_func_names
from tcprio.model import Direction, Instruction, MapInfo, ProgramInfo, TcxEntry

_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
_BPF_OBJ_NAME_LEN = 16
_INSN_SIZE = 8


class BpfCmd(IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    PROG_LOAD = 5
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    BTF_GET_FD_BY_ID = 19
    LINK_CREATE = 28
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    ENABLE_STATS = 32

    def __str__(self) -> str:
        return f"BPF_{self.name}"


BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SCHED_ACT = 4
BPF_PROG_TYPE_TRACING = 26
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_LINK_TYPE_TCX = 11
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_TRACE_FEXIT = 25
BPF_STATS_RUN_TIME = 0
BPF_FUNC_TAIL_CALL = 12

TCX_ATTACH_TYPE = {Direction.INGRESS: BPF_TCX_INGRESS, Direction.EGRESS: BPF_TCX_EGRESS}

# enum bpf_prog_type, complete up to kernel 6.18; names as bpftool prints them.
PROG_TYPE_NAMES: tuple[str, ...] = (
    "unspec", "socket_filter", "kprobe", "sched_cls", "sched_act", "tracepoint", "xdp",
    "perf_event", "cgroup_skb", "cgroup_sock", "lwt_in", "lwt_out", "lwt_xmit", "sock_ops",
    "sk_skb", "cgroup_device", "sk_msg", "raw_tracepoint", "cgroup_sock_addr", "lwt_seg6local",
    "lirc_mode2", "sk_reuseport", "flow_dissector", "cgroup_sysctl", "raw_tracepoint_writable",
    "cgroup_sockopt", "tracing", "struct_ops", "ext", "lsm", "sk_lookup", "syscall", "netfilter",
)  # fmt: skip

# enum bpf_map_type, complete up to kernel 6.18.
MAP_TYPE_NAMES: tuple[str, ...] = (
    "unspec", "hash", "array", "prog_array", "perf_event_array", "percpu_hash", "percpu_array",
    "stack_trace", "cgroup_array", "lru_hash", "lru_percpu_hash", "lpm_trie", "array_of_maps",
    "hash_of_maps", "devmap", "sockmap", "cpumap", "xskmap", "sockhash", "cgroup_storage",
    "reuseport_sockarray", "percpu_cgroup_storage", "queue", "stack", "sk_storage",
    "devmap_hash", "struct_ops", "ringbuf", "inode_storage", "task_storage", "bloom_filter",
    "user_ringbuf", "cgrp_storage", "arena",
)  # fmt: skip

# enum bpf_link_type, complete up to kernel 6.18.
LINK_TYPE_NAMES: tuple[str, ...] = (
    "unspec", "raw_tracepoint", "tracing", "cgroup", "iter", "netns", "xdp", "perf_event",
    "kprobe_multi", "struct_ops", "netfilter", "tcx", "uprobe_multi", "netkit", "sockmap",
)  # fmt: skip


def _name_in(table: tuple[str, ...], value: int) -> str:
    return table[value] if 0 <= value < len(table) else f"type_{value}"


def prog_type_name(prog_type: int) -> str:
    return _name_in(PROG_TYPE_NAMES, prog_type)


def map_type_name(map_type: int) -> str:
    return _name_in(MAP_TYPE_NAMES, map_type)


def link_type_name(link_type: int) -> str:
    return _name_in(LINK_TYPE_NAMES, link_type)


# --- errors ----------------------------------------------------------------------------------


class BpfError(OSError):
    """A bpf() command failed; `command` names it, `errno` says why."""

    def __init__(self, command: BpfCmd | str, err: int, detail: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.command = str(command)
        self.detail = detail

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, str(self.errno))
        text = f"bpf({self.command}) failed: {self.strerror} [{code}]"
        return f"{text}: {self.detail}" if self.detail else text

    def __reduce__(self) -> tuple[type[BpfError], tuple[str, int, str]]:
        # OSError pickles as (errno, strerror), which this __init__ does not take.
        return (type(self), (self.command, self.errno, self.detail))


class TcxUnsupported(BpfError):
    """The kernel has no tcx hooks (kernel < 6.6 or built without them)."""


# --- the syscall -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong)
_raw_syscall = _libc["syscall"]  # a second handle, without argtypes, for pre-converted arguments
_raw_syscall.restype = ctypes.c_long


def _bpf_syscall_nr() -> int:
    machine = platform.machine()
    if machine not in _BPF_SYSCALL_NR:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {machine}")
    return _BPF_SYSCALL_NR[machine]


_NR_BPF = _bpf_syscall_nr()


def _bpf(cmd: BpfCmd, attr: ctypes.Structure) -> int:
    """Call bpf(cmd, &attr, sizeof attr); the kernel treats the bytes past attr as zero."""
    ret = _syscall(_NR_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(cmd, ctypes.get_errno())
    return ret


def _address(buffer: ctypes.Array | None) -> int:
    return ctypes.addressof(buffer) if buffer is not None else 0


# --- union bpf_attr, one structure per command -----------------------------------------------

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class _ObjIdAttr(ctypes.Structure):
    """BPF_*_GET_FD_BY_ID and BPF_*_GET_NEXT_ID."""

    _fields_ = (("id", _u32), ("next_id", _u32), ("open_flags", _u32))


class _InfoByFdAttr(ctypes.Structure):
    _fields_ = (("bpf_fd", _u32), ("info_len", _u32), ("info", _u64))


class _MapElemAttr(ctypes.Structure):
    _fields_ = (("map_fd", _u32), ("pad", _u32), ("key", _u64), ("value", _u64), ("flags", _u64))


class _MapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
    )


class _QueryAttr(ctypes.Structure):
    """The `query` member, with the link fields of kernel >= 6.6 (`prog_cnt` is also `count`)."""

    _fields_ = (
        ("target_ifindex", _u32),
        ("attach_type", _u32),
        ("query_flags", _u32),
        ("attach_flags", _u32),
        ("prog_ids", _u64),
        ("prog_cnt", _u32),
        ("pad", _u32),
        ("prog_attach_flags", _u64),
        ("link_ids", _u64),
        ("link_attach_flags", _u64),
        ("revision", _u64),
    )


class _LinkCreateAttr(ctypes.Structure):
    """The `link_create` member with its tcx part (relative_fd / expected_revision). A tracing
    link's part (target_btf_id, cookie) has the same size; tcprio leaves it zero."""

    _fields_ = (
        ("prog_fd", _u32),
        ("target_ifindex", _u32),
        ("attach_type", _u32),
        ("flags", _u32),
        ("relative_fd", _u32),
        ("pad", _u32),
        ("expected_revision", _u64),
    )


class _TestRunAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
        ("pad", _u32),
    )


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = (("type", _u32),)


class _ProgLoadAttr(ctypes.Structure):
    """The `prog_load` member up to attach_prog_fd (tracing programs: their target)."""

    _fields_ = (
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", ctypes.c_char * _BPF_OBJ_NAME_LEN),
        ("prog_ifindex", _u32),
        ("expected_attach_type", _u32),
        ("prog_btf_fd", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("func_info_cnt", _u32),
        ("line_info_rec_size", _u32),
        ("line_info", _u64),
        ("line_info_cnt", _u32),
        ("attach_btf_id", _u32),
        ("attach_prog_fd", _u32),
    )


# --- info structures -------------------------------------------------------------------------


class _ProgInfoStruct(ctypes.Structure):
    """struct bpf_prog_info, 232 bytes, unchanged from kernel 5.16 to 6.18."""

    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", ctypes.c_char * _BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("gpl_compatible", _u32),  # bit 0; the other 31 bits are padding
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
        ("recursion_misses", _u64),
        ("verified_insns", _u32),
        ("attach_btf_obj_id", _u32),
        ("attach_btf_id", _u32),
        ("pad", _u32),
    )


class _BtfInfoStruct(ctypes.Structure):
    """struct bpf_btf_info (32 bytes on kernel 6.18)."""

    _fields_ = (
        ("btf", _u64),
        ("btf_size", _u32),
        ("id", _u32),
        ("name", _u64),
        ("name_len", _u32),
        ("kernel_btf", _u32),
    )


class _MapInfoStruct(ctypes.Structure):
    """struct bpf_map_info (88 bytes on kernel 6.18)."""

    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * _BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("btf_id", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_id", _u32),
        ("map_extra", _u64),
    )


class _LinkInfoStruct(ctypes.Structure):
    """struct bpf_link_info: a common head, then a per-type union (tcx: ifindex, attach_type)."""

    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("prog_id", _u32),
        ("pad", _u32),
        ("union_u32_0", _u32),
        ("union_u32_1", _u32),
        ("union_rest", ctypes.c_uint8 * 96),
    )


def _decode_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _obj_info(fd: int, info: ctypes.Structure) -> int:
    """Fill `info` from BPF_OBJ_GET_INFO_BY_FD; returns how many bytes the kernel wrote."""
    attr = _InfoByFdAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BpfCmd.OBJ_GET_INFO_BY_FD, attr)
    return attr.info_len


# --- ids and fds -----------------------------------------------------------------------------


def _fd_by_id(cmd: BpfCmd, obj_id: int) -> int:
    return _bpf(cmd, _ObjIdAttr(id=obj_id))


def prog_fd_by_id(prog_id: int) -> int:
    return _fd_by_id(BpfCmd.PROG_GET_FD_BY_ID, prog_id)


def map_fd_by_id(map_id: int) -> int:
    return _fd_by_id(BpfCmd.MAP_GET_FD_BY_ID, map_id)


def link_fd_by_id(link_id: int) -> int:
    return _fd_by_id(BpfCmd.LINK_GET_FD_BY_ID, link_id)


def btf_fd_by_id(btf_id: int) -> int:
    return _fd_by_id(BpfCmd.BTF_GET_FD_BY_ID, btf_id)


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_prog(prog_id: int) -> contextlib.AbstractContextManager[int]:
    """`with open_prog(id) as fd:` a program fd, closed at the end of the block."""
    return _closing_fd(prog_fd_by_id(prog_id))


def open_map(map_id: int) -> contextlib.AbstractContextManager[int]:
    return _closing_fd(map_fd_by_id(map_id))


def open_link(link_id: int) -> contextlib.AbstractContextManager[int]:
    return _closing_fd(link_fd_by_id(link_id))


def open_btf(btf_id: int) -> contextlib.AbstractContextManager[int]:
    return _closing_fd(btf_fd_by_id(btf_id))


def _all_ids(cmd: BpfCmd) -> list[int]:
    ids: list[int] = []
    attr = _ObjIdAttr(id=0)
    while True:
        try:
            _bpf(cmd, attr)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return ids
            raise
        ids.append(attr.next_id)
        attr.id = attr.next_id


def list_prog_ids() -> list[int]:
    return _all_ids(BpfCmd.PROG_GET_NEXT_ID)


def list_map_ids() -> list[int]:
    return _all_ids(BpfCmd.MAP_GET_NEXT_ID)


def list_link_ids() -> list[int]:
    return _all_ids(BpfCmd.LINK_GET_NEXT_ID)


# --- BTF: full program names -----------------------------------------------------------------
#
# The kernel keeps 15 characters of a program's name; the full name is the name of the main
# function's BTF FUNC type (what bpftool prints). Only standalone BTF is parsed (tcprio.btf): the
# BTF a loader (BCC, libbpf, cilium/ebpf) hands to BPF_BTF_LOAD always is. Kernel BTF (vmlinux,
# modules; the latter split on top of vmlinux) is never read here.

_BTF_NAMES_CACHED = 1024  # BTF objects whose function names `btf_func_names` keeps


@dataclass(frozen=True)
class BtfInfo:
    id: int
    size: int  # bytes of raw BTF
    kernel_btf: bool  # vmlinux or a module's BTF
    data: bytes | None = None  # the raw BTF, when asked for


def _btf_info_struct(fd: int, data: ctypes.Array | None = None) -> _BtfInfoStruct:
    info = _BtfInfoStruct(btf=_address(data), btf_size=len(data) if data is not None else 0)
    _obj_info(fd, info)
    return info


def _btf_data(fd: int, size: int) -> bytes:
    """Second pass: the raw BTF, `size` bytes as the first pass reported."""
    buffer = ctypes.create_string_buffer(size)
    info = _btf_info_struct(fd, buffer)
    if info.btf_size != size:  # BTF is immutable: this cannot be the object first asked about
        raise BpfError(BpfCmd.OBJ_GET_INFO_BY_FD, errno.EAGAIN, f"BTF {info.id} changed size")
    return buffer.raw


def btf_info_from_fd(fd: int, with_data: bool = True) -> BtfInfo:
    """struct bpf_btf_info of a BTF fd; with its raw BTF (a second call) when `with_data`."""
    head = _btf_info_struct(fd)
    data = _btf_data(fd, head.btf_size) if with_data and head.btf_size else None
    return BtfInfo(id=head.id, size=head.btf_size, kernel_btf=bool(head.kernel_btf), data=data)


@functools.lru_cache(maxsize=_BTF_NAMES_CACHED)
def btf_func_names(btf_id: int) -> Mapping[int, str]:
    """The FUNC names of one BTF object by type id, read once per object: BTF never changes, and
    the kernel hands out BTF ids cyclically (no reuse before 2**31 objects). Empty for kernel BTF.
    Raises BpfError / ValueError; failures are not cached."""
    with open_btf(btf_id) as fd:
        head = _btf_info_struct(fd)
        if head.kernel_btf:
            return MappingProxyType({})
        raw = _btf_data(fd, head.btf_size)
    return MappingProxyType(parse_btf_func_names(raw))


def btf_func_name(btf_id: int, type_id: int) -> str | None:
    """The name of FUNC `type_id` in BTF object `btf_id`, or None when it cannot be read."""
    if not btf_id or not type_id:
        return None
    try:
        return btf_func_names(btf_id).get(type_id) or None
    except (OSError, ValueError, struct.error):
        return None


# --- programs --------------------------------------------------------------------------------


def decode_insns(raw: bytes) -> tuple[Instruction, ...]:
    """Split raw eBPF bytecode (8 bytes an instruction, little endian) into Instructions."""
    if len(raw) % _INSN_SIZE:
        raise ValueError(f"{len(raw)} bytes is not a whole number of eBPF instructions")
    return tuple(
        Instruction(code=code, dst=regs & 0x0F, src=regs >> 4, off=off, imm=imm)
        for code, regs, off, imm in struct.iter_unpack("<BBhi", raw)
    )


_FUNC_INFO = struct.Struct("=II")  # struct bpf_func_info: insn_off, type_id


@dataclass(frozen=True)
class _ProgDump:
    """The variable-length parts of a program's info: xlated bytes, map ids, func_info."""

    xlated: bytes | None
    map_ids: tuple[int, ...]
    error: str | None
    main_func_type_id: int = 0  # BTF type of the function at insn 0; 0 without func_info


def _prog_info_struct(fd: int) -> _ProgInfoStruct:
    info = _ProgInfoStruct()
    # A kernel with a shorter struct writes fewer bytes; the rest stays zero, which is what
    # the missing fields would have meant anyway.
    _obj_info(fd, info)
    return info


def _func_info_count(head: _ProgInfoStruct) -> int:
    """How many func_info records to ask for: all of them, when they can name a BTF type."""
    if not head.btf_id or head.func_info_rec_size < _FUNC_INFO.size:
        return 0
    return head.nr_func_info


def _main_func_type_id(records: bytes, rec_size: int, count: int) -> int:
    """type_id of the func_info record at insn_off 0: the main function's BTF FUNC type."""
    for index in range(count):
        insn_off, type_id = _FUNC_INFO.unpack_from(records, index * rec_size)
        if insn_off == 0:
            return type_id
    return 0


def _prog_dump_sized(
    fd: int, insns_len: int, map_count: int, func_count: int = 0, func_rec_size: int = 0
) -> _ProgDump:
    """Second pass: the same call with buffers for `insns_len` bytes, `map_count` ids and
    `func_count` func_info records of `func_rec_size` bytes (the size the first pass gave)."""
    for _ in range(3):  # BPF_PROG_BIND_MAP may add maps between two passes: retry if it grew
        if not insns_len and not map_count and not func_count:
            return _ProgDump(None, (), None)
        insns_buf = ctypes.create_string_buffer(insns_len) if insns_len else None
        ids_buf = (_u32 * map_count)() if map_count else None
        func_buf = ctypes.create_string_buffer(func_count * func_rec_size) if func_count else None
        info = _ProgInfoStruct(
            xlated_prog_len=insns_len,
            xlated_prog_insns=_address(insns_buf),
            nr_map_ids=map_count,
            map_ids=_address(ids_buf),
            func_info_rec_size=func_rec_size if func_count else 0,
            nr_func_info=func_count,
            func_info=_address(func_buf),
        )
        _obj_info(fd, info)
        if info.nr_map_ids > map_count:
            map_count = info.nr_map_ids
            continue
        map_ids = tuple(ids_buf[: info.nr_map_ids]) if ids_buf is not None else ()
        main_func = 0
        if func_buf is not None:
            main_func = _main_func_type_id(
                func_buf.raw, func_rec_size, min(func_count, info.nr_func_info)
            )
        if insns_buf is None:
            return _ProgDump(None, map_ids, None, main_func)
        if info.xlated_prog_insns == 0:
            # Constant-blinded program and a reader that may not see kernel addresses.
            hidden = "kernel hid the constant-blinded instructions"
            return _ProgDump(None, map_ids, hidden, main_func)
        return _ProgDump(insns_buf.raw[: info.xlated_prog_len], map_ids, None, main_func)
    raise BpfError(BpfCmd.OBJ_GET_INFO_BY_FD, errno.EAGAIN, "program's map ids kept changing")


def _prog_dump_with(fd: int, head: _ProgInfoStruct, with_insns: bool, func_count: int) -> _ProgDump:
    insns_len = head.xlated_prog_len if with_insns else 0
    sizes = (head.nr_map_ids, func_count, head.func_info_rec_size)
    try:
        return _prog_dump_sized(fd, insns_len, *sizes)
    except BpfError as exc:
        if exc.errno != errno.EPERM or not insns_len:
            raise
        without_insns = _prog_dump_sized(fd, 0, *sizes)
        error = f"kernel refused the translated instructions: {exc}"
        return _ProgDump(None, without_insns.map_ids, error, without_insns.main_func_type_id)


def _prog_dump(fd: int, head: _ProgInfoStruct, with_insns: bool) -> _ProgDump:
    func_count = _func_info_count(head)
    try:
        return _prog_dump_with(fd, head, with_insns, func_count)
    except BpfError:
        if not func_count:
            raise
        # func_info only serves the full name: it must never cost the rest. Again without it.
        return _prog_dump_with(fd, head, with_insns, 0)


def prog_info_from_fd(fd: int, with_insns: bool = True) -> ProgramInfo:
    """What the kernel says of the program behind `fd`, with its xlated instructions and its
    full name from BTF (None when the program has no BTF or it cannot be read)."""
    head = _prog_info_struct(fd)
    dump = _prog_dump(fd, head, with_insns)
    insns: tuple[Instruction, ...] | None = None
    error = dump.error
    if dump.xlated is not None:
        insns = decode_insns(dump.xlated)
    elif with_insns and error is None:
        error = "kernel reported no translated instructions (the reader lacks CAP_BPF)"
    return ProgramInfo(
        id=head.id,
        name=_decode_name(bytes(head.name)),
        tag=bytes(head.tag).hex(),
        type=head.type,
        type_name=prog_type_name(head.type),
        load_time_ns=head.load_time,
        map_ids=dump.map_ids,
        insns=insns,
        run_cnt=head.run_cnt,
        run_time_ns=head.run_time_ns,
        created_by_uid=head.created_by_uid,
        btf_id=head.btf_id,
        error=error if with_insns else None,
        full_name=btf_func_name(head.btf_id, dump.main_func_type_id),
    )


def prog_info(prog_id: int, with_insns: bool = True) -> ProgramInfo:
    with open_prog(prog_id) as fd:
        return prog_info_from_fd(fd, with_insns)


def prog_id_of_fd(fd: int) -> int:
    return _prog_info_struct(fd).id


def prog_xlated_bytes(prog_id: int) -> bytes | None:
    """The raw xlated image (what `bpftool prog dump xlated ... file` writes), or None if hidden."""
    with open_prog(prog_id) as fd:
        return _prog_dump(fd, _prog_info_struct(fd), with_insns=True).xlated


def main_func_btf_id(prog_fd: int) -> int:
    """The BTF type id of a program's main function, the FUNC at insn 0 (what fexit on the
    program attaches to). BpfError ENOENT when the program has no BTF or no such function."""
    head = _prog_info_struct(prog_fd)
    func_count = _func_info_count(head)
    if not func_count:
        raise BpfError(BpfCmd.OBJ_GET_INFO_BY_FD, errno.ENOENT, f"program {head.id} has no BTF")
    type_id = _prog_dump_with(prog_fd, head, False, func_count).main_func_type_id
    if not type_id:
        raise BpfError(
            BpfCmd.OBJ_GET_INFO_BY_FD, errno.ENOENT, f"program {head.id}: no main function"
        )
    return type_id


# --- maps ------------------------------------------------------------------------------------


def _prog_array_slots(map_fd: int, max_entries: int) -> dict[int, int]:
    """slot -> program id of a prog array. Prog arrays have no batch lookup (ENOTSUPP), so this
    is one syscall a slot: about 1.5 us each here, 0.1 s for 65,536 slots."""
    key = _u32()
    value = _u32()
    attr = _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    # Arguments converted once: the call without argtypes is about 20% faster in this loop.
    args = (
        ctypes.c_long(_NR_BPF),
        ctypes.c_long(BpfCmd.MAP_LOOKUP_ELEM),
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.c_ulong(ctypes.sizeof(attr)),
    )
    slots: dict[int, int] = {}
    for slot in range(max_entries):
        key.value = slot
        if _raw_syscall(*args) == 0:
            slots[slot] = value.value
            continue
        err = ctypes.get_errno()
        if err != errno.ENOENT:
            raise BpfError(BpfCmd.MAP_LOOKUP_ELEM, err, f"prog array slot {slot}")
    return slots


def map_info_from_fd(fd: int) -> MapInfo:
    info = _MapInfoStruct()
    _obj_info(fd, info)
    prog_array = None
    if info.type == BPF_MAP_TYPE_PROG_ARRAY:
        prog_array = _prog_array_slots(fd, info.max_entries)
    return MapInfo(
        id=info.id,
        type=info.type,
        type_name=map_type_name(info.type),
        name=_decode_name(bytes(info.name)),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        prog_array=prog_array,
    )


def map_info(map_id: int) -> MapInfo:
    with open_map(map_id) as fd:
        return map_info_from_fd(fd)


# --- links and tcx ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    type_name: str
    prog_id: int
    ifindex: int | None = None  # tcx links only
    attach_type: int | None = None  # tcx links only


def link_info_from_fd(fd: int) -> LinkInfo:
    info = _LinkInfoStruct()
    _obj_info(fd, info)
    is_tcx = info.type == BPF_LINK_TYPE_TCX
    return LinkInfo(
        id=info.id,
        type=info.type,
        type_name=link_type_name(info.type),
        prog_id=info.prog_id,
        ifindex=info.union_u32_0 if is_tcx else None,
        attach_type=info.union_u32_1 if is_tcx else None,
    )


def link_info(link_id: int) -> LinkInfo:
    with open_link(link_id) as fd:
        return link_info_from_fd(fd)


def _tcx_query_once(
    ifindex: int, attach_type: int, capacity: int
) -> tuple[_QueryAttr, list[tuple[int, int]]]:
    prog_ids = (_u32 * capacity)()
    link_ids = (_u32 * capacity)()
    attr = _QueryAttr(
        target_ifindex=ifindex,
        attach_type=attach_type,
        prog_ids=_address(prog_ids) if capacity else 0,
        prog_cnt=capacity,
        link_ids=_address(link_ids) if capacity else 0,
    )
    try:
        _bpf(BpfCmd.PROG_QUERY, attr)
    except BpfError as exc:
        if exc.errno == errno.EINVAL:
            raise TcxUnsupported(BpfCmd.PROG_QUERY, exc.errno, "no tcx in this kernel") from exc
        if exc.errno != errno.ENOSPC:  # ENOSPC: the chain grew since we sized the arrays
            raise
    entries = list(zip(prog_ids[: attr.prog_cnt], link_ids[: attr.prog_cnt], strict=True))
    return attr, entries


def tcx_query(ifindex: int, direction: Direction) -> tuple[TcxEntry, ...]:
    """The tcx chain of one hook, in execution order. `ifindex` is looked up in the calling
    thread's network namespace: enter the namespace first."""
    attach_type = TCX_ATTACH_TYPE[direction]
    capacity = 0
    for _ in range(5):
        attr, entries = _tcx_query_once(ifindex, attach_type, capacity)
        if attr.prog_cnt <= capacity or attr.prog_cnt == 0:
            return tuple(
                TcxEntry(prog_id=prog_id, position=position, link_id=link_id or None)
                for position, (prog_id, link_id) in enumerate(entries)
            )
        capacity = attr.prog_cnt + 4  # a little room in case more programs arrive meanwhile
    raise BpfError(BpfCmd.PROG_QUERY, errno.EAGAIN, f"tcx chain of ifindex {ifindex} kept growing")


def tcx_attach(prog_fd: int, ifindex: int, direction: Direction) -> int:
    """Append a sched_cls program to a tcx chain; returns the link fd (closing it detaches)."""
    attr = _LinkCreateAttr(
        prog_fd=prog_fd, target_ifindex=ifindex, attach_type=TCX_ATTACH_TYPE[direction]
    )
    return _bpf(BpfCmd.LINK_CREATE, attr)


def tracing_attach(prog_fd: int, attach_type: int = BPF_TRACE_FEXIT) -> int:
    """Attach a loaded tracing program where its load aimed it; returns the link fd."""
    return _bpf(BpfCmd.LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, attach_type=attach_type))


# --- running programs ------------------------------------------------------------------------


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None) -> int:
    """Run the program on `data` (a whole packet for sched_cls), with `ctx` as its context
    (a struct __sk_buff: the kernel lets mark, priority and cb[] be set); its return value,
    signed."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 4096)  # room for a packet that grew
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    attr = _TestRunAttr(
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
        _bpf(BpfCmd.PROG_TEST_RUN, attr)
    except BpfError as exc:
        if exc.errno != errno.ENOSPC:  # output larger than our buffer: retval is still set
            raise
    return ctypes.c_int32(attr.retval).value


def prog_array_create(slots: int) -> int:
    """A new prog array (tail-call table) of `slots` entries; its fd. For tests and the
    self-test only: the scan and the daemon never create anything."""
    attr = _MapCreateAttr(
        map_type=BPF_MAP_TYPE_PROG_ARRAY, key_size=4, value_size=4, max_entries=slots
    )
    return _bpf(BpfCmd.MAP_CREATE, attr)


def prog_array_set(map_fd: int, slot: int, prog_fd: int) -> None:
    """Put program `prog_fd` in slot `slot` of a prog array made by `prog_array_create`."""
    key, value = _u32(slot), _u32(prog_fd)
    attr = _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    _bpf(BpfCmd.MAP_UPDATE_ELEM, attr)


def enable_run_stats() -> int:
    """An fd that makes every program count run_cnt / run_time_ns until it is closed."""
    return _bpf(BpfCmd.ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))


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


def _load(attr: _ProgLoadAttr) -> tuple[int, int]:
    """(fd, 0) on success, (-1, errno) on failure."""
    ret = _syscall(_NR_BPF, BpfCmd.PROG_LOAD, ctypes.addressof(attr), ctypes.sizeof(attr))
    return (ret, 0) if ret >= 0 else (-1, ctypes.get_errno())


def _prog_load_attr(
    prog_type: int, insns: bytes, name: str, license: str, **fields: int
) -> tuple[_ProgLoadAttr, tuple[ctypes.Array, ...]]:
    """The attr that loads `insns`, and the buffers it points into (keep them alive)."""
    insns_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // _INSN_SIZE,
        insns=ctypes.addressof(insns_buf),
        license=ctypes.addressof(license_buf),
        prog_name=name.encode()[: _BPF_OBJ_NAME_LEN - 1],
        **fields,
    )
    return attr, (insns_buf, license_buf)


def prog_load_raw(prog_type: int, insns: bytes, name: str, license: str = "GPL") -> int:
    """Load raw eBPF bytecode; returns the program fd. On failure the BpfError carries the
    verifier log's last lines (the load is retried with a log only when it failed)."""
    if not insns or len(insns) % _INSN_SIZE:
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


# --- kernel helper names ---------------------------------------------------------------------

# A text symbol that `may_be_helper` keeps; a module's symbol ends with "\t[module]".
_HELPER_SYMBOL = re.compile(r"([0-9a-f]{16}) [tT] ((?:__)?bpf_\S*|\S*_elem|\S*_map_\S*)(?:\t|$)")
_CALL_BASE = re.compile(r"^([0-9a-f]{16}) \w __bpf_call_base$", re.MULTILINE)
_IMM_RANGE = 1 << 31


def load_helper_symbols(path: str = "/proc/kallsyms") -> dict[int, str]:
    """{call imm: kernel function name} for every text symbol a helper call's imm can reach
    (imm = address - __bpf_call_base, signed 32 bits). {} when kallsyms hides addresses."""
    with open(path, "rb") as f:
        text = f.read().decode("ascii", "replace")
    base_match = _CALL_BASE.search(text)
    base = int(base_match.group(1), 16) if base_match else 0
    if base == 0:
        return {}
    # filter while matching: a list of all ~120,000 symbols would cost ~25 MiB for a moment
    # A substring test first: running the regex over all ~120,000 lines costs twice as much.
    # "[bpf]" lines are JIT-ed programs (bpf_prog_<tag>_<name>): never a helper, and they come
    # and go with every program load.
    lines = [
        ln
        for ln in text.split("\n")
        if ("bpf_" in ln or "_elem" in ln or "_map_" in ln) and not ln.endswith("\t[bpf]")
    ]
    symbols = [m.groups() for m in map(_HELPER_SYMBOL.match, lines) if m is not None]
    # One bulk hex decode instead of 120,000 int(x, 16) calls: about twice as fast.
    addresses = array("Q", binascii.unhexlify("".join(address for address, _ in symbols)))
    if sys.byteorder == "little":
        addresses.byteswap()
    low, high = base - _IMM_RANGE, base + _IMM_RANGE
    # Walk backwards so that the first name kallsyms lists for an address wins.
    return {
        address - base: name
        for address, (_, name) in zip(reversed(addresses), reversed(symbols), strict=True)
        if low <= address < high
    }


def may_be_helper(name: str) -> bool:
    """Helper implementations (bpf_*) and the map operations the verifier calls directly.

    Keeping only these holds a few thousand names instead of all ~120,000 kernel functions
    (~34 MiB in a long-running daemon). A helper left out is only less precisely known: the
    analysis treats an unnamed helper as any other unknown call.
    """
    return name.startswith(("bpf_", "__bpf_")) or name.endswith("_elem") or "_map_" in name


@functools.cache
def helper_symbols() -> dict[int, str]:
    """`load_helper_symbols()` of this machine, read once per process, and kept across
    processes until the next reboot or module change (`helper_cache`)."""
    from tcprio.kernel import helper_cache

    fingerprint = helper_cache.kernel_fingerprint()
    if fingerprint is None:
        return load_helper_symbols()
    cached = helper_cache.read_cache(fingerprint)
    if cached is not None:
        return cached
    helpers = load_helper_symbols()
    if helpers:  # {} means kallsyms hid the addresses: try again next time
        helper_cache.write_cache(fingerprint, helpers)
    return helpers


def helper_name(imm: int) -> str | None:
    """The kernel function a helper call's imm points at, when kallsyms shows it."""
    return helper_symbols().get(imm)
