"""bpf_syscalls against the real kernel, checked against bpftool and against the programs' code."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls.objects import MapInfoStruct, ProgInfoStruct
from tcprio.kernel.bpf_syscalls.syscall import QueryAttr
from tcprio.model import Direction, Instruction
from tests.bpf_programs import (
    PROGRAM_NAMES,
    ClassifierPrograms,
    attach_filter,
    link_subprogram,
    requires_tcx,
    tcx_attached,
    tcx_missing,
)
from tests.kernel import add_clsact, netns, veth, veth_in_one
from tests.timing import HANG_GUARD_S

BPF_CALL = 0x85
BPF_EXIT = 0x95
ETHERNET_HEADER_WITHOUT_TYPE = bytes.fromhex("020000000002") + bytes.fromhex("020000000001")


def bpftool_json(*argv: str) -> object:
    out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ipv4_udp_packet(payload: bytes = b"tcprio", pad_to: int = 0) -> bytes:
    """Ethernet + IPv4 + UDP, by hand: 10.0.0.1:1234 -> 10.0.0.2:5678."""
    payload = payload.ljust(max(0, pad_to - 42), b"\0")
    udp = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"),
    )  # fmt: skip
    words = struct.unpack("!10H", header)
    checksum = sum(words)
    checksum = (checksum & 0xFFFF) + (checksum >> 16)
    header = header[:10] + struct.pack("!H", ~checksum & 0xFFFF) + header[12:]
    ethernet = ETHERNET_HEADER_WITHOUT_TYPE + b"\x08\x00"
    return ethernet + header + udp


def ipv6_udp_packet() -> bytes:
    udp = struct.pack("!HHHH", 1234, 5678, 8, 0)
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(udp), socket.IPPROTO_UDP, 64,
        socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2"),
    )  # fmt: skip
    return ETHERNET_HEADER_WITHOUT_TYPE + b"\x86\xdd" + header + udp


def encode_insns(insns: tuple[Instruction, ...]) -> bytes:
    return b"".join(struct.pack("<BBhi", i.code, (i.src << 4) | i.dst, i.off, i.imm) for i in insns)


# --- programs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAM_NAMES)
def test_prog_info_agrees_with_bpftool(classifier_programs: ClassifierPrograms, name: str) -> None:
    prog_id = classifier_programs.prog_id(name)
    info = bpf_syscalls.prog_info(prog_id)
    shown = bpftool_json("prog", "show", "id", str(prog_id))

    assert info.id == shown["id"] == prog_id
    # The kernel keeps 15 characters; bpftool prints the whole function name from BTF.
    assert info.name == name[:15]
    assert shown["name"] == name
    assert info.tag == shown["tag"]
    assert len(info.tag) == 16
    assert info.type == bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS
    assert info.type_name == shown["type"] == "sched_cls"
    assert list(info.map_ids) == shown.get("map_ids", [])
    assert info.created_by_uid == shown["uid"] == 0
    assert info.btf_id == shown.get("btf_id", 0)
    assert info.error is None
    assert info.insns is not None
    assert len(info.insns) * 8 == shown["bytes_xlated"]
    boot_to_wall = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    assert abs(boot_to_wall + info.load_time_ns / 1e9 - shown["loaded_at"]) <= 2


@pytest.mark.parametrize("name", PROGRAM_NAMES)
def test_xlated_agrees_with_bpftool_dump(
    classifier_programs: ClassifierPrograms, name: str, tmp_path: Path
) -> None:
    prog_id = classifier_programs.prog_id(name)
    dump = tmp_path / "xlated.bin"
    subprocess.run(
        ["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "file", str(dump)], check=True
    )
    raw = bpf_syscalls.prog_xlated_bytes(prog_id)
    assert raw == dump.read_bytes()
    info = bpf_syscalls.prog_info(prog_id)
    assert info.insns is not None
    assert encode_insns(info.insns) == raw


def test_prog_info_without_insns(classifier_programs: ClassifierPrograms) -> None:
    info = bpf_syscalls.prog_info(classifier_programs.prog_id("tail_entry"), with_insns=False)
    assert info.insns is None
    assert info.error is None
    assert len(info.map_ids) == 2  # seen, verdict_jmp


def test_prog_info_of_missing_program_names_the_command() -> None:
    with pytest.raises(bpf_syscalls.BpfError) as caught:
        bpf_syscalls.prog_info(0x7FFFFFF0)
    assert caught.value.errno == errno.ENOENT
    assert str(caught.value) == (
        "bpf(BPF_PROG_GET_FD_BY_ID) failed: No such file or directory [ENOENT]"
    )


def test_listed_ids_include_the_loaded_programs(classifier_programs: ClassifierPrograms) -> None:
    listed = set(bpf_syscalls.list_prog_ids())
    assert {classifier_programs.prog_id(name) for name in PROGRAM_NAMES} <= listed
    assert classifier_programs.map_id("verdict_jmp") in bpf_syscalls.list_map_ids()


def test_bpf2bpf_call_shows_its_subprogram(classifier_programs: ClassifierPrograms) -> None:
    insns = bpf_syscalls.prog_info(classifier_programs.prog_id("bpf2bpf_call")).insns
    assert insns is not None
    calls = [pc for pc, insn in enumerate(insns) if insn.code == BPF_CALL and insn.src == 1]
    assert len(calls) == 1
    target = calls[0] + insns[calls[0]].off + 1
    assert calls[0] < target < len(insns)
    assert insns[target - 1].code == BPF_EXIT  # the main program ends right before its callee
    assert insns[-1].code == BPF_EXIT


def test_tail_call_is_call_imm_12(classifier_programs: ClassifierPrograms) -> None:
    insns = bpf_syscalls.prog_info(classifier_programs.prog_id("tail_entry")).insns
    assert insns is not None
    tail_calls = [i for i in insns if i.code == BPF_CALL and i.src == 0 and i.imm == 12]
    assert len(tail_calls) == 1


def test_link_subprogram_aims_the_call_behind_main() -> None:
    call = struct.pack("<BBhi", BPF_CALL, 0x10, 0, -1)
    exit_ = struct.pack("<BBhi", BPF_EXIT, 0, 0, 0)
    mov = struct.pack("<BBhi", 0xB7, 0, 0, 7)
    linked = bpf_syscalls.decode_insns(link_subprogram(mov + call + exit_, mov + exit_))
    assert len(linked) == 5
    assert linked[1].imm == 1  # pc 1 -> pc 1 + 1 + 1 = 3, the subprogram's first insn


def test_decode_insns_splits_fields() -> None:
    raw = struct.pack("<BBhi", 0x18, 0x21, -2, -5) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    assert bpf_syscalls.decode_insns(raw) == (
        Instruction(code=0x18, dst=1, src=2, off=-2, imm=-5),
        Instruction(code=0x95, dst=0, src=0, off=0, imm=0),
    )
    with pytest.raises(ValueError):
        bpf_syscalls.decode_insns(b"\0" * 12)


def test_info_structures_have_the_kernel_sizes() -> None:
    assert ctypes.sizeof(ProgInfoStruct) == 232
    assert ctypes.sizeof(MapInfoStruct) == 88
    assert ctypes.sizeof(QueryAttr) == 64


# --- maps ------------------------------------------------------------------------------------


def test_prog_array_slots(classifier_programs: ClassifierPrograms) -> None:
    info = bpf_syscalls.map_info(classifier_programs.map_id("verdict_jmp"))
    assert info.type_name == "prog_array"
    assert info.name == "verdict_jmp"
    assert (info.key_size, info.value_size, info.max_entries) == (4, 4, 4)
    assert info.prog_array == {0: classifier_programs.prog_id("tail_target_ok")}


def test_plain_array_has_no_slots(classifier_programs: ClassifierPrograms) -> None:
    info = bpf_syscalls.map_info(classifier_programs.map_id("seen"))
    assert (info.type_name, info.name, info.max_entries) == ("array", "seen", 16)
    assert info.prog_array is None


# --- tcx -------------------------------------------------------------------------------------


def tcx_links_in_bpftool() -> dict[int, int]:
    return {link["id"]: link["prog_id"] for link in bpftool_json("link", "show")}


@requires_tcx
def test_tcx_query_lists_links_in_order(classifier_programs: ClassifierPrograms) -> None:
    ids = classifier_programs.prog_id
    with netns("tcx") as ns:
        veth_in_one(ns, "va", "vb")
        ifindex = ns.ifindex("va")
        with (
            tcx_attached(ns, "va", Direction.INGRESS, "pass_unspec") as first,
            tcx_attached(ns, "va", Direction.INGRESS, "term_ok") as second,
            tcx_attached(ns, "va", Direction.EGRESS, "classifier_egress") as egress,
        ):
            with ns.entered():
                ingress_chain = bpf_syscalls.tcx_query(ifindex, Direction.INGRESS)
                egress_chain = bpf_syscalls.tcx_query(ifindex, Direction.EGRESS)
                other_end = bpf_syscalls.tcx_query(ns.ifindex("vb"), Direction.INGRESS)
            link_ids = {fd: bpf_syscalls.link_info_from_fd(fd).id for fd in (first, second, egress)}
            in_bpftool = tcx_links_in_bpftool()

            assert [(e.position, e.prog_id, e.link_id) for e in ingress_chain] == [
                (0, ids("pass_unspec"), link_ids[first]),
                (1, ids("term_ok"), link_ids[second]),
            ]
            assert [(e.position, e.prog_id, e.link_id) for e in egress_chain] == [
                (0, ids("classifier_egress"), link_ids[egress])
            ]
            assert other_end == ()
            for entry in (*ingress_chain, *egress_chain):
                assert in_bpftool[entry.link_id] == entry.prog_id
            link = bpf_syscalls.link_info(link_ids[egress])
            assert (link.type_name, link.prog_id) == ("tcx", ids("classifier_egress"))
            assert (link.ifindex, link.attach_type) == (ifindex, bpf_syscalls.BPF_TCX_EGRESS)
            assert set(link_ids.values()) <= set(bpf_syscalls.list_link_ids())

        with ns.entered():
            assert bpf_syscalls.tcx_query(ifindex, Direction.INGRESS) == ()
            assert bpf_syscalls.tcx_query(ifindex, Direction.EGRESS) == ()
        assert not set(link_ids.values()) & set(tcx_links_in_bpftool())


def test_without_tcx_the_query_says_so() -> None:
    """Kernels before 6.6 (Debian 12's 6.1): BPF_PROG_QUERY with a tcx attach type is EINVAL,
    which tcx_query turns into TcxUnsupported for every interface."""
    if not tcx_missing():
        pytest.skip("this kernel has tcx")
    with netns("notcx") as ns, ns.entered():
        for direction in (Direction.INGRESS, Direction.EGRESS):
            with pytest.raises(bpf_syscalls.TcxUnsupported) as caught:
                bpf_syscalls.tcx_query(ns.ifindex("lo"), direction)
            assert caught.value.errno == errno.EINVAL
            assert "no tcx in this kernel" in str(caught.value)


@requires_tcx
def test_tcx_query_unknown_interface() -> None:
    with netns("tcx") as ns, ns.entered(), pytest.raises(bpf_syscalls.BpfError) as caught:
        bpf_syscalls.tcx_query(4242, Direction.INGRESS)
    assert caught.value.errno == errno.ENODEV
    assert not isinstance(caught.value, bpf_syscalls.TcxUnsupported)
    assert "BPF_PROG_QUERY" in str(caught.value)


# --- running programs ------------------------------------------------------------------------

EXPECTED_RETURNS = {
    "term_ok": 0,
    "term_shot": 2,
    "term_redirect": 7,  # TC_ACT_REDIRECT: test runs do not perform the redirect
    "pass_unspec": -1,
    "pass_pipe": 3,
    "pass_42": 42,
    "by_packet": -1,  # IPv4 continues
    "bpf2bpf_call": -1,  # short packet
    "decide_by_length_sub": -1,
    "tail_entry": 0,  # through verdict_jmp[0] = tail_target_ok
    "tail_target_ok": 0,
    "classid_match": 0x10001,
    "classid_none": 0,
    "classifier_egress": -1,
    "classifier_ingress": -1,
}


@pytest.mark.parametrize("name", PROGRAM_NAMES)
def test_prog_test_run_returns_the_verdict(
    classifier_programs: ClassifierPrograms, name: str
) -> None:
    packet = ipv4_udp_packet()
    assert len(packet) >= 14 + 20 + 8
    assert (
        bpf_syscalls.prog_test_run(classifier_programs.fd(name), packet) == (EXPECTED_RETURNS[name])
    )


def test_prog_test_run_depends_on_the_packet(classifier_programs: ClassifierPrograms) -> None:
    fd = classifier_programs.fd
    assert bpf_syscalls.prog_test_run(fd("by_packet"), ipv6_udp_packet()) == 2
    long_packet = ipv4_udp_packet(pad_to=1200)
    assert bpf_syscalls.prog_test_run(fd("bpf2bpf_call"), long_packet) == 0
    assert bpf_syscalls.prog_test_run(fd("decide_by_length_sub"), long_packet) == 0


def test_run_stats_count_test_runs(classifier_programs: ClassifierPrograms) -> None:
    prog_id = classifier_programs.prog_id("pass_42")
    before = bpf_syscalls.prog_info(prog_id, with_insns=False)
    with bpf_syscalls.run_stats():
        bpf_syscalls.prog_test_run(classifier_programs.fd("pass_42"), ipv4_udp_packet(), repeat=10)
        after = bpf_syscalls.prog_info(prog_id, with_insns=False)
    assert after.run_cnt >= before.run_cnt + 10
    assert after.run_time_ns > before.run_time_ns


@requires_tcx
def test_real_traffic_runs_attached_classifiers(classifier_programs: ClassifierPrograms) -> None:
    """A clsact filter on the sender's egress and a tcx program on the receiver's ingress both
    see a UDP datagram sent across a veth; the run counters go up too."""
    egress_id = classifier_programs.prog_id("classifier_egress")
    ingress_id = classifier_programs.prog_id("classifier_ingress")
    with netns("snd") as sender, netns("rcv") as receiver:
        veth(sender, "va", receiver, "vb")
        sender.ip("addr", "add", "10.201.0.1/24", "dev", "va")
        receiver.ip("addr", "add", "10.201.0.2/24", "dev", "vb")
        add_clsact(sender, "va")
        attach_filter(sender, "va", "egress", 10, "classifier_egress", filter_name="egr_1_2")
        shown = sender.tc_json("filter", "show", "dev", "va", "egress")
        assert [f["options"].get("prog", {}).get("id") for f in shown if "options" in f] == [
            egress_id
        ]
        observer = tcx_attached(receiver, "vb", "ingress", "classifier_ingress")
        with bpf_syscalls.run_stats(), observer:
            seen_before = (
                classifier_programs.seen("classifier_egress"),
                classifier_programs.seen("classifier_ingress"),
            )
            runs_before = [
                bpf_syscalls.prog_info(i, False).run_cnt for i in (egress_id, ingress_id)
            ]
            with sender.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for _ in range(3):
                    udp.sendto(b"tcprio", ("10.201.0.2", 9))
                deadline = time.monotonic() + HANG_GUARD_S
                while time.monotonic() < deadline and (
                    classifier_programs.seen("classifier_ingress") <= seen_before[1]
                ):
                    time.sleep(0.02)
                    udp.sendto(b"tcprio", ("10.201.0.2", 9))
            runs_after = [bpf_syscalls.prog_info(i, False).run_cnt for i in (egress_id, ingress_id)]
            assert classifier_programs.seen("classifier_egress") > seen_before[0]
            assert classifier_programs.seen("classifier_ingress") > seen_before[1]
            assert runs_after[0] > runs_before[0]
            assert runs_after[1] > runs_before[1]


# --- loading ---------------------------------------------------------------------------------


def test_prog_load_raw_reports_the_verifier_log() -> None:
    exit_only = struct.pack("<BBhi", BPF_EXIT, 0, 0, 0)  # r0 never written
    with pytest.raises(bpf_syscalls.BpfError) as caught:
        bpf_syscalls.prog_load_raw(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, exit_only, "bad_exit")
    message = str(caught.value)
    assert caught.value.errno == errno.EACCES
    assert message.startswith("bpf(BPF_PROG_LOAD) failed: Permission denied [EACCES]: bad_exit:")
    assert "R0 !read_ok" in message
    assert "\n" not in message


def test_prog_load_raw_loads() -> None:
    code = struct.pack("<BBhi", 0xB7, 0, 0, 5) + struct.pack("<BBhi", BPF_EXIT, 0, 0, 0)
    fd = bpf_syscalls.prog_load_raw(bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, code, "ret_five")
    try:
        info = bpf_syscalls.prog_info_from_fd(fd)
        assert (info.name, info.type_name) == ("ret_five", "sched_cls")
        assert info.insns == bpf_syscalls.decode_insns(code)
        assert bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) == 5
    finally:
        os.close(fd)


# --- helper names ----------------------------------------------------------------------------


def test_helper_call_imm_names_bpf_redirect(classifier_programs: ClassifierPrograms) -> None:
    insns = bpf_syscalls.prog_info(classifier_programs.prog_id("term_redirect")).insns
    assert insns is not None
    helpers = [bpf_syscalls.helper_name(i.imm) for i in insns if i.code == BPF_CALL and i.src == 0]
    assert helpers == ["bpf_redirect"]


def test_helper_symbols_from_a_kallsyms_file(tmp_path: Path) -> None:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81000000 T _text\n"
        "ffffffff81400000 T __bpf_call_base\n"
        "ffffffff81400100 t bpf_redirect\n"
        "ffffffff81400200 D some_data\n"
        "ffffffff81400300 t htab_map_lookup_elem\n"
        "ffffffffa0001000 t bpf_mod_helper\t[some_module]\n"
        "ffffffffa0002000 t mod_function\t[some_module]\n"
        "ffffffffa0003000 t bpf_prog_2aed119664f951ed_term_ok\t[bpf]\n"
        "0000000000001000 T bpf_far_away\n"
    )
    # only names a helper call can be (bpf_*, map operations) are kept, within imm's reach;
    # JIT-ed programs ([bpf]) are not helpers
    assert bpf_syscalls.load_helper_symbols(str(kallsyms)) == {
        0: "__bpf_call_base",
        0x100: "bpf_redirect",
        0x300: "htab_map_lookup_elem",
        0xA0001000 - 0x81400000: "bpf_mod_helper",
    }


def test_helper_symbols_hidden_addresses(tmp_path: Path) -> None:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("0000000000000000 T __bpf_call_base\n0000000000000000 t bpf_redirect\n")
    assert bpf_syscalls.load_helper_symbols(str(kallsyms)) == {}


def test_a_huge_prog_array_is_read_only_up_to_the_limit(classifier_programs) -> None:
    """A prog array can have millions of slots (one syscall each to read): the read stops at
    PROG_ARRAY_READ_LIMIT and says so; a program put beyond it is not seen, and a tail call
    that may reach there makes the verdict unknown (tests/test_verdicts.py)."""
    from tcprio.kernel.bpf_syscalls.objects import PROG_ARRAY_READ_LIMIT

    slots = 4 * PROG_ARRAY_READ_LIMIT
    fd = bpf_syscalls.prog_array_create(slots)
    try:
        bpf_syscalls.prog_array_set(fd, 3, classifier_programs.fd("term_ok"))
        bpf_syscalls.prog_array_set(fd, slots - 1, classifier_programs.fd("term_shot"))
        info = bpf_syscalls.map_info_from_fd(fd)
        assert info.max_entries == slots
        assert info.prog_array_read == PROG_ARRAY_READ_LIMIT
        assert info.prog_array == {3: classifier_programs.prog_id("term_ok")}
        small = bpf_syscalls.map_info_from_fd(fd, read_limit=slots)
        assert small.prog_array_read is None and len(small.prog_array) == 2
    finally:
        os.close(fd)
