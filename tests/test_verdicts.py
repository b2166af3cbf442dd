"""The static verdict analysis on hand-assembled xlated images (pure: no kernel needed)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcprio.analysis.verdicts import AnalysisLimits, analyse_program, explain
from tcprio.model import Instruction, MapInfo, ProgramInfo, ProgramVerdicts
from tests.bpf_asm import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    R10,
    alu32_imm,
    alu32_reg,
    alu64_imm,
    alu64_reg,
    assemble,
    atomic,
    bswap64,
    call_helper,
    call_kfunc,
    call_pseudo,
    end,
    exit_,
    gotol,
    ja,
    jeq_imm,
    jmp32_imm,
    jmp_imm,
    jmp_reg,
    jne_imm,
    label,
    ld_abs,
    ld_imm64,
    ld_map,
    ldx,
    mov32_imm,
    mov32_reg,
    mov64_imm,
    mov64_reg,
    movsx64,
    neg64,
    ret,
    sdiv64_imm,
    smod64_imm,
    st_imm,
    stx,
    tail_call,
    tail_call_to,
)
from tests.timing import HANG_GUARD_S

HELPERS = {
    23: "bpf_redirect",
    155: "bpf_redirect_peer",
    152: "bpf_redirect_neigh",
    26: "bpf_skb_load_bytes",
    1: "bpf_map_lookup_elem",
    70: "htab_map_lookup_elem",
    71: "htab_map_lookup_and_delete_elem",
    181: "bpf_loop",
    200: "bpf_dynptr_from_skb",  # a kfunc: the xlated call's imm names it like a helper's
}
REDIRECT, REDIRECT_PEER, REDIRECT_NEIGH, LOAD_BYTES, LOOKUP = 23, 155, 152, 26, 1
PROG_ARRAY = 3


def program(prog_id: int, *items, insns: tuple[Instruction, ...] | None = None) -> ProgramInfo:
    code = insns if insns is not None else assemble(*items)
    return ProgramInfo(
        id=prog_id,
        name=f"prog{prog_id}",
        tag="0" * 16,
        type=3,
        type_name="sched_cls",
        load_time_ns=0,
        map_ids=(),
        insns=code,
    )


def prog_array(map_id: int, slots: dict[int, int]) -> MapInfo:
    return MapInfo(map_id, PROG_ARRAY, "prog_array", f"jmp{map_id}", 4, 4, 8, dict(slots))


def analyse(
    *programs: ProgramInfo,
    maps: dict[int, MapInfo] | None = None,
    limits: AnalysisLimits | None = None,
) -> ProgramVerdicts:
    table = {p.id: p for p in programs}
    return analyse_program(programs[0].id, table, maps or {}, HELPERS, limits or AnalysisLimits())


def values_of(*items) -> frozenset[int] | None:
    return analyse(program(1, *items)).values


def assert_unknown(verdicts: ProgramVerdicts, fragment: str) -> None:
    assert verdicts.values is None
    text = " | ".join(verdicts.unknown_reasons)
    assert fragment in text, text


LOAD_FROM_PACKET = ldx(4, R1, R1, 0)  # r1 = *(u32 *)(r1 + 0): a context/packet load


# --- constants -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0, 1, 2, 3, 4, 7, 8, 42, 0x10001])
def test_constant_return(value: int) -> None:
    verdicts = analyse(program(1, ret(value)))
    assert verdicts.values == {value}
    assert verdicts.unknown_reasons == ()
    assert [(e.pc, e.prog_id, e.values) for e in verdicts.exits] == [(1, 1, {value})]


def test_minus_one_via_ld_imm64_and_via_mov_are_both_unspec() -> None:
    assert values_of(ld_imm64(R0, 0xFFFFFFFF), exit_()) == {-1}
    assert values_of(mov64_imm(R0, -1), exit_()) == {-1}
    assert values_of(mov32_imm(R0, -1), exit_()) == {-1}


def test_return_value_is_the_lower_32_bits_signed() -> None:
    assert values_of(ld_imm64(R0, 0x1_0000_0000), exit_()) == {0}
    assert values_of(ld_imm64(R0, 0x7_8000_0000), exit_()) == {-(1 << 31)}


# --- branches ------------------------------------------------------------------------------


def test_branch_on_packet_data_joins_both_constants() -> None:
    verdicts = analyse(
        program(
            1,
            LOAD_FROM_PACKET,
            jne_imm(R1, 0xDD86, "other"),
            ret(2),
            label("other"),
            ret(-1),
        )
    )
    assert verdicts.values == {2, -1}
    assert len(verdicts.exits) == 2


def test_brief_bpf2bpf_example_join_in_one_exit() -> None:
    verdicts = analyse(
        program(
            1,
            ldx(4, R1, R6, 112),
            mov64_imm(R0, -1),
            mov64_imm(R2, 1001),
            jmp_reg("jgt", R2, R1, 1),
            mov64_imm(R0, 0),
            exit_(),
        )
    )
    assert verdicts.values == {-1, 0}
    assert [e.pc for e in verdicts.exits] == [5]


def test_branch_decided_by_constants_prunes_the_dead_edge() -> None:
    verdicts = analyse(
        program(
            1,
            mov64_imm(R1, 5),
            jeq_imm(R1, 5, "yes"),
            ret(2),  # dead
            label("yes"),
            ret(0),
        )
    )
    assert verdicts.values == {0}
    assert [e.pc for e in verdicts.exits] == [5]


@pytest.mark.parametrize(
    ("op", "left", "right", "taken"),
    [
        ("jgt", 3, 2, True),
        ("jgt", -1, 2, True),  # unsigned: 0xffff...ff > 2
        ("jsgt", -1, 2, False),
        ("jge", 2, 2, True),
        ("jlt", 2, 3, True),
        ("jle", 4, 3, False),
        ("jslt", -5, 1, True),
        ("jsle", 1, 1, True),
        ("jsge", -1, 0, False),
        ("jset", 6, 1, False),
        ("jset", 6, 2, True),
        ("jne", 1, 1, False),
    ],
)
def test_every_comparison_decided_on_constants(op: str, left: int, right: int, taken: bool) -> None:
    for jump in (
        jmp_imm(op, R1, right, "taken"),
        [mov64_imm(R2, right), jmp_reg(op, R1, R2, "taken")],
    ):
        expected = {1} if taken else {0}
        got = values_of(mov64_imm(R1, left), jump, ret(0), label("taken"), ret(1))
        assert got == expected, (op, left, right, jump)


def test_comparison_refines_an_unknown_register_on_equality() -> None:
    # r0 comes from a helper; on the taken edge of `if r0 == 7` it is exactly 7.
    assert values_of(
        call_helper(LOAD_BYTES), jeq_imm(R0, 7, "seven"), ret(-1), label("seven"), exit_()
    ) == {7, -1}
    assert values_of(
        call_helper(LOAD_BYTES), jne_imm(R0, 2, "other"), exit_(), label("other"), ret(-1)
    ) == {2, -1}


def test_comparison_against_unknown_prunes_impossible_edges() -> None:
    # 0 > r1 never holds (unsigned): the taken edge is dead whatever r1 is.
    assert values_of(
        LOAD_FROM_PACKET,
        mov64_imm(R2, 0),
        jmp_reg("jgt", R2, R1, "never"),
        ret(0),
        label("never"),
        ret(2),
    ) == {0}


def test_comparing_a_register_with_itself() -> None:
    assert values_of(
        LOAD_FROM_PACKET, jmp_reg("jeq", R1, R1, "same"), ret(2), label("same"), ret(0)
    ) == {0}
    assert values_of(
        LOAD_FROM_PACKET, jmp_reg("jgt", R1, R1, "never"), ret(0), label("never"), ret(2)
    ) == {0}


def test_jmp32_compares_only_the_lower_half() -> None:
    program_items = [
        ld_imm64(R1, 0x1_0000_0005),
        jmp32_imm("jeq", R1, 5, "low_match"),
        ret(2),
        label("low_match"),
        jeq_imm(R1, 5, "full_match"),  # 64-bit: 0x100000005 != 5
        ret(0),
        label("full_match"),
        ret(7),
    ]
    assert values_of(*program_items) == {0}


def test_jmp32_signed_comparison() -> None:
    # w1 = 0xffffffff is -1 as s32, 4294967295 as s64.
    assert values_of(
        mov32_imm(R1, -1), jmp32_imm("jslt", R1, 0, "neg"), ret(0), label("neg"), ret(2)
    ) == {2}
    assert values_of(
        mov32_imm(R1, -1), jmp_imm("jslt", R1, 0, "neg"), ret(0), label("neg"), ret(2)
    ) == {0}


def test_gotol_and_ja() -> None:
    assert values_of(gotol("end"), ret(2), label("end"), ret(0)) == {0}
    assert values_of(ja("end"), ret(2), label("end"), ret(0)) == {0}


# --- ALU -----------------------------------------------------------------------------------


def test_alu32_zero_extends() -> None:
    # w1 = w1 + 0 clears the upper half: r1 becomes 0.
    assert values_of(
        ld_imm64(R1, 0x1_0000_0000),
        alu32_imm("add", R1, 0),
        jeq_imm(R1, 0, "zero"),
        ret(2),
        label("zero"),
        ret(0),
    ) == {0}
    # w0 = -1 is 0x00000000ffffffff: shifted right by 31 it is 1, not all ones.
    assert values_of(mov32_imm(R0, -1), alu64_imm("rsh", R0, 31), exit_()) == {1}
    assert values_of(mov64_imm(R0, -1), alu64_imm("rsh", R0, 31), exit_()) == {-1}


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([mov64_imm(R0, 5), alu64_imm("add", R0, 3)], 8),
        ([mov64_imm(R0, 5), alu64_imm("sub", R0, 7)], -2),
        ([mov64_imm(R0, 5), alu64_imm("mul", R0, 3)], 15),
        ([mov64_imm(R0, 17), alu64_imm("div", R0, 5)], 3),
        ([mov64_imm(R0, 17), alu64_imm("div", R0, 0)], 0),
        ([mov64_imm(R0, 17), alu64_imm("mod", R0, 5)], 2),
        ([mov64_imm(R0, 17), mov64_imm(R1, 0), alu64_reg("mod", R0, R1)], 17),
        ([mov64_imm(R0, -17), sdiv64_imm(R0, 5)], -3),
        ([mov64_imm(R0, -17), smod64_imm(R0, 5)], -2),
        ([mov64_imm(R0, 6), alu64_imm("or", R0, 1)], 7),
        ([mov64_imm(R0, 6), alu64_imm("and", R0, 3)], 2),
        ([mov64_imm(R0, 6), alu64_imm("xor", R0, 5)], 3),
        ([mov64_imm(R0, 1), alu64_imm("lsh", R0, 3)], 8),
        ([mov64_imm(R0, -8), alu64_imm("arsh", R0, 2)], -2),
        ([mov64_imm(R0, 2), neg64(R0)], -2),
        ([mov64_imm(R0, 0x0700), end(R0, 16, big=True)], 7),
        ([ld_imm64(R0, 0x1_0000_0002), end(R0, 32, big=False)], 2),
        ([ld_imm64(R0, 0x0200_0000_0000_0000), bswap64(R0, 64)], 2),
        ([mov64_imm(R1, 0xFF), movsx64(R0, R1, 8)], -1),
        ([mov64_imm(R1, 7), mov64_imm(R0, 1), alu32_reg("add", R0, R1)], 8),
        ([mov64_imm(R1, 1), mov32_reg(R0, R1), alu32_imm("lsh", R0, 33)], 2),  # shift & 31
    ],
)
def test_alu_operations_on_constants(items: list, expected: int) -> None:
    assert values_of(*items, exit_()) == {expected}


def test_alu_on_value_sets() -> None:
    assert values_of(
        LOAD_FROM_PACKET,
        mov64_imm(R0, 1),
        jeq_imm(R1, 0, "one"),
        mov64_imm(R0, 2),
        label("one"),
        alu64_imm("mul", R0, 3),
        exit_(),
    ) == {3, 6}


def test_a_mask_bounds_an_unknown_value() -> None:
    assert values_of(call_helper(LOAD_BYTES), alu64_imm("and", R0, 3), exit_()) == {0, 1, 2, 3}
    assert values_of(call_helper(LOAD_BYTES), alu64_imm("mod", R0, 3), exit_()) == {0, 1, 2}
    assert values_of(call_helper(LOAD_BYTES), alu64_imm("rsh", R0, 63), exit_()) == {0, 1}
    assert values_of(call_helper(LOAD_BYTES), alu64_imm("add", R0, 3), exit_()) is None


# --- stack ---------------------------------------------------------------------------------


def test_spill_and_fill_of_r0() -> None:
    verdicts = analyse(
        program(
            1,
            mov64_imm(R0, 2),
            stx(8, R10, R0, -8),
            call_helper(LOAD_BYTES),
            ldx(8, R0, R10, -8),
            exit_(),
        )
    )
    assert verdicts.values == {2}


def test_spill_through_a_copy_of_the_frame_pointer() -> None:
    assert values_of(
        mov64_reg(R6, R10),
        alu64_imm("add", R6, -16),
        st_imm(4, R6, 4, 7),  # *(u32 *)(r10 - 12) = 7
        ldx(4, R0, R10, -12),
        exit_(),
    ) == {7}


def test_narrow_spills_and_partial_reads() -> None:
    assert values_of(mov32_imm(R0, -1), stx(4, R10, R0, -4), ldx(4, R0, R10, -4), exit_()) == {-1}
    # An 8-byte store read back 4 bytes at a time (little-endian).
    store = [ld_imm64(R1, 0x0000_0002_0000_0007), stx(8, R10, R1, -8)]
    assert values_of(*store, ldx(4, R0, R10, -8), exit_()) == {7}
    assert values_of(*store, ldx(4, R0, R10, -4), exit_()) == {2}
    # Overwriting the high half keeps the low half.
    assert values_of(*store, st_imm(4, R10, -4, 9), ldx(4, R0, R10, -8), exit_()) == {7}
    assert values_of(*store, st_imm(4, R10, -4, 9), ldx(8, R0, R10, -8), exit_()) == {
        7
    }  # low 32 bits of 0x9_0000_0007


def test_stack_slot_unknown_when_not_written_or_overwritten_by_a_helper() -> None:
    assert_unknown(analyse(program(1, ldx(8, R0, R10, -8), exit_())), "never written")
    verdicts = analyse(
        program(
            1,
            st_imm(8, R10, -8, 2),
            mov64_reg(R3, R10),
            alu64_imm("add", R3, -8),
            call_helper(LOAD_BYTES),  # bpf_skb_load_bytes(skb, off, r3 = fp-8, len)
            ldx(8, R0, R10, -8),
            exit_(),
        )
    )
    assert_unknown(verdicts, "may be written by the call")


@pytest.mark.parametrize("helper", [LOAD_BYTES, 181])
def test_a_slot_below_the_pointer_survives_a_helper_but_not_a_callback(helper: int) -> None:
    """bpf_skb_load_bytes writes at and above the pointer it gets; bpf_loop's callback gets
    the pointer as its ctx and may write anywhere in the caller's frame, below it too (the
    verifier lets it: it is a pointer into that frame)."""
    verdicts = analyse(
        program(
            1,
            st_imm(8, R10, -16, -1),  # a verdict below the pointer: TC_ACT_UNSPEC
            mov64_reg(R3, R10),
            alu64_imm("add", R3, -8),  # the pointer the call gets: fp-8
            call_helper(helper),
            ldx(8, R0, R10, -16),
            exit_(),
        )
    )
    if helper == LOAD_BYTES:
        assert verdicts.values == {-1}
    else:
        assert_unknown(verdicts, "may be written by the call")


@pytest.mark.parametrize(
    ("helper", "survives"), [(LOOKUP, True), (70, True), (71, False), (LOAD_BYTES, False)]
)
def test_helpers_that_only_read_their_arguments_keep_the_stack(helper: int, survives: bool) -> None:
    verdicts = analyse(
        program(
            1,
            st_imm(8, R10, -8, 2),  # a spilled verdict above the key
            st_imm(4, R10, -16, 1),  # the key
            mov64_reg(R2, R10),
            alu64_imm("add", R2, -16),
            ld_map(R1, 4),
            call_helper(helper),
            ldx(8, R0, R10, -8),
            exit_(),
        )
    )
    assert verdicts.values == ({2} if survives else None)


def test_helper_writes_through_stack_pointers_stored_where_its_argument_points() -> None:
    verdicts = analyse(
        program(
            1,
            st_imm(8, R10, -24, 2),
            mov64_reg(R1, R10),
            alu64_imm("add", R1, -24),
            stx(8, R10, R1, -8),  # *(fp - 8) = fp - 24
            mov64_reg(R3, R10),
            alu64_imm("add", R3, -8),
            call_helper(LOAD_BYTES),  # gets fp - 8, may follow it to fp - 24
            ldx(8, R0, R10, -24),
            exit_(),
        )
    )
    assert_unknown(verdicts, "may be written by the call at pc 6")


def test_store_through_an_unknown_pointer_leaves_the_stack_alone() -> None:
    assert values_of(st_imm(8, R10, -8, 2), stx(8, R1, R0, 0), ldx(8, R0, R10, -8), exit_()) == {2}


def test_atomic_on_a_stack_slot_invalidates_it() -> None:
    verdicts = analyse(
        program(
            1,
            st_imm(8, R10, -8, 2),
            mov64_imm(R1, 1),
            atomic(8, R10, R1, -8, 0x00),  # lock *(u64 *)(r10 - 8) += r1
            ldx(8, R0, R10, -8),
            exit_(),
        )
    )
    assert verdicts.values is None
    fetched = analyse(
        program(1, mov64_imm(R1, 1), atomic(8, R6, R1, 0, 0x01), mov64_reg(R0, R1), exit_())
    )
    assert_unknown(fetched, "old value of an atomic operation")


def test_join_of_different_stack_contents() -> None:
    assert values_of(
        LOAD_FROM_PACKET,
        st_imm(8, R10, -8, 0),
        jeq_imm(R1, 0, "join"),
        st_imm(8, R10, -8, 2),
        label("join"),
        ldx(8, R0, R10, -8),
        exit_(),
    ) == {0, 2}
    # Written on one path only: unknown.
    verdicts = analyse(
        program(
            1,
            LOAD_FROM_PACKET,
            jeq_imm(R1, 0, "join"),
            st_imm(8, R10, -8, 2),
            label("join"),
            ldx(8, R0, R10, -8),
            exit_(),
        )
    )
    assert verdicts.values is None


# --- helpers -------------------------------------------------------------------------------


def test_callee_saved_registers_survive_a_helper_call() -> None:
    assert values_of(mov64_imm(R6, 2), call_helper(LOAD_BYTES), mov64_reg(R0, R6), exit_()) == {2}
    for reg in (R7, R8, R9):
        assert values_of(mov64_imm(reg, 4), call_helper(LOOKUP), mov64_reg(R0, reg), exit_()) == {4}


def test_scratch_registers_are_clobbered_by_a_helper_call() -> None:
    assert_unknown(
        analyse(program(1, mov64_imm(R1, 2), call_helper(LOAD_BYTES), mov64_reg(R0, R1), exit_())),
        "clobbered by the call at pc 1",
    )


@pytest.mark.parametrize(
    ("helper", "setup", "expected"),
    [
        (REDIRECT, [mov64_imm(R2, 0)], {7}),
        (REDIRECT, [mov64_imm(R2, 1)], {7}),  # BPF_F_INGRESS
        (REDIRECT, [mov64_imm(R2, 4)], {7, 2}),  # a bad flag: SHOT
        (REDIRECT, [LOAD_FROM_PACKET, mov64_reg(R2, R1)], {7, 2}),
        (REDIRECT_PEER, [mov64_imm(R2, 0)], {7}),
        (REDIRECT_PEER, [mov64_imm(R2, 1)], {7, 2}),
        (REDIRECT_NEIGH, [mov64_imm(R2, 0), mov64_imm(R3, 0), mov64_imm(R4, 0)], {7}),
        (REDIRECT_NEIGH, [mov64_imm(R3, 20), mov64_imm(R4, 0)], {7, 2}),
    ],
)
def test_redirect_helpers_return_redirect_or_shot(helper: int, setup: list, expected: set) -> None:
    verdicts = analyse(program(1, setup, call_helper(helper), exit_()))
    assert verdicts.values == expected
    assert f"{HELPERS[helper]}()" in verdicts.exits[0].note


def test_unknown_helper_result_is_unknown() -> None:
    verdicts = analyse(program(1, call_helper(LOOKUP), exit_()))
    assert_unknown(verdicts, "returned by bpf_map_lookup_elem() at pc 0")
    assert verdicts.exits[0].note == "unknown: r0 is returned by bpf_map_lookup_elem() at pc 0"
    assert_unknown(analyse(program(1, call_helper(999), exit_())), "unidentified helper")


def test_kfunc_call_result_is_unknown() -> None:
    assert_unknown(analyse(program(1, call_kfunc(200), exit_())), "kfunc")
    assert values_of(mov64_imm(R6, 3), call_kfunc(200), mov64_reg(R0, R6), exit_()) == {3}


def test_a_kfunc_tcprio_cannot_name_may_end_the_program() -> None:
    """bpf_throw leaves the program with a value of its own: an unnamed kfunc might be it."""
    verdicts = analyse(program(1, mov64_imm(R6, 3), call_kfunc(5), mov64_reg(R0, R6), exit_()))
    assert_unknown(verdicts, "cannot name may end the program")
    assert verdicts.known_values == {3}


def test_load_from_packet_is_unknown() -> None:
    verdicts = analyse(program(1, ldx(4, R0, R1, 0), exit_()))
    assert_unknown(verdicts, "loaded from memory at pc 0")
    assert verdicts.exits[0].note == "unknown: r0 was loaded from memory at pc 0"


def test_legacy_packet_load_can_end_the_program_with_zero() -> None:
    verdicts = analyse(program(1, mov64_reg(R6, R1), ld_abs(1, 12), ret(2)))
    assert verdicts.values == {0, 2}


def test_returning_a_pointer_is_unknown() -> None:
    assert_unknown(analyse(program(1, mov64_reg(R0, R10), exit_())), "pointer")
    assert_unknown(analyse(program(1, ld_map(R0, 4), exit_())), "pointer")


# --- BPF-to-BPF calls ----------------------------------------------------------------------


def test_bpf2bpf_call_returns_the_callees_values() -> None:
    verdicts = analyse(
        program(
            1,
            mov64_reg(R6, R1),
            call_pseudo("sub"),
            exit_(),
            label("sub"),
            ldx(4, R1, R1, 0),
            mov64_imm(R0, -1),
            jeq_imm(R1, 0, "out"),
            mov64_imm(R0, 0),
            label("out"),
            exit_(),
        )
    )
    assert verdicts.values == {-1, 0}
    assert [e.pc for e in verdicts.exits] == [2]  # the callee's exit returns, it is no exit
    assert "subprogram called at pc 1" in verdicts.exits[0].note


def test_bpf2bpf_call_preserves_r6_to_r9_and_clobbers_r1_to_r5() -> None:
    callee = [label("sub"), mov64_imm(R6, 5), mov64_imm(R7, 5), mov64_imm(R1, 5), ret(0)]
    assert values_of(mov64_imm(R6, 3), call_pseudo("sub"), mov64_reg(R0, R6), exit_(), callee) == {
        3
    }
    assert values_of(
        mov64_imm(R7, 1), call_pseudo("sub"), alu64_reg("add", R0, R7), exit_(), callee
    ) == {1}
    assert_unknown(
        analyse(
            program(1, mov64_imm(R1, 3), call_pseudo("sub"), mov64_reg(R0, R1), exit_(), callee)
        ),
        "clobbered by the call at pc 1",
    )


def test_callee_writes_the_callers_stack_through_a_pointer() -> None:
    assert values_of(
        st_imm(8, R10, -8, 0),
        mov64_reg(R1, R10),
        alu64_imm("add", R1, -8),
        call_pseudo("sub"),
        ldx(8, R0, R10, -8),
        exit_(),
        label("sub"),
        st_imm(8, R1, 0, 2),
        st_imm(8, R10, -8, 9),  # the callee's own frame: not the caller's slot
        ret(0),
    ) == {2}


def test_nested_calls() -> None:
    verdicts = analyse(
        program(
            1,
            call_pseudo("a"),
            exit_(),
            label("a"),
            call_pseudo("b"),
            alu64_imm("add", R0, 1),
            exit_(),
            label("b"),
            LOAD_FROM_PACKET,
            mov64_imm(R0, 1),
            jeq_imm(R1, 0, "b_out"),
            mov64_imm(R0, 6),
            label("b_out"),
            exit_(),
        )
    )
    assert verdicts.values == {2, 7}


def test_the_same_subprogram_called_from_two_places_is_analysed_per_call() -> None:
    assert values_of(
        mov64_imm(R1, 1),
        call_pseudo("double"),
        mov64_reg(R6, R0),
        mov64_imm(R1, 3),
        call_pseudo("double"),
        alu64_reg("add", R0, R6),  # 2 + 6, never 2 + 2 or 6 + 6
        exit_(),
        label("double"),
        mov64_reg(R0, R1),
        alu64_imm("lsh", R0, 1),
        exit_(),
    ) == {8}


def test_recursion_is_unknown_and_terminates() -> None:
    verdicts = analyse(program(1, call_pseudo("f"), exit_(), label("f"), call_pseudo("f"), ret(0)))
    assert_unknown(verdicts, "recursive call")


def test_calls_deeper_than_the_limit_are_unknown() -> None:
    chain = []
    for depth in range(10):
        chain += [label(f"f{depth}"), call_pseudo(f"f{depth + 1}"), exit_()]
    chain += [label("f10"), ret(0)]
    assert_unknown(analyse(program(1, chain)), "nested deeper than 8")
    # Seven nested calls (eight frames) are fine, like in the kernel.
    shallow = []
    for depth in range(7):
        shallow += [label(f"f{depth}"), call_pseudo(f"f{depth + 1}"), exit_()]
    shallow += [label("f7"), ret(0)]
    assert analyse(program(1, shallow)).values == {0}


# --- tail calls ----------------------------------------------------------------------------


def test_tail_call_with_a_known_slot() -> None:
    verdicts = analyse(
        program(1, tail_call_to(4, 0), ret(-1)),
        program(12, ret(0)),
        program(13, ret(2)),
        maps={4: prog_array(4, {0: 12, 1: 13})},
    )
    assert verdicts.values == {-1, 0}  # slot 1 is never used; -1 when the call fails
    tail_exit = next(e for e in verdicts.exits if e.prog_id == 12)
    assert tail_exit.values == {0}
    assert "tail call to prog 12 via map 4 slot 0" in tail_exit.note


def test_tail_call_with_an_unknown_slot_follows_every_present_slot() -> None:
    full = {slot: 12 if slot % 2 else 13 for slot in range(8)}  # every slot of the 8 is filled
    verdicts = analyse(
        program(1, ldx(4, R3, R1, 0), ld_map(R2, 4), tail_call(), ret(-1)),
        program(12, ret(0)),
        program(13, ret(2)),
        maps={4: prog_array(4, full)},
    )
    assert verdicts.values == {-1, 0, 2}
    assert {e.prog_id for e in verdicts.exits} == {1, 12, 13}


def test_tail_call_with_an_unknown_slot_and_empty_slots_is_unknown_but_keeps_what_it_saw() -> None:
    verdicts = analyse(
        program(1, ldx(4, R3, R1, 0), ld_map(R2, 4), tail_call(), ret(-1)),
        program(12, ret(0)),
        program(13, ret(2)),
        maps={4: prog_array(4, {0: 12, 3: 13})},
    )
    assert_unknown(verdicts, "is empty now")
    assert verdicts.known_values == {-1, 0, 2}  # terminal all the same: 0 and 2 end the chain
    assert {e.prog_id for e in verdicts.exits} == {1, 12, 13}


def test_a_tail_call_that_may_reach_unread_slots_of_a_huge_array_is_unknown() -> None:
    huge = MapInfo(4, PROG_ARRAY, "prog_array", "jmp4", 4, 4, 1 << 24, {0: 12}, 1 << 18)
    verdicts = analyse(
        program(1, ldx(4, R3, R1, 0), ld_map(R2, 4), tail_call(), ret(-1)),
        program(12, ret(-1)),
        maps={4: huge},
    )
    assert_unknown(verdicts, "only the first 262144 were read")
    # a constant slot among those read is followed as usual
    verdicts = analyse(
        program(1, tail_call_to(4, 0), ret(-1)), program(12, ret(2)), maps={4: huge}
    )
    assert verdicts.values == {-1, 2}


def test_tail_call_to_an_empty_slot_is_unknown_not_transparent() -> None:
    """The call fails today, but the slot's owner can fill it at any moment: unknown."""
    verdicts = analyse(
        program(1, tail_call_to(4, 2), ret(-1)),
        program(12, ret(0)),
        maps={4: prog_array(4, {0: 12})},
    )
    assert_unknown(verdicts, "slot 2 of map 4 is empty now")
    assert verdicts.known_values == {-1}


