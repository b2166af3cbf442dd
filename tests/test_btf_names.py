"""Full program names from BTF (ProgramInfo.full_name), checked against bpftool."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess

import pytest

from tcprio.kernel import bpf_syscalls
from tests.bpf_programs import PROGRAM_NAMES, ClassifierPrograms

BPF_OBJ_NAME_LEN = 16
MOV64_R0_MINUS_1 = struct.pack("<BBhi", 0xB7, 0x00, 0, -1)
EXIT = struct.pack("<BBhi", 0x95, 0x00, 0, 0)


def bpftool_json(*argv: str) -> object:
    out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def bpftool_prog_name(prog_id: int) -> str:
    shown = bpftool_json("prog", "show", "id", str(prog_id))
    assert isinstance(shown, dict)
    return str(shown["name"])


def program_btf(classifier_programs: ClassifierPrograms) -> bytes:
    """The raw BTF BCC loaded with the classifiers."""
    btf_id = bpf_syscalls.prog_info(classifier_programs.prog_id("term_ok"), False).btf_id
    assert btf_id
    with bpf_syscalls.open_btf(btf_id) as fd:
        info = bpf_syscalls.btf_info_from_fd(fd)
    assert info.id == btf_id and not info.kernel_btf and info.data is not None
    assert len(info.data) == info.size
    return info.data


# --- against the kernel and bpftool ------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAM_NAMES)
def test_full_name_is_what_bpftool_prints(
    classifier_programs: ClassifierPrograms, name: str
) -> None:
    prog_id = classifier_programs.prog_id(name)
    info = bpf_syscalls.prog_info(prog_id)
    assert bpftool_prog_name(prog_id) == name
    if info.btf_id:
        assert info.full_name == name
    else:  # bpf2bpf_call: linked by hand and loaded with prog_load_raw, without BTF
        assert name == "bpf2bpf_call"
        assert info.full_name is None
        assert info.name == name


@pytest.mark.parametrize(
    "name", ["classifier_ingress", "classifier_egress", "decide_by_length_sub"]
)
def test_truncated_kernel_names_are_completed(
    classifier_programs: ClassifierPrograms, name: str
) -> None:
    prog_id = classifier_programs.prog_id(name)
    info = bpf_syscalls.prog_info(prog_id, with_insns=False)
    assert info.name == name[: BPF_OBJ_NAME_LEN - 1]
    assert info.btf_id
    assert info.full_name == name == bpftool_prog_name(prog_id)


def test_program_without_btf_has_no_full_name() -> None:
    fd = bpf_syscalls.prog_load_raw(
        bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, MOV64_R0_MINUS_1 + EXIT, "tcprio_no_btf_program"
    )
    try:
        prog_id = bpf_syscalls.prog_id_of_fd(fd)
        for with_insns in (True, False):
            info = bpf_syscalls.prog_info(prog_id, with_insns)
            assert info.btf_id == 0
            assert info.full_name is None
            assert info.name == "tcprio_no_btf_p" == bpftool_prog_name(prog_id)
        assert bpf_syscalls.prog_info_from_fd(fd).full_name is None
    finally:
        os.close(fd)


def test_full_name_without_instructions(classifier_programs: ClassifierPrograms) -> None:
    prog_id = classifier_programs.prog_id("classifier_ingress")
    with_insns = bpf_syscalls.prog_info(prog_id)
    without = bpf_syscalls.prog_info(prog_id, with_insns=False)
    assert with_insns.full_name == without.full_name == "classifier_ingress"
    assert with_insns.map_ids == without.map_ids and with_insns.insns


def test_btf_names_survive_a_cold_cache(classifier_programs: ClassifierPrograms) -> None:
    prog_id = classifier_programs.prog_id("decide_by_length_sub")
    bpf_syscalls.btf_func_names.cache_clear()
    assert bpf_syscalls.prog_info(prog_id, False).full_name == "decide_by_length_sub"
    assert bpf_syscalls.btf_func_names.cache_info().currsize == 1


# --- the BTF reader ----------------------------------------------------------------------------


def test_func_names_match_bpftool_btf_dump(classifier_programs: ClassifierPrograms) -> None:
    btf_id = bpf_syscalls.prog_info(classifier_programs.prog_id("term_ok"), False).btf_id
    dumped = bpftool_json("btf", "dump", "id", str(btf_id))
    assert isinstance(dumped, dict)
    expected = {t["id"]: t["name"] for t in dumped["types"] if t["kind"] == "FUNC"}
    assert set(PROGRAM_NAMES) <= set(expected.values())
    assert dict(bpf_syscalls.btf_func_names(btf_id)) == expected
    assert bpf_syscalls.parse_btf_func_names(program_btf(classifier_programs)) == expected


def test_parses_vmlinux_btf_to_the_end() -> None:
    """vmlinux BTF holds every kind: a wrong trailer size would derail the walk."""
    with open("/sys/kernel/btf/vmlinux", "rb") as f:
        raw = f.read()
    names = bpf_syscalls.parse_btf_func_names(raw)
    assert len(names) > 1000
    assert "bpf_prog_get_info_by_fd" in names.values()


def test_kernel_btf_is_not_read() -> None:
    kernel = [
        btf for btf in bpftool_json("btf", "show") if isinstance(btf, dict) and btf.get("kernel")
    ]
    assert kernel, "no kernel BTF listed"
    btf_id = int(kernel[0]["id"])
    with bpf_syscalls.open_btf(btf_id) as fd:
        assert bpf_syscalls.btf_info_from_fd(fd, with_data=False).kernel_btf
    assert dict(bpf_syscalls.btf_func_names(btf_id)) == {}
    assert bpf_syscalls.btf_func_name(btf_id, 1) is None


def test_unreadable_btf_gives_none() -> None:
    assert bpf_syscalls.btf_func_name(0, 1) is None
    assert bpf_syscalls.btf_func_name(0x7FFFFFF0, 1) is None  # no such BTF object: ENOENT
    before = bpf_syscalls.btf_func_names.cache_info().currsize
    assert bpf_syscalls.btf_func_name(0x7FFFFFF0, 1) is None
    assert bpf_syscalls.btf_func_names.cache_info().currsize == before  # failures not cached


def test_unknown_type_id_gives_none(classifier_programs: ClassifierPrograms) -> None:
    btf_id = bpf_syscalls.prog_info(classifier_programs.prog_id("term_ok"), False).btf_id
    assert bpf_syscalls.btf_func_name(btf_id, 0) is None
    assert bpf_syscalls.btf_func_name(btf_id, 1_000_000) is None
    assert bpf_syscalls.btf_func_name(btf_id, 1) is None  # type 1 exists but is no FUNC


def _btf(types: bytes, strings: bytes) -> bytes:
    header = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def _type(name_off: int, kind: int, vlen: int = 0, size_or_type: int = 0) -> bytes:
    return struct.pack("=III", name_off, kind << 24 | vlen, size_or_type)


def test_trailing_data_of_each_kind() -> None:
    strings = b"\0int\0main_function_with_a_long_name\0helper\0"
    types = b"".join(
        (
            _type(1, 1, 0, 4) + b"\0" * 4,  # 1 INT
            _type(0, 13, 2, 1) + b"\0" * 16,  # 2 FUNC_PROTO, 2 params
            _type(
                strings.index(b"main"), 12, 1, 2
            ),  # 3 FUNC main_function_with_a_long_name (global)
            _type(0, 4, 3, 12) + b"\0" * 36,  # 4 STRUCT, 3 members
            _type(0, 6, 2, 4) + b"\0" * 16,  # 5 ENUM, 2 values
            _type(0, 3) + b"\0" * 12,  # 6 ARRAY
            _type(1, 14, 0, 1) + b"\0" * 4,  # 7 VAR
            _type(0, 15, 1, 4) + b"\0" * 12,  # 8 DATASEC, 1 var
            _type(1, 17, 0, 1) + b"\0" * 4,  # 9 DECL_TAG
            _type(0, 19, 2, 8) + b"\0" * 24,  # 10 ENUM64, 2 values
            _type(0, 2, 0, 1),  # 11 PTR
            _type(strings.index(b"helper"), 12, 0, 2),  # 12 FUNC helper (static)
        )
    )
    raw = _btf(types, strings)
    assert bpf_syscalls.parse_btf_func_names(raw) == {
        3: "main_function_with_a_long_name",
        12: "helper",
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x9f\xeb",
        _btf(b"", b"\0")[:20],
        _btf(_type(1, 12), b"\0f\0").replace(b"\x9f\xeb", b"\xeb\x9f", 1),  # wrong byte order
        _btf(_type(1, 12)[:8], b"\0f\0"),  # type cut off
        _btf(_type(1, 1), b"\0f\0"),  # INT without its 4 bytes
        _btf(_type(1, 25), b"\0f\0"),  # unknown kind
        _btf(_type(9, 12), b"\0f\0"),  # name past the strings
        _btf(_type(1, 12), b"\0f"),  # name not terminated
    ],
)
def test_malformed_btf_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        bpf_syscalls.parse_btf_func_names(raw)


def test_damaged_btf_raises_nothing_but_value_error(
    classifier_programs: ClassifierPrograms,
) -> None:
    raw = program_btf(classifier_programs)
    rng = random.Random(20240601)
    damaged = [raw[:cut] for cut in range(0, len(raw), 7)]
    for _ in range(2000):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        damaged.append(bytes(data))
    for data in damaged:
        try:
            names = bpf_syscalls.parse_btf_func_names(data)
        except ValueError:
            continue
        assert all(isinstance(name, str) for name in names.values())
