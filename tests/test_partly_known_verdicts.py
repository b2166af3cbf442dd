"""A classifier with a reachable exit that returns a chain-ending code may end the chain.

Real enforcers (Cilium's and Calico's endpoint programs) mix exits tcprio can prove (`return
TC_ACT_SHOT`, a tail-called program returning OK/REDIRECT) with exits it cannot (a verdict read
from a map or the packet). One provable terminal exit is enough: the classifier is terminal,
whatever its other exits return. `unknown` is kept for programs where no such exit is found and
some exit cannot be proven. Checked here on a program shaped like that, against
BPF_PROG_TEST_RUN and against run counters on real traffic between test namespaces.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tcprio.analysis import semantics
from tcprio.analysis.verdicts import analyse_program, explain
from tcprio.kernel import bpf_syscalls
from tcprio.model import Direction, Instruction, ProgramVerdicts, Severity, VerdictClass
from tests.bpf_asm import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R10,
    alu32_reg,
    alu64_imm,
    alu64_reg,
    assemble,
    call_helper,
    call_kfunc,
    exit_,
    ja,
    jmp_imm,
    label,
    ldx,
    mov64_imm,
    mov64_reg,
    stx,
)
from tests.bpf_programs import ClassifierPrograms, attach_filter
from tests.test_bpf_syscalls import encode_insns, ipv4_udp_packet
from tests.test_run_counters import PORT, RECEIVER_IP, pair, run_count  # noqa: F401 (fixture)
from tests.test_scan_kernel import datadog_settings, scan_only
from tests.timing import HANG_GUARD_S

SKB_LEN = 0  # offsetof(struct __sk_buff, len)
BIG = 200  # packets longer than this are dropped by a constant exit
PACKETS = 50


def _two_exits() -> tuple[Instruction, ...]:
    """`if (skb->len > 200) return TC_ACT_SHOT; return skb->len;` with two exits: the first a
    constant the analysis proves, the second a value it cannot know (it continues the chain in
    direct-action mode for every real packet: no frame is 0, 2, 4, 7 or 8 bytes long)."""
    return assemble(
        mov64_reg(R6, R1),
        ldx(4, R0, R6, SKB_LEN),
        jmp_imm("jgt", R0, BIG, "drop"),
        exit_(),
        label("drop"),
        mov64_imm(R0, semantics.TC_ACT_SHOT),
        exit_(),
    )


# r0 = skb->len, or TC_ACT_SHOT when it is over BIG, joined at label "out": the way clang
# funnels both returns into one exit.
FUNNELLED = [
    mov64_reg(R6, R1),
    ldx(4, R0, R6, SKB_LEN),
    jmp_imm("jgt", R0, BIG, "drop"),
    ja("out"),
    label("drop"),
    mov64_imm(R0, semantics.TC_ACT_SHOT),
    label("out"),
]


def _one_exit() -> tuple[Instruction, ...]:
    """The same, funnelled into one exit: r0 there is the join of TC_ACT_SHOT and an unknown
    length."""
    return assemble(FUNNELLED, exit_())


def _one_exit_through_a_4_byte_spill() -> tuple[Instruction, ...]:
    """Funnelled, then spilled to the stack as 4 bytes and reloaded before the exit."""
    return assemble(FUNNELLED, stx(4, R10, R0, -4), ldx(4, R0, R10, -4), exit_())


SHAPES = {
    "two exits": _two_exits,
    "one exit": _one_exit,
    "one exit, spilled": _one_exit_through_a_4_byte_spill,
}


def _load(insns: tuple[Instruction, ...], name: str) -> int:
    return bpf_syscalls.prog_load_raw(
        bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, encode_insns(insns), name
    )


def _analysed(fd: int) -> ProgramVerdicts:
    prog_id = bpf_syscalls.prog_id_of_fd(fd)
    info = bpf_syscalls.prog_info(prog_id)
    return analyse_program(prog_id, {prog_id: info}, {}, bpf_syscalls.helper_symbols())


@pytest.fixture(params=sorted(SHAPES))
def drop_big(request: pytest.FixtureRequest) -> Iterator[int]:
    fd = _load(SHAPES[request.param](), "drop_big")
    yield fd
    os.close(fd)


# --- the rule, pure ----------------------------------------------------------------------------


def test_a_known_terminal_exit_makes_a_partly_unknown_program_terminal() -> None:
    verdict = semantics.classify_clsact_direct_action(None, frozenset({-1, 2}))
    assert verdict.verdict_class is VerdictClass.TERMINAL
    assert verdict.terminal_actions == ("TC_ACT_SHOT",)
    assert "could not be determined" in verdict.reason


@pytest.mark.parametrize("partial", [frozenset(), frozenset({-1, 3, 42})])
def test_without_a_known_terminal_exit_it_stays_unknown(partial: frozenset[int]) -> None:
    assert (
        semantics.classify_clsact_direct_action(None, partial).verdict_class
        is VerdictClass.UNKNOWN
    )
    assert semantics.classify_tcx(None, partial).verdict_class is VerdictClass.UNKNOWN


def test_the_same_rule_on_tcx_and_without_direct_action() -> None:
    tcx = semantics.classify_tcx(None, frozenset({-1, 7}))
    assert (tcx.verdict_class, tcx.terminal_actions) == (VerdictClass.TERMINAL, ("TCX_REDIRECT",))
    # tcx: 3 stops later tcx programs but lets clsact run: not terminal for the clsact stage
    assert semantics.classify_tcx(None, frozenset({3})).verdict_class is VerdictClass.UNKNOWN
    classid = semantics.classify_clsact_classid(None, (), frozenset({0, 0x10001}))
    assert classid.verdict_class is VerdictClass.TERMINAL
    assert (
        semantics.classify_clsact_classid(None, (), frozenset({0})).verdict_class
        is VerdictClass.UNKNOWN
    )


# --- against the kernel ------------------------------------------------------------------------


def test_the_analysis_finds_the_terminal_exit_and_the_kernel_returns_it(drop_big: int) -> None:
    verdicts = _analysed(drop_big)
    assert verdicts.values is None  # one exit (or one path to the exit) cannot be proven...
    assert verdicts.known_values == {semantics.TC_ACT_SHOT}  # ...the other returns SHOT
    verdict = semantics.classify_clsact_direct_action(verdicts.values, verdicts.known_values)
    assert verdict.verdict_class is VerdictClass.TERMINAL
    # The kernel: a big frame gets TC_ACT_SHOT, a small one its length (which continues).
    big, small = ipv4_udp_packet(pad_to=BIG + 100), ipv4_udp_packet()
    assert bpf_syscalls.prog_test_run(drop_big, big) == semantics.TC_ACT_SHOT
    assert bpf_syscalls.prog_test_run(drop_big, small) == len(small)
    assert any("TC_ACT_SHOT (2)" in line for line in explain(verdicts)[1:])


def test_a_branch_that_rules_the_constant_out_drops_it() -> None:
    """`if (r0 == 2) return TC_ACT_UNSPEC; return r0;` after the join: SHOT cannot reach the
    last exit, so the program is unknown (and the kernel never returns 2), not terminal."""
    insns = assemble(
        FUNNELLED,
        jmp_imm("jeq", R0, semantics.TC_ACT_SHOT, "unspec"),
        exit_(),
        label("unspec"),
        mov64_imm(R0, semantics.TC_ACT_UNSPEC),
        exit_(),
    )
    fd = _load(insns, "shot_ruled_out")
    try:
        verdicts = _analysed(fd)
        assert verdicts.values is None
        assert verdicts.known_values == {semantics.TC_ACT_UNSPEC}
        verdict = semantics.classify_clsact_direct_action(verdicts.values, verdicts.known_values)
        assert verdict.verdict_class is VerdictClass.UNKNOWN
        big, small = ipv4_udp_packet(pad_to=BIG + 100), ipv4_udp_packet()
        assert bpf_syscalls.prog_test_run(fd, big) == semantics.TC_ACT_UNSPEC
        assert bpf_syscalls.prog_test_run(fd, small) == len(small)
    finally:
        os.close(fd)


def _send(tx, rx, payload_size: int, count: int) -> tuple[int, int]:
    """Send `count` datagrams of `payload_size` bytes, then one small marker; the veth keeps
    the order, so once the marker is in, every earlier datagram was classified. Returns (how
    many of the `count` arrived, 1 when the marker did)."""
    with rx.entered():
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx.entered():
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind((RECEIVER_IP, PORT))
        receiver.settimeout(HANG_GUARD_S)
        for _ in range(count):
            sender.sendto(b"x" * payload_size, (RECEIVER_IP, PORT))
        sender.sendto(b"marker", (RECEIVER_IP, PORT))
        arrived = 0
        while (data := receiver.recv(65536)) != b"marker":
            arrived += 1 if len(data) == payload_size else 0
    return arrived, 1


def test_it_hides_the_observer_on_real_traffic_and_tcprio_says_critical(
    pair,  # noqa: F811
    classifier_programs: ClassifierPrograms,
    drop_big: int,
) -> None:
    tx, rx = pair
    attach_filter(tx, "a0", Direction.EGRESS, 1, "drop_big", prog_fd=drop_big)
    attach_filter(tx, "a0", Direction.EGRESS, 10, "classifier_egress")
    drop_big_id = bpf_syscalls.prog_id_of_fd(drop_big)

    def runs() -> tuple[int, int]:
        mine = bpf_syscalls.prog_info(drop_big_id, with_insns=False).run_cnt
        return mine, run_count(classifier_programs, "classifier_egress")

    with bpf_syscalls.run_stats():
        start = runs()
        small_arrived, _ = _send(tx, rx, 32, PACKETS)
        after_small = runs()
        big_arrived, _ = _send(tx, rx, BIG + 100, PACKETS)
        after_big = runs()
    # Small datagrams: the length is returned, the chain goes on, the observer sees them.
    assert small_arrived == PACKETS
    assert after_small[1] - start[1] >= PACKETS
    # Big ones: TC_ACT_SHOT at priority 1 ends the chain; the observer sees only the marker
    # (and whatever small frames the namespace sends on its own, far fewer than PACKETS).
    assert big_arrived == 0
    assert after_big[0] - after_small[0] >= PACKETS
    assert after_big[1] - after_small[1] < PACKETS // 2, "the observer saw the dropped datagrams"

    scan = scan_only({tx.name}, datadog_settings())
    hooks = scan.result.hooks
    [hook] = [h for h in hooks if h.interface == "a0" and h.direction is Direction.EGRESS]
    classifier = next(c for c in hook.classifiers if c.priority == 1)
    assert classifier.verdict.verdict_class is VerdictClass.TERMINAL
    assert classifier.verdict.terminal_actions == ("TC_ACT_SHOT",)
    assert [(c.interface, c.severity) for c in scan.result.conflicts] == [
        ("a0", Severity.CRITICAL)
    ]


# --- helpers whose results the kernel bounds, and registers cleared by themselves ---------------

BPF_FUNC_SKB_LOAD_BYTES = 26


def _load_bytes_at(offset: int) -> tuple[Instruction, ...]:
    """`return bpf_skb_load_bytes(skb, offset, buf, 4);`: 0 when the packet is long enough,
    a negative errno (which continues the chain) when it is not."""
    return assemble(
        mov64_imm(R2, offset),
        mov64_reg(R3, R10),
        alu64_imm("add", R3, -8),
        mov64_imm(R4, 4),
        call_helper(BPF_FUNC_SKB_LOAD_BYTES),
        exit_(),
    )


def test_a_returned_helper_result_that_may_be_0_is_terminal_and_the_kernel_returns_0() -> None:
    fd = _load(_load_bytes_at(1000), "load_bytes_ret")
    try:
        verdicts = _analysed(fd)
        assert verdicts.values is None  # the errno range is not listed...
        assert verdicts.known_values == {0}  # ...but success is 0: TC_ACT_OK
        verdict = semantics.classify_clsact_direct_action(verdicts.values, verdicts.known_values)
        assert (verdict.verdict_class, verdict.terminal_actions) == (
            VerdictClass.TERMINAL, ("TC_ACT_OK",)
        )  # fmt: skip
        short, long = ipv4_udp_packet(), ipv4_udp_packet(pad_to=1100)
        assert bpf_syscalls.prog_test_run(fd, short) < 0  # -EFAULT: the chain goes on
        assert bpf_syscalls.prog_test_run(fd, long) == semantics.TC_ACT_OK  # it ends here
    finally:
        os.close(fd)


@pytest.mark.parametrize("op", ["xor", "sub"])
@pytest.mark.parametrize("alu", [alu64_reg, alu32_reg])
def test_a_register_cleared_by_itself_is_0(op: str, alu) -> None:
    fd = _load(assemble(ldx(4, R0, R1, SKB_LEN), alu(op, R0, R0), exit_()), "self_cleared")
    try:
        assert _analysed(fd).values == {0}
        assert bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) == 0
    finally:
        os.close(fd)


# --- kfuncs that leave the program ---------------------------------------------------------------


def test_bpf_throw_ends_the_program_with_its_cookie_and_tcprio_sees_it_may() -> None:
    """`bpf_throw(2); return TC_ACT_UNSPEC;`: the kernel returns the cookie, 2 (TC_ACT_SHOT);
    the code after the call never runs. Before, tcprio followed it and said transparent."""
    from pathlib import Path

    from tcprio.kernel.btf import KIND_FUNC, Btf, BtfLookupError

    vmlinux = Btf(Path("/sys/kernel/btf/vmlinux").read_bytes())
    try:
        throw = vmlinux.find(KIND_FUNC, "bpf_throw")
    except BtfLookupError:
        pytest.skip("this kernel's BTF has no bpf_throw (kernels before 6.7)")
    insns = assemble(
        mov64_imm(R1, semantics.TC_ACT_SHOT),
        call_kfunc(throw),
        mov64_imm(R0, semantics.TC_ACT_UNSPEC),
        exit_(),
    )
    fd = _load(insns, "throw_shot")
    try:
        assert bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) == semantics.TC_ACT_SHOT
        verdicts = _analysed(fd)
        verdict = semantics.classify_clsact_direct_action(verdicts.values, verdicts.known_values)
        assert verdict.verdict_class is VerdictClass.TERMINAL, explain(verdicts)
        assert verdict.terminal_actions == ("TC_ACT_SHOT",)
    finally:
        os.close(fd)