def test_r0_after_a_failed_tail_call_is_unknown() -> None:
    verdicts = analyse(program(1, tail_call_to(4, 0), exit_()), maps={4: prog_array(4, {})})
    assert_unknown(verdicts, "failed tail call")


def test_tail_call_to_itself_terminates() -> None:
    verdicts = analyse(
        program(1, ldx(4, R6, R1, 0), tail_call_to(4, 0), ret(-1)),
        maps={4: prog_array(4, {0: 1})},
    )
    assert verdicts.values == {-1}


def test_tail_call_cycle_between_two_programs_terminates() -> None:
    verdicts = analyse(
        program(1, tail_call_to(4, 1), ret(-1)),
        program(2, tail_call_to(4, 0), ret(2)),
        maps={4: prog_array(4, {0: 1, 1: 2})},
    )
    assert verdicts.values == {-1, 2}


def test_tail_call_passes_the_context_and_a_fresh_stack() -> None:
    verdicts = analyse(
        program(1, st_imm(8, R10, -8, 2), tail_call_to(4, 0), ret(-1)),
        program(2, ldx(8, R0, R10, -8), exit_()),
        maps={4: prog_array(4, {0: 2})},
    )
    assert_unknown(verdicts, "never written")


def test_tail_call_to_a_missing_program_is_unknown() -> None:
    verdicts = analyse(program(1, tail_call_to(4, 0), ret(-1)), maps={4: prog_array(4, {0: 99})})
    assert_unknown(verdicts, "tail call to prog 99 via map 4 slot 0")
    hidden = ProgramInfo(99, "hidden", "0" * 16, 3, "sched_cls", 0, (), None, error="EPERM")
    verdicts = analyse(
        program(1, tail_call_to(4, 0), ret(-1)), hidden, maps={4: prog_array(4, {0: 99})}
    )
    assert_unknown(verdicts, "code is not available")


