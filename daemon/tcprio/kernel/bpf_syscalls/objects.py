"""What the kernel says of programs, maps and links: info structures and their readers.

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

import ctypes
import errno
import struct
from dataclasses import dataclass

from tcprio.kernel.bpf_syscalls.btf_names import btf_func_name
from tcprio.kernel.bpf_syscalls.syscall import (
    BPF_LINK_TYPE_TCX,
    BPF_LINK_TYPE_XDP,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_OBJ_NAME_LEN,
    INSN_SIZE,
    NR_BPF,
    BpfCmd,
    BpfError,
    MapElemAttr,
    address,
    libc_syscall_raw,
    link_type_name,
    map_type_name,
    obj_info,
    open_link,
    open_map,
    open_prog,
    prog_type_name,
    u32,
    u64,
)
from tcprio.model import Instruction, MapInfo, ProgramInfo, RawInstructions

# --- info structures -------------------------------------------------------------------------


class ProgInfoStruct(ctypes.Structure):
    """struct bpf_prog_info, 232 bytes, unchanged from kernel 5.16 to 6.18."""

    _fields_ = (
        ("type", u32),
        ("id", u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", u32),
        ("xlated_prog_len", u32),
        ("jited_prog_insns", u64),
        ("xlated_prog_insns", u64),
        ("load_time", u64),
        ("created_by_uid", u32),
        ("nr_map_ids", u32),
        ("map_ids", u64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", u32),
        ("gpl_compatible", u32),  # bit 0; the other 31 bits are padding
        ("netns_dev", u64),
        ("netns_ino", u64),
        ("nr_jited_ksyms", u32),
        ("nr_jited_func_lens", u32),
        ("jited_ksyms", u64),
        ("jited_func_lens", u64),
        ("btf_id", u32),
        ("func_info_rec_size", u32),
        ("func_info", u64),
        ("nr_func_info", u32),
        ("nr_line_info", u32),
        ("line_info", u64),
        ("jited_line_info", u64),
        ("nr_jited_line_info", u32),
        ("line_info_rec_size", u32),
        ("jited_line_info_rec_size", u32),
        ("nr_prog_tags", u32),
        ("prog_tags", u64),
        ("run_time_ns", u64),
        ("run_cnt", u64),
        ("recursion_misses", u64),
        ("verified_insns", u32),
        ("attach_btf_obj_id", u32),
        ("attach_btf_id", u32),
        ("pad", u32),
    )


class MapInfoStruct(ctypes.Structure):
    """struct bpf_map_info (88 bytes on kernel 6.18)."""

    _fields_ = (
        ("type", u32),
        ("id", u32),
        ("key_size", u32),
        ("value_size", u32),
        ("max_entries", u32),
        ("map_flags", u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", u32),
        ("btf_vmlinux_value_type_id", u32),
        ("netns_dev", u64),
        ("netns_ino", u64),
        ("btf_id", u32),
        ("btf_key_type_id", u32),
        ("btf_value_type_id", u32),
        ("btf_vmlinux_id", u32),
        ("map_extra", u64),
    )


class _LinkInfoStruct(ctypes.Structure):
    """struct bpf_link_info: a common head, then a per-type union (tcx: ifindex, attach_type)."""

    _fields_ = (
        ("type", u32),
        ("id", u32),
        ("prog_id", u32),
        ("pad", u32),
        ("union_u32_0", u32),
        ("union_u32_1", u32),
        ("union_rest", ctypes.c_uint8 * 96),
    )


def _decode_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# --- programs --------------------------------------------------------------------------------


def decode_insns(raw: bytes) -> tuple[Instruction, ...]:
    """Split raw eBPF bytecode (8 bytes an instruction, little endian) into Instructions."""
    if len(raw) % INSN_SIZE:
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


def _prog_info_struct(fd: int) -> ProgInfoStruct:
    info = ProgInfoStruct()
    # A kernel with a shorter struct writes fewer bytes; the rest stays zero, which is what
    # the missing fields would have meant anyway.
    obj_info(fd, info)
    return info


def _func_info_count(head: ProgInfoStruct) -> int:
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
        ids_buf = (u32 * map_count)() if map_count else None
        func_buf = ctypes.create_string_buffer(func_count * func_rec_size) if func_count else None
        info = ProgInfoStruct(
            xlated_prog_len=insns_len,
            xlated_prog_insns=address(insns_buf),
            nr_map_ids=map_count,
            map_ids=address(ids_buf),
            func_info_rec_size=func_rec_size if func_count else 0,
            nr_func_info=func_count,
            func_info=address(func_buf),
        )
        obj_info(fd, info)
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


def _prog_dump_with(fd: int, head: ProgInfoStruct, with_insns: bool, func_count: int) -> _ProgDump:
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


def _prog_dump(fd: int, head: ProgInfoStruct, with_insns: bool) -> _ProgDump:
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
    insns: RawInstructions | None = None
    error = dump.error
    if dump.xlated is not None:
        insns = RawInstructions(dump.xlated)
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


def prog_type(prog_id: int) -> int:
    """The program's type (BPF_PROG_TYPE_*): two syscalls, no instructions, no BTF."""
    with open_prog(prog_id) as fd:
        return _prog_info_struct(fd).type


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
    key = u32()
    value = u32()
    attr = MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    # Arguments converted once: the call without argtypes is about 20% faster in this loop.
    args = (
        ctypes.c_long(NR_BPF),
        ctypes.c_long(BpfCmd.MAP_LOOKUP_ELEM),
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.c_ulong(ctypes.sizeof(attr)),
    )
    slots: dict[int, int] = {}
    for slot in range(max_entries):
        key.value = slot
        if libc_syscall_raw(*args) == 0:
            slots[slot] = value.value
            continue
        err = ctypes.get_errno()
        if err != errno.ENOENT:
            raise BpfError(BpfCmd.MAP_LOOKUP_ELEM, err, f"prog array slot {slot}")
    return slots


