"""Raw BTF (BPF Type Format) read with `struct` alone: no libbpf, no bpftool.

One parser for both uses in tcprio:
- the FUNC names of a program's BTF (`parse_btf_func_names`; bpf_syscalls reads the bytes from
  the kernel), which give a program its full name;
- the byte offsets of kernel structure members in /sys/kernel/btf/vmlinux (`Btf.byte_offset`),
  which the live verdict probe compiles in, and where a tc program's skb->cb[] lies
  (`running_kernel_skb_cb_area`), which the verdict analysis models.

Standalone BTF is understood (the BTF a loader hands to BPF_BTF_LOAD, and vmlinux); of a module's
BTF, which is split on top of vmlinux's (/sys/kernel/btf/<module>), only its FUNC ids are read
(`split_func_id`: what fexit on a module function needs). Malformed data raises ValueError, and
only ValueError; a type or member that is not there raises `BtfLookupError`.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("=HBBIIIII")  # magic version flags hdr_len type_off/len str_off/len
_TYPE = struct.Struct("=III")  # struct btf_type: name_off, info, size / type
_MEMBER = struct.Struct("=III")  # struct btf_member: name_off, type, offset

KIND_STRUCT, KIND_UNION, KIND_FUNC = 4, 5, 12
# typedef, volatile, const, restrict, type_tag: skipped on the way to the type they qualify.
_KIND_MODIFIERS = frozenset({8, 9, 10, 11, 18})

# Bytes after struct btf_type, by kind: (fixed, per vlen member). FUNC's vlen is its linkage.
_KIND_TRAILER: tuple[tuple[int, int], ...] = (
    (0, 0), (4, 0), (0, 0), (12, 0), (0, 12), (0, 12), (0, 8), (0, 0),  # UNKN INT PTR ARRAY ...
    (0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 8), (4, 0), (0, 12),  # TYPEDEF ... VAR DATASEC
    (0, 0), (4, 0), (0, 0), (0, 12),  # FLOAT DECL_TAG TYPE_TAG ENUM64
)  # fmt: skip

_MAX_DEPTH = 32  # modifiers in a row / anonymous members nested (libbpf's MAX_RESOLVE_DEPTH)
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
SKB_CB_BYTES = 20  # struct __sk_buff's cb[5]


class BtfLookupError(LookupError):
    """The BTF is well formed but lacks the type or member asked for."""


@dataclass(frozen=True)
class Member:
    """A struct or union member; `bit_offset` counts from the start of the outermost struct
    asked about (`Btf.field`) or of its own struct (`Btf.member`)."""

    bit_offset: int
    bit_size: int  # 0: not a bitfield
    type_id: int


def _sections(raw: bytes) -> tuple[memoryview, bytes]:
    """(type section, string section) of standalone raw BTF."""
    if len(raw) < _HEADER.size:
        raise ValueError(f"{len(raw)} bytes is too short for a BTF header")
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
        raw
    )
    if magic != BTF_MAGIC:
        raise ValueError(f"bad BTF magic {magic:#06x}")
    types = memoryview(raw)[hdr_len + type_off : hdr_len + type_off + type_len]
    strings = bytes(raw[hdr_len + str_off : hdr_len + str_off + str_len])
    if hdr_len < _HEADER.size or len(types) != type_len or len(strings) != str_len:
        raise ValueError("BTF sections lie outside the data")
    return types, strings


def _walk(types: memoryview) -> tuple[array, list[int]]:
    """(offset of each type in the section, indexed by type id; the ids of the FUNC types).
    Ids count from 1 in the order of the section; id 0 is void and has offset 0."""
    offsets = array("I", [0])
    funcs: list[int] = []
    unpack, trailers, end = _TYPE.unpack_from, _KIND_TRAILER, len(types)
    offset, type_id = 0, 1
    while offset < end:
        if offset + _TYPE.size > end:
            raise ValueError(f"BTF type {type_id} is cut off")
        _, info, _ = unpack(types, offset)
        kind = (info >> 24) & 0x1F
        if kind == 0 or kind >= len(trailers):
            raise ValueError(f"BTF type {type_id} has unknown kind {kind}")
        if kind == KIND_FUNC:
            funcs.append(type_id)
        offsets.append(offset)
        fixed, per_member = trailers[kind]
        offset += _TYPE.size + fixed + per_member * (info & 0xFFFF)
        type_id += 1
    if offset != end:
        raise ValueError(f"BTF type {type_id - 1} runs past the type section")
    return offsets, funcs


class Btf:
    """A read-only view of one standalone raw BTF blob. The constructor walks the whole type
    section once (ValueError when it is malformed); lookups read types on demand."""

    def __init__(self, raw: bytes) -> None:
        self._types, self._strings = _sections(raw)
        self._offsets, self._funcs = _walk(self._types)

    def __len__(self) -> int:
        """How many types, void (id 0) included."""
        return len(self._offsets)

    def string(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        if offset >= len(self._strings) or end < 0:
            raise ValueError(f"no BTF string at offset {offset}")
        return self._strings[offset:end].decode("utf-8", "replace")

    def _head(self, type_id: int) -> tuple[int, int, int, bool, int]:
        """(name offset, kind, vlen, kind_flag, size or type) of a type."""
        if not 0 < type_id < len(self._offsets):
            raise ValueError(f"no BTF type {type_id}")
        name_off, info, size_type = _TYPE.unpack_from(self._types, self._offsets[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31), size_type

    def name(self, type_id: int) -> str:
        return self.string(self._head(type_id)[0])

    def func_names(self) -> dict[int, str]:
        """{type id: name} of every FUNC type."""
        return {type_id: self.name(type_id) for type_id in self._funcs}

    def _name_offsets(self, name: str) -> set[int]:
        needle, found, start = b"\0" + name.encode() + b"\0", set(), 0
        while (hit := self._strings.find(needle, start)) >= 0:
            found.add(hit + 1)
            start = hit + 1
        return found

    def find(self, kind: int, name: str) -> int:
        """The id of the first type of `kind` named `name`."""
        wanted = self._name_offsets(name)
        for type_id in range(1, len(self._offsets)):
            name_off, type_kind, *_ = self._head(type_id)
            if name_off in wanted and type_kind == kind:
                return type_id
        raise BtfLookupError(f"BTF has no {name}")

    def _resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(_MAX_DEPTH):
            _, kind, _, _, target = self._head(type_id)
            if kind not in _KIND_MODIFIERS:
                return type_id
            type_id = target
        raise ValueError(f"BTF type {type_id}: more than {_MAX_DEPTH} modifiers in a row")

    def _members(self, type_id: int) -> list[tuple[str, Member]]:
        _, kind, vlen, kind_flag, _ = self._head(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            return []
        base = self._offsets[type_id] + _TYPE.size
        members = []
        for index in range(vlen):
            name_off, member_type, offset = _MEMBER.unpack_from(
                self._types, base + _MEMBER.size * index
            )
            bits = (offset & 0xFFFFFF, offset >> 24) if kind_flag else (offset, 0)
            members.append((self.string(name_off), Member(bits[0], bits[1], member_type)))
        return members

    def member(self, type_id: int, name: str) -> Member:
        """A member of a struct or union, looking inside anonymous members too."""
        return self._member(type_id, name, 0)

    def _member(self, type_id: int, name: str, depth: int) -> Member:
        if depth > _MAX_DEPTH:
            raise ValueError(f"BTF type {type_id}: anonymous members nest too deep")
        for member_name, member in self._members(self._resolve(type_id)):
            if member_name == name:
                return member
            if not member_name:
                with contextlib.suppress(BtfLookupError):
                    inner = self._member(member.type_id, name, depth + 1)
                    return Member(
                        member.bit_offset + inner.bit_offset, inner.bit_size, inner.type_id
                    )
        raise BtfLookupError(f"BTF: no member {name} in {self.name(type_id)}")

    def field(self, struct_name: str, path: str) -> Member:
        """`field("net_device", "nd_net.net")`: the member with its offset from the struct start."""
        type_id = self.find(KIND_STRUCT, struct_name)
        bit_offset, found = 0, Member(0, 0, type_id)
        for name in path.split("."):
            found = self.member(found.type_id, name)
            bit_offset += found.bit_offset
        return Member(bit_offset, found.bit_size, found.type_id)

    def byte_offset(self, struct_name: str, path: str) -> int:
        """The byte offset of a member that is not a bitfield (`field` for the rest)."""
        member = self.field(struct_name, path)
        if member.bit_size or member.bit_offset % 8:
            raise BtfLookupError(f"BTF: {struct_name}.{path} is a bitfield")
        return member.bit_offset // 8


def split_func_id(raw: bytes, base: Btf, name: str) -> int:
    """The type id of FUNC `name` in split BTF `raw` (a module's) on top of `base` (vmlinux):
    the split BTF's types are numbered on from the base's last, and a name offset past the
    base's strings points into the split BTF's own."""
    types, strings = _sections(raw)
    offsets, funcs = _walk(types)
    base_strings = len(base._strings)
    wanted = name.encode()
    for local_id in funcs:
        name_off = _TYPE.unpack_from(types, offsets[local_id])[0]
        if name_off < base_strings:
            found = base.string(name_off).encode()
        else:
            start = name_off - base_strings
            found = strings[start : strings.find(b"\0", start)]
        if found == wanted:
            return len(base) - 1 + local_id
    raise BtfLookupError(f"BTF has no {name}")


def parse_btf_func_names(raw: bytes) -> dict[int, str]:
    """{type id: name} of every FUNC type of standalone raw BTF; ValueError when malformed."""
    return Btf(raw).func_names()


def skb_cb_area(btf: Btf) -> tuple[int, int]:
    """(offset from the context pointer, bytes) of a tc program's skb->cb[0..4] in its xlated
    code: the verifier rewrites `__sk_buff.cb[i]` to offsetof(struct sk_buff, cb) +
    offsetof(struct qdisc_skb_cb, data) + 4 * i (net/core/filter.c, bpf_convert_ctx_access)."""
    start = btf.byte_offset("sk_buff", "cb") + btf.byte_offset("qdisc_skb_cb", "data")
    return start, SKB_CB_BYTES


@functools.cache
def running_kernel_skb_cb_area() -> tuple[int, int] | None:
    """`skb_cb_area` of the running kernel (read once); None without a readable vmlinux BTF."""
    try:
        return skb_cb_area(Btf(VMLINUX_BTF.read_bytes()))
    except (OSError, ValueError, BtfLookupError):
        return None