def test_tail_call_through_an_unknown_or_missing_map_is_unknown() -> None:
    assert_unknown(analyse(program(1, tail_call_to(4, 0), ret(-1))), "map 4 is not available")
    plain = MapInfo(4, 2, "array", "a", 4, 8, 1)
    assert_unknown(
        analyse(program(1, tail_call_to(4, 0), ret(-1)), maps={4: plain}), "not a program array"
    )
    assert_unknown(analyse(program(1, tail_call(), ret(-1))), "through an unknown map")


def test_tail_call_inside_a_subprogram_returns_to_its_caller() -> None:
    verdicts = analyse(
        program(
            1,
            mov64_imm(R6, 1),
            call_pseudo("sub"),
            alu64_reg("add", R0, R6),
            exit_(),
            label("sub"),
            tail_call_to(4, 0),
            ret(-1),
        ),
        program(2, ret(6)),
        maps={4: prog_array(4, {0: 2})},
    )
    assert verdicts.values == {0, 7}
    assert all(e.prog_id == 1 for e in verdicts.exits)


def _tail_chain(length: int) -> tuple[list[ProgramInfo], dict[int, MapInfo]]:
    programs = [program(n, tail_call_to(4, n + 1), ret(n)) for n in range(1, length)]
    programs.append(program(length, ret(length)))
    return programs, {4: prog_array(4, {n: n for n in range(2, length + 1)})}


