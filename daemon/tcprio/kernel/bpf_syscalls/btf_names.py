"""BTF objects of the kernel, and the full names of programs read from them."""

from __future__ import annotations

import ctypes
import errno
import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tcprio.kernel.bpf_syscalls.syscall import (
    BpfCmd,
    BpfError,
    address,
    list_btf_ids,
    obj_info,
    open_btf,
    u32,
    u64,
)
from tcprio.kernel.btf import parse_btf_func_names


class _BtfInfoStruct(ctypes.Structure):
    """struct bpf_btf_info (32 bytes on kernel 6.18)."""

    _fields_ = (
        ("btf", u64),
        ("btf_size", u32),
        ("id", u32),
        ("name", u64),
        ("name_len", u32),
        ("kernel_btf", u32),
    )


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
    info = _BtfInfoStruct(btf=address(data), btf_size=len(data) if data is not None else 0)
    obj_info(fd, info)
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


def _kernel_btf_name(fd: int) -> str | None:
    """The name of a kernel BTF object ("vmlinux" or the module's), None for a loader's BTF."""
    name = ctypes.create_string_buffer(64)
    info = _BtfInfoStruct(name=address(name), name_len=len(name))
    obj_info(fd, info)
    return name.value.decode("utf-8", "replace") if info.kernel_btf else None


def module_btf_id(module: str) -> int | None:
    """The id of a loaded kernel module's BTF object (named after the module), else None."""
    for btf_id in list_btf_ids():
        try:
            with open_btf(btf_id) as fd:
                if _kernel_btf_name(fd) == module:
                    return btf_id
        except BpfError:  # freed since listed
            continue
    return None


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
