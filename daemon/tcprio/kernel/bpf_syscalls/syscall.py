"""The bpf(2) syscall itself: command numbers, constants and type names, `BpfError`, the
`union bpf_attr` structures, and object ids and fds (`*_fd_by_id`, `open_*`, `list_*_ids`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from enum import IntEnum

from tcprio.model import Direction

_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
BPF_OBJ_NAME_LEN = 16
INSN_SIZE = 8


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
    BTF_LOAD = 18
    BTF_GET_FD_BY_ID = 19
    BTF_GET_NEXT_ID = 23
    LINK_CREATE = 28
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    ENABLE_STATS = 32

    def __str__(self) -> str:
        return f"BPF_{self.name}"


BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SCHED_ACT = 4
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_EXT = 28  # freplace: replaces a global function of another program
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_LINK_TYPE_TRACING = 2  # fentry, fexit and freplace links
BPF_LINK_TYPE_TCX = 11
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_NETKIT = 13
BPF_NETKIT_PRIMARY = 54  # attach types of a netkit pair's chains, both on the primary's ifindex
BPF_NETKIT_PEER = 55
BPF_PROG_TYPE_XDP = 6
BPF_LINK_TYPE_XDP = 6  # its info names the device by ifindex (in the union, like tcx)
BPF_XDP = 37  # the attach type of an XDP link (BPF_LINK_CREATE with XDP_FLAGS_* in flags)
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
libc_syscall = _libc.syscall
libc_syscall.restype = ctypes.c_long
libc_syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong)
# A second handle, without argtypes, for pre-converted arguments.
libc_syscall_raw = _libc["syscall"]
libc_syscall_raw.restype = ctypes.c_long


def _bpf_syscall_nr() -> int:
    machine = platform.machine()
    if machine not in _BPF_SYSCALL_NR:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {machine}")
    return _BPF_SYSCALL_NR[machine]


NR_BPF = _bpf_syscall_nr()


def bpf(cmd: BpfCmd, attr: ctypes.Structure) -> int:
    """Call bpf(cmd, &attr, sizeof attr); the kernel treats the bytes past attr as zero."""
    ret = libc_syscall(NR_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(cmd, ctypes.get_errno())
    return ret


def address(buffer: ctypes.Array | None) -> int:
    return ctypes.addressof(buffer) if buffer is not None else 0


# --- union bpf_attr, one structure per command -----------------------------------------------

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class _ObjIdAttr(ctypes.Structure):
    """BPF_*_GET_FD_BY_ID and BPF_*_GET_NEXT_ID."""

    _fields_ = (("id", u32), ("next_id", u32), ("open_flags", u32))


class _InfoByFdAttr(ctypes.Structure):
    _fields_ = (("bpf_fd", u32), ("info_len", u32), ("info", u64))


class MapElemAttr(ctypes.Structure):
    _fields_ = (("map_fd", u32), ("pad", u32), ("key", u64), ("value", u64), ("flags", u64))


class MapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", u32),
        ("key_size", u32),
        ("value_size", u32),
        ("max_entries", u32),
        ("map_flags", u32),
    )


class QueryAttr(ctypes.Structure):
    """The `query` member, with the link fields of kernel >= 6.6 (`prog_cnt` is also `count`)."""

    _fields_ = (
        ("target_ifindex", u32),
        ("attach_type", u32),
        ("query_flags", u32),
        ("attach_flags", u32),
        ("prog_ids", u64),
        ("prog_cnt", u32),
        ("pad", u32),
        ("prog_attach_flags", u64),
        ("link_ids", u64),
        ("link_attach_flags", u64),
        ("revision", u64),
    )


class LinkCreateAttr(ctypes.Structure):
    """The `link_create` member with its tcx part (relative_fd / expected_revision). A tracing
    link's part (target_btf_id, cookie) has the same size; tcprio leaves it zero."""

    _fields_ = (
        ("prog_fd", u32),
        ("target_ifindex", u32),
        ("attach_type", u32),
        ("flags", u32),
        ("relative_fd", u32),
        ("pad", u32),
        ("expected_revision", u64),
    )


class TestRunAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", u32),
        ("retval", u32),
        ("data_size_in", u32),
        ("data_size_out", u32),
        ("data_in", u64),
        ("data_out", u64),
        ("repeat", u32),
        ("duration", u32),
        ("ctx_size_in", u32),
        ("ctx_size_out", u32),
        ("ctx_in", u64),
        ("ctx_out", u64),
        ("flags", u32),
        ("cpu", u32),
        ("batch_size", u32),
        ("pad", u32),
    )


class EnableStatsAttr(ctypes.Structure):
    _fields_ = (("type", u32),)


class ProgLoadAttr(ctypes.Structure):
    """The `prog_load` member up to attach_prog_fd (tracing programs: their target)."""

    _fields_ = (
        ("prog_type", u32),
        ("insn_cnt", u32),
        ("insns", u64),
        ("license", u64),
        ("log_level", u32),
        ("log_size", u32),
        ("log_buf", u64),
        ("kern_version", u32),
        ("prog_flags", u32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", u32),
        ("expected_attach_type", u32),
        ("prog_btf_fd", u32),
        ("func_info_rec_size", u32),
        ("func_info", u64),
        ("func_info_cnt", u32),
        ("line_info_rec_size", u32),
        ("line_info", u64),
        ("line_info_cnt", u32),
        ("attach_btf_id", u32),
        ("attach_prog_fd", u32),
    )


# --- object info -----------------------------------------------------------------------------


def obj_info(fd: int, info: ctypes.Structure) -> int:
    """Fill `info` from BPF_OBJ_GET_INFO_BY_FD; returns how many bytes the kernel wrote."""
    attr = _InfoByFdAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BpfCmd.OBJ_GET_INFO_BY_FD, attr)
    return attr.info_len


# --- ids and fds -----------------------------------------------------------------------------


def _fd_by_id(cmd: BpfCmd, obj_id: int) -> int:
    return bpf(cmd, _ObjIdAttr(id=obj_id))


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


def _all_ids(cmd: BpfCmd, after: int = 0) -> list[int]:
    ids: list[int] = []
    attr = _ObjIdAttr(id=after)
    while True:
        try:
            bpf(cmd, attr)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return ids
            raise
        ids.append(attr.next_id)
        attr.id = attr.next_id


def list_prog_ids() -> list[int]:
    return _all_ids(BpfCmd.PROG_GET_NEXT_ID)


def prog_ids_after(after: int) -> list[int]:
    """The ids of the programs loaded after program `after`: the kernel hands out program ids
    in increasing order (cyclically, past 2**31 only), so with no new program this is one
    syscall."""
    return _all_ids(BpfCmd.PROG_GET_NEXT_ID, after)


def list_map_ids() -> list[int]:
    return _all_ids(BpfCmd.MAP_GET_NEXT_ID)


def list_link_ids() -> list[int]:
    return _all_ids(BpfCmd.LINK_GET_NEXT_ID)


def link_ids_after(after: int) -> list[int]:
    """The ids of the links made after link `after` (ids increase like program ids): one
    syscall when there is none."""
    return _all_ids(BpfCmd.LINK_GET_NEXT_ID, after)


def list_btf_ids() -> list[int]:
    return _all_ids(BpfCmd.BTF_GET_NEXT_ID)