def test_tail_call_chains_longer_than_the_limit_are_unknown() -> None:
    programs, maps = _tail_chain(40)
    assert_unknown(analyse(*programs, maps=maps), "more than 33 tail calls")
    programs, maps = _tail_chain(10)
    assert analyse(*programs, maps=maps).values == set(range(1, 11))
    assert_unknown(
        analyse(*programs, maps=maps, limits=AnalysisLimits(max_programs=5)), "more than 5 programs"
    )


# --- loops and limits ----------------------------------------------------------------------


def test_bounded_loop_terminates_with_the_right_result() -> None:
    assert values_of(
        mov64_imm(R1, 0),
        label("loop"),
        alu64_imm("add", R1, 1),
        jmp_imm("jlt", R1, 4, "loop"),
        mov64_reg(R0, R1),
        exit_(),
    ) == {4}
    # A longer loop widens its counter, but the verdict set after the loop stays known.
    assert values_of(
        mov64_imm(R1, 0),
        label("loop"),
        alu64_imm("add", R1, 1),
        jmp_imm("jlt", R1, 1000, "loop"),
        ret(2),
    ) == {2}


def test_loop_whose_counter_is_returned_widens_to_unknown() -> None:
    verdicts = analyse(
        program(
            1,
            mov64_imm(R0, 0),
            label("loop"),
            alu64_imm("add", R0, 1),
            jmp_imm("jlt", R0, 1000, "loop"),
            exit_(),
        )
    )
    assert_unknown(verdicts, "more than 32 possible values")