# Prog-array slots read at most (one syscall each: about 0.4 s): a prog array can have
# millions. The slots beyond are reported as not read, and a tail call that may reach them
# makes the verdict unknown.
PROG_ARRAY_READ_LIMIT = 1 << 18


def map_info_from_fd(fd: int, read_limit: int = PROG_ARRAY_READ_LIMIT) -> MapInfo:
    info = MapInfoStruct()
    obj_info(fd, info)
    prog_array = None
    read = None
    if info.type == BPF_MAP_TYPE_PROG_ARRAY:
        read = min(info.max_entries, read_limit)
        prog_array = _prog_array_slots(fd, read)
    return MapInfo(
        id=info.id,
        type=info.type,
        type_name=map_type_name(info.type),
        name=_decode_name(bytes(info.name)),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        prog_array=prog_array,
        prog_array_read=read if read is not None and read < info.max_entries else None,
    )


def map_info(map_id: int) -> MapInfo:
    with open_map(map_id) as fd:
        return map_info_from_fd(fd)


# --- links -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    type_name: str
    prog_id: int
    ifindex: int | None = None  # tcx and XDP links only
    attach_type: int | None = None  # tcx links only


def link_info_from_fd(fd: int) -> LinkInfo:
    info = _LinkInfoStruct()
    obj_info(fd, info)
    is_tcx = info.type == BPF_LINK_TYPE_TCX
    return LinkInfo(
        id=info.id,
        type=info.type,
        type_name=link_type_name(info.type),
        prog_id=info.prog_id,
        ifindex=info.union_u32_0 if is_tcx or info.type == BPF_LINK_TYPE_XDP else None,
        attach_type=info.union_u32_1 if is_tcx else None,
    )


def link_info(link_id: int) -> LinkInfo:
    with open_link(link_id) as fd:
        return link_info_from_fd(fd)
