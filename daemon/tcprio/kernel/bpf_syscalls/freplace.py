"""freplace links: BPF_PROG_TYPE_EXT programs running instead of a global function of another
program.

An EXT program is loaded against a target program and one of its global (BTF) functions, and
attached with an freplace link (BPF_LINK_CREATE, attach type 0, target fd and the function's BTF
id). From then on a call to that function (or the program itself, when the replaced function is
its main one) runs the EXT program, while the target's translated image still shows the original
instructions. The kernel lists such a link as a tracing link (BPF_LINK_TYPE_TRACING) whose
`tracing.target_obj_id` is the target program's id and `tracing.target_btf_id` the function's
BTF type id; the target's func_info ({insn_off, type_id} a function) says where that function
starts in the translated image (the verifier rewrites insn_off as it patches the program).
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass

from tcprio.kernel.bpf_syscalls.objects import ProgInfoStruct
from tcprio.kernel.bpf_syscalls.syscall import (
    BPF_LINK_TYPE_TRACING,
    BPF_PROG_TYPE_EXT,
    BpfError,
    list_link_ids,
    obj_info,
    open_link,
    open_prog,
    u32,
    u64,
)


class _TracingLinkInfo(ctypes.Structure):
    """struct bpf_link_info with its `tracing` member (kernel 6.6+ adds the cookie), padded to
    the union's size."""

    _fields_ = (
        ("type", u32),
        ("id", u32),
        ("prog_id", u32),
        ("pad", u32),
        ("attach_type", u32),
        ("target_obj_id", u32),  # the target program's id for an EXT program's link
        ("target_btf_id", u32),  # the replaced function's BTF type id
        ("pad2", u32),
        ("cookie", u64),
        ("rest", ctypes.c_uint8 * 80),
    )


@dataclass(frozen=True)
class FreplaceLink:
    link_id: int
    ext_prog_id: int
    target_prog_id: int
    target_btf_id: int


@dataclass(frozen=True)
class FreplaceLinks:
    links: tuple[FreplaceLink, ...]
    errors: tuple[str, ...] = ()  # links that could not be read (not those that vanished)


def _prog_type(prog_id: int) -> int:
    info = ProgInfoStruct()
    with open_prog(prog_id) as fd:
        obj_info(fd, info)
    return info.type


def _read_link(link_id: int) -> FreplaceLink | None:
    """The freplace link `link_id`, None for any other link. BpfError when it cannot be read."""
    info = _TracingLinkInfo()
    with open_link(link_id) as fd:
        obj_info(fd, info)
    if info.type != BPF_LINK_TYPE_TRACING or not info.target_obj_id:
        return None
    # fentry / fexit links on a program look the same: only the program's type tells.
    if _prog_type(info.prog_id) != BPF_PROG_TYPE_EXT:
        return None
    return FreplaceLink(link_id, info.prog_id, info.target_obj_id, info.target_btf_id)


def freplace_links() -> FreplaceLinks:
    """Every freplace link of the node (link ids are global: no namespace needed). One
    GET_FD_BY_ID and one info call a link, two more for a tracing link."""
    links: list[FreplaceLink] = []
    errors: list[str] = []
    for link_id in list_link_ids():
        try:
            link = _read_link(link_id)
        except BpfError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the link (or its program) went away
                errors.append(f"link {link_id} could not be read: {exc}")
            continue
        if link is not None:
            links.append(link)
    return FreplaceLinks(tuple(links), tuple(errors))


_FUNC_INFO = struct.Struct("=II")  # struct bpf_func_info: insn_off, type_id


def func_starts(prog_id: int) -> dict[int, int]:
    """BTF type id -> first instruction (in the translated image) of each function of a
    program, from its func_info; empty without BTF. BpfError when it cannot be read."""
    with open_prog(prog_id) as fd:
        head = ProgInfoStruct()
        obj_info(fd, head)
        count, size = head.nr_func_info, head.func_info_rec_size
        if not count or size < _FUNC_INFO.size:
            return {}
        records = ctypes.create_string_buffer(count * size)
        info = ProgInfoStruct(
            nr_func_info=count, func_info_rec_size=size, func_info=ctypes.addressof(records)
        )
        obj_info(fd, info)
    count = min(count, info.nr_func_info)
    starts: dict[int, int] = {}
    for index in range(count):
        insn_off, type_id = _FUNC_INFO.unpack_from(records.raw, index * size)
        starts.setdefault(type_id, insn_off)
    return starts


def replaced_functions(
    target_prog_id: int, links: tuple[FreplaceLink, ...]
) -> tuple[tuple[int, int], ...]:
    """(first instruction of the replaced function, EXT program id) for each of `links` aimed
    at `target_prog_id`, sorted; -1 for a function its func_info does not place (or when the
    func_info cannot be read: the analysis must then not trust any function of it)."""
    aimed = [link for link in links if link.target_prog_id == target_prog_id]
    if not aimed:
        return ()
    try:
        starts = func_starts(target_prog_id)
    except BpfError:
        starts = {}
    return tuple(sorted((starts.get(link.target_btf_id, -1), link.ext_prog_id) for link in aimed))