def test_endless_loop_has_no_exit() -> None:
    assert_unknown(analyse(program(1, ja(-1))), "no reachable exit")


def test_large_program_stops_at_the_instruction_limit() -> None:
    body = [mov64_imm(R0, 0)]
    for n in range(33_333):
        body += [ldx(4, R1, R6, 0), jeq_imm(R1, n, 1), mov64_imm(R0, n % 3)]
    body.append(exit_())
    code = assemble(body)
    assert len(code) > 100_000
    limits = AnalysisLimits(max_insn_visits=20_000)
    start = time.perf_counter()
    verdicts = analyse(program(1, insns=code), limits=limits)
    elapsed = time.perf_counter() - start
    assert_unknown(verdicts, "stopped after 20000 instructions")  # the bound on the work
    assert elapsed < HANG_GUARD_S, f"{elapsed:.1f} s"  # about 0.2 s here
    # With the default limit the whole program is analysed.
    assert analyse(program(1, insns=code)).values == {0, 1, 2}


def test_4096_instruction_program_is_fast() -> None:
    body = [mov64_reg(R6, R1), mov64_imm(R0, -1)]
    while len(body) < 4090:
        n = len(body)
        body += [
            ldx(4, R1, R6, n % 64),
            stx(8, R10, R0, -8 * (1 + n % 16)),
            jeq_imm(R1, n, 2),
            alu64_imm("add", R0, 1),
            alu64_imm("and", R0, 1),
            ldx(8, R2, R10, -8 * (1 + n % 16)),
        ]
    body += [alu64_imm("sub", R0, 1), exit_()]
    code = assemble(body)
    # The work, in instructions interpreted: each about once (4096 of them here). Past the
    # budget the analysis would stop, unknown.
    budget = AnalysisLimits(max_insn_visits=2 * len(code))
    start = time.perf_counter()
    verdicts = analyse(program(1, insns=code), limits=budget)
    elapsed = time.perf_counter() - start
    # r0 is all ones until the first masking
    assert verdicts.values == {-2, -1, 0}, explain(verdicts)
    assert elapsed < HANG_GUARD_S, f"{elapsed:.1f} s"  # about 30 ms here


def test_verifier_scratch_register_ax_as_in_a_rewritten_may_goto() -> None:
    ax = 11
    verdicts = analyse(
        program(
            1,
            st_imm(8, R10, -8, 8),
            label("loop"),
            ldx(8, ax, R10, -8),
            jeq_imm(ax, 0, "out"),
            alu64_imm("sub", ax, 1),
            stx(8, R10, ax, -8),
            ja("loop"),
            label("out"),
            mov64_reg(R0, ax),  # the counter, refined to 0 on the exit edge
            exit_(),
        )
    )
    assert verdicts.values == {0}


def test_may_goto_takes_both_ways() -> None:
    may_goto = Instruction(0xE5, 0, 0, 2, 0)
    assert values_of(may_goto, mov64_imm(R0, 0), exit_(), mov64_imm(R0, 2), exit_()) == {0, 2}


# --- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("insns", "fragment"),
    [
        ((), "no instructions"),
        (assemble(ja(5), ret(0)), "outside the program"),
        (assemble(jeq_imm(R1, 0, -10), ret(0)), "outside the program"),
        (assemble(ld_imm64(R0, 1))[:1], "cut short"),
        (assemble(jeq_imm(R1, 0, 1), ld_imm64(R0, 1), exit_()), "inside a 64-bit immediate"),
        ((Instruction(0xFF, 0, 0, 0, 0),), "unknown"),
        ((Instruction(0x8F, 0, 0, 0, 0),), "unknown ALU operation"),
        ((Instruction(0x07, 10, 0, 0, 1), *assemble(ret(0))), "invalid register"),
        (assemble(mov64_imm(R0, 0)), "past the end"),
        (assemble(call_pseudo(40), ret(0)), "outside the program"),
        ((Instruction(0x85, 0, 7, 0, 0), *assemble(ret(0))), "unknown kind of call"),
        ((Instruction(0xDB, 10, 1, 0, 0x77), *assemble(ret(0))), "unknown atomic operation"),
    ],
)
def test_malformed_programs_are_unknown(insns: tuple[Instruction, ...], fragment: str) -> None:
    assert_unknown(analyse(program(1, insns=insns)), fragment)


def test_missing_root_program_is_unknown() -> None:
    verdicts = analyse_program(5, {}, {}, {})
    assert_unknown(verdicts, "program 5 is not available")
    hidden = ProgramInfo(5, "x", "0" * 16, 3, "sched_cls", 0, (), None, error="no permission")
    assert_unknown(analyse(hidden), "no permission")


def test_unreachable_garbage_does_not_matter() -> None:
    code = (*assemble(ret(0)), Instruction(0xFF, 15, 15, 0, 0))
    assert analyse(program(1, insns=code)).values == {0}


# --- explain -------------------------------------------------------------------------------


def test_explain_lists_every_exit_with_action_names() -> None:
    verdicts = analyse(
        program(
            1,
            LOAD_FROM_PACKET,
            jeq_imm(R1, 0, "a"),
            tail_call_to(4, 0),
            ret(-1),
            label("a"),
            ret(2),
        ),
        program(7, mov64_imm(R2, 0), call_helper(REDIRECT), exit_()),
        maps={4: prog_array(4, {0: 7})},
    )
    lines = explain(verdicts)
    text = "\n".join(lines)
    assert lines[0] == ("prog 1: returns TC_ACT_UNSPEC (-1), TC_ACT_SHOT (2), TC_ACT_REDIRECT (7)")
    assert "exit at pc 7: TC_ACT_UNSPEC (-1)" in text
    assert "exit at pc 9: TC_ACT_SHOT (2)" in text
    assert "exit at pc 2 of prog 7: TC_ACT_REDIRECT (7)" in text
    assert "bpf_redirect() at pc 1" in text
    assert "tail call to prog 7 via map 4 slot 0" in text


def test_explain_says_why_a_program_is_unknown() -> None:
    lines = explain(analyse(program(1, ldx(4, R0, R1, 0), exit_())))
    assert lines[0] == "prog 1: return values unknown"
    assert any("loaded from memory at pc 0" in line for line in lines[1:])


# --- properties ----------------------------------------------------------------------------

# Opcodes the analysis knows, so that random programs get past the first instruction.
_KNOWN_CODES = [
    0x07, 0x0F, 0x17, 0x1F, 0x27, 0x37, 0x47, 0x4F, 0x57, 0x5F, 0x67, 0x77, 0x87, 0x97, 0xA7,
    0xAF, 0xB7, 0xBF, 0xC7, 0x04, 0x0C, 0xB4, 0xBC, 0x54, 0xD4, 0xDC, 0xD7,
    0x05, 0x06, 0x15, 0x1D, 0x25, 0x2D, 0x35, 0x45, 0x55, 0x5D, 0x65, 0x75, 0xA5, 0xB5, 0xC5,
    0xD5, 0x16, 0x1E, 0x26, 0x56, 0x66, 0xE5,
    0x85, 0x95, 0x18, 0x00, 0x61, 0x69, 0x71, 0x79, 0x81, 0x62, 0x6A, 0x72, 0x7A,
    0x63, 0x6B, 0x73, 0x7B, 0xC3, 0xDB, 0xC2, 0x20, 0x28, 0x30, 0x40,
]  # fmt: skip

_instruction = st.builds(
    Instruction,
    code=st.one_of(st.sampled_from(_KNOWN_CODES), st.integers(0, 255)),
    dst=st.integers(0, 15),
    src=st.integers(0, 15),
    off=st.one_of(st.integers(-8, 8), st.integers(-(1 << 15), (1 << 15) - 1)),
    imm=st.one_of(
        st.sampled_from([0, 1, 2, 7, 12, 23, -1, 8, 16, 32, 64, 0xE1, 0xF1, 0x100, 0x110]),
        st.integers(-(1 << 31), (1 << 31) - 1),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    main=st.lists(_instruction, max_size=60),
    other=st.lists(_instruction, max_size=20),
    slots=st.dictionaries(st.integers(0, 3), st.sampled_from([1, 2, 3]), max_size=3),
)
def test_random_instruction_streams_never_raise(main, other, slots) -> None:
    limits = AnalysisLimits(max_insn_visits=20_000)
    programs = {1: program(1, insns=tuple(main)), 2: program(2, insns=tuple(other))}
    maps = {1: prog_array(1, slots), 2: MapInfo(2, 2, "array", "a", 4, 8, 1)}
    verdicts = analyse_program(1, programs, maps, HELPERS, limits)
    assert verdicts.prog_id == 1
    assert not any("internal error" in r for r in verdicts.unknown_reasons), verdicts
    if verdicts.values is not None:
        assert verdicts.values
        assert all(-(1 << 31) <= v < (1 << 31) for v in verdicts.values)
        assert all(e.values is not None for e in verdicts.exits)
    else:
        assert verdicts.unknown_reasons
    explain(verdicts)


# Soundness: on random loop-free programs of ALU operations and forward branches, the value a
# concrete run returns is always in the analysed set.

_ALU_CODES = [
    0x07, 0x17, 0x27, 0x37, 0x47, 0x57, 0x67, 0x77, 0x87, 0x97, 0xA7, 0xB7, 0xC7,
    0x0F, 0x1F, 0x2F, 0x3F, 0x4F, 0x5F, 0x6F, 0x7F, 0x9F, 0xAF, 0xBF, 0xCF,
    0x04, 0x14, 0x24, 0x34, 0x44, 0x54, 0x64, 0x74, 0x84, 0x94, 0xA4, 0xB4, 0xC4,
    0x0C, 0x1C, 0x2C, 0x3C, 0x4C, 0x5C, 0x6C, 0x7C, 0x9C, 0xAC, 0xBC, 0xCC,
]  # fmt: skip
_JMP_OPS = [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xA0, 0xB0, 0xC0, 0xD0]
_M64 = (1 << 64) - 1


def _s(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _concrete_alu(op: int, x: int, y: int, bits: int) -> int:
    mask = (1 << bits) - 1
    x, y = x & mask, y & mask
    results = {
        0x00: lambda: x + y,
        0x10: lambda: x - y,
        0x20: lambda: x * y,
        0x30: lambda: x // y if y else 0,
        0x40: lambda: x | y,
        0x50: lambda: x & y,
        0x60: lambda: x << (y % bits),
        0x70: lambda: x >> (y % bits),
        0x80: lambda: -x,
        0x90: lambda: x % y if y else x,
        0xA0: lambda: x ^ y,
        0xB0: lambda: y,
        0xC0: lambda: _s(x, bits) >> (y % bits),
    }
    return results[op]() & mask


def _concrete_jump(op: int, x: int, y: int, bits: int) -> bool:
    mask = (1 << bits) - 1
    x, y = x & mask, y & mask
    sx, sy = _s(x, bits), _s(y, bits)
    return {
        0x10: x == y,
        0x20: x > y,
        0x30: x >= y,
        0x40: bool(x & y),
        0x50: x != y,
        0x60: sx > sy,
        0x70: sx >= sy,
        0xA0: x < y,
        0xB0: x <= y,
        0xC0: sx < sy,
        0xD0: sx <= sy,
    }[op]


STACK_BYTES = 32
_SIZE_CODES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_SIZE_OF = {v: k for k, v in _SIZE_CODES.items()}


def _run_concrete(code: tuple[Instruction, ...], inputs: list[int]) -> int:
    regs = [0] * 11
    for reg, value in zip((R1, R2, R3, R4), inputs, strict=False):
        regs[reg] = value & _M64
    stack = bytearray(STACK_BYTES)  # r10 points at its end
    pc = 0
    while True:
        insn = code[pc]
        cls, op = insn.code & 7, insn.code & 0xF0
        use_x = bool(insn.code & 0x08)
        if cls in (0x04, 0x07):
            bits = 64 if cls == 0x07 else 32
            operand = regs[insn.src] if use_x else insn.imm & (_M64 if bits == 64 else 0xFFFFFFFF)
            regs[insn.dst] = _concrete_alu(op, regs[insn.dst], operand, bits)
        elif cls in (0x01, 0x02, 0x03):
            size = _SIZE_OF[insn.code & 0x18]
            at = STACK_BYTES + insn.off
            if cls == 0x01:
                value = int.from_bytes(stack[at : at + size], "little")
                if insn.code & 0xE0 == 0x80:  # sign-extending load
                    value = _s(value, 8 * size) & _M64
                regs[insn.dst] = value
            else:
                value = regs[insn.src] if cls == 0x03 else insn.imm & _M64
                stack[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif insn.code == 0x95:
            return _s(regs[R0], 32)
        elif cls in (0x05, 0x06):
            bits = 64 if cls == 0x05 else 32
            operand = regs[insn.src] if use_x else insn.imm & _M64
            if _concrete_jump(op, regs[insn.dst], operand, bits):
                pc += insn.off
        pc += 1


@st.composite
def _memory_op(draw, registers):
    size = draw(st.sampled_from([1, 2, 4, 8]))
    off = -size * draw(st.integers(1, STACK_BYTES // size))
    kind = draw(st.sampled_from(["ldx", "ldsx", "stx", "st"]))
    if kind in ("ldx", "ldsx"):
        mode = 0x80 if kind == "ldsx" and size < 8 else 0x60
        return Instruction(0x01 | mode | _SIZE_CODES[size], draw(registers), R10, off, 0)
    if kind == "stx":
        return Instruction(0x63 | _SIZE_CODES[size], R10, draw(registers), off, 0)
    return Instruction(0x62 | _SIZE_CODES[size], R10, 0, off, draw(st.integers(-3, 9)))


@st.composite
def _straight_programs(draw):
    """Loop-free programs over r0-r4 and the stack, with inputs r1-r4."""
    length = draw(st.integers(1, 30))
    registers = st.integers(0, 4)
    imms = st.one_of(st.integers(-3, 8), st.sampled_from([-1, 31, 32, 63, 0x7FFFFFFF, -(1 << 31)]))
    body: list[Instruction] = [Instruction(0xB7, R0, 0, 0, draw(imms))]
    for pc in range(1, length):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            code = draw(st.sampled_from([0x05, 0x06])) | draw(st.sampled_from(_JMP_OPS))
            code |= draw(st.sampled_from([0, 0x08]))
            off = draw(st.integers(0, length - 1 - pc))
            insn = Instruction(code, draw(registers), draw(registers), off, draw(imms))
        elif kind <= 2:
            insn = draw(_memory_op(registers))
        else:
            code = draw(st.sampled_from(_ALU_CODES))
            insn = Instruction(code, draw(registers), draw(registers), 0, draw(imms))
        body.append(insn)
    body.append(Instruction(0x95, 0, 0, 0, 0))
    inputs = draw(st.lists(st.integers(0, _M64), min_size=4, max_size=4))
    return tuple(body), inputs


_ZERO_STACK = tuple(Instruction(0x7A, R10, 0, off, 0) for off in range(-8, -STACK_BYTES - 1, -8))


@settings(max_examples=600, deadline=None)
@given(case=_straight_programs())
def test_analysis_contains_every_concrete_result(case) -> None:
    code, inputs = case
    concrete = _run_concrete(code, inputs)
    # r1-r4 loaded from the context: unknown to the analysis.
    unknown_inputs = tuple(Instruction(0x79, reg, R1, 8 * reg, 0) for reg in (R4, R3, R2, R1))
    verdicts = analyse(program(1, insns=_ZERO_STACK + unknown_inputs + code))
    if verdicts.values is not None:
        assert concrete in verdicts.values, (verdicts, concrete)
    # Every input known: the analysis is exact.
    known_inputs = tuple(
        insn
        for reg, value in zip((R1, R2, R3, R4), inputs, strict=True)
        for insn in assemble(ld_imm64(reg, value))
    )
    exact = analyse(program(1, insns=_ZERO_STACK + known_inputs + code))
    assert exact.values == {concrete}, exact
