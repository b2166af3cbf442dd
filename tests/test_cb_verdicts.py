"""Verdicts kept in skb->cb[] across a tail call (analysis/verdicts/ctx.py).

A CNI's drop notification stores the reason in cb[0] and the verdict in cb[1], tail-calls the
notification program, which returns cb[1]. The verifier rewrites `__sk_buff.cb[i]` to the
context pointer plus offsetof(struct sk_buff, cb) + offsetof(struct qdisc_skb_cb, data) + 4 * i,
read from the kernel's BTF. First on hand-assembled images (pure), then against the kernel:
BPF_PROG_TEST_RUN returns what the analysis says, and bpf/endpoint.c's drop stage is known.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcprio.analysis import semantics
from tcprio.analysis.verdicts import analyse_program, explain
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.btf import running_kernel_skb_cb_area
from tcprio.kernel.programs import collect_programs
from tcprio.model import MapInfo, ProgramInfo, ProgramVerdicts, VerdictClass
from tests.bpf_asm import (
    R0,
    R1,
    R2,
    R3,
    R6,
    R10,
    alu64_imm,
    assemble,
    atomic,
    call_helper,
    call_kfunc,
    call_pseudo,
    exit_,
    jeq_imm,
    jmp_imm,
    label,
    ld_map,
    ldx,
    mov64_imm,
    mov64_reg,
    ret,
    st_imm,
    stx,
    tail_call_to,
)
from tests.test_bpf_syscalls import encode_insns, ipv4_udp_packet

CB = 48  # offsetof(struct __sk_buff, cb): what a program's source writes
AREA = (48, 20)  # where the kernel keeps them from the context pointer (6.18 here: also 48)
CB1 = CB + 4
PROG_ARRAY, MAP = 3, 4
UNKNOWN_HELPER, SKB_HELPER, NEW_SKB_HELPER, LOOP, KFUNC = 99, 26, 300, 181, 200
HELPERS = {
    26: "bpf_skb_load_bytes",
    181: "bpf_loop",
    300: "bpf_skb_some_new_helper",
    200: "bpf_dynptr_from_skb",
}


def program(prog_id: int, *items, prog_type: int = 3) -> ProgramInfo:
    return ProgramInfo(
        id=prog_id,
        name=f"prog{prog_id}",
        tag="0" * 16,
        type=prog_type,
        type_name="sched_cls",
        load_time_ns=0,
        map_ids=(MAP,),
        insns=assemble(*items),
    )


def analyse(
    *programs: ProgramInfo, area: tuple[int, int] | None = AREA, slots: dict[int, int] | None = None
) -> ProgramVerdicts:
    table = {p.id: p for p in programs}
    array = MapInfo(MAP, PROG_ARRAY, "prog_array", "calls", 4, 4, 8, dict(slots or {0: 12}))
    return analyse_program(programs[0].id, table, {MAP: array}, HELPERS, ctx_cb=area)


def exit_values(verdicts: ProgramVerdicts, prog_id: int) -> set[frozenset[int] | None]:
    return {e.values for e in verdicts.exits if e.prog_id == prog_id}


def exit_note(verdicts: ProgramVerdicts, prog_id: int) -> str:
    return " | ".join(e.note for e in verdicts.exits if e.prog_id == prog_id)


RETURN_CB1 = [ldx(4, R0, R1, CB1), exit_()]  # `return skb->cb[1];`
ZERO_ARGUMENTS = [mov64_imm(reg, 0) for reg in range(1, 6)]


def store_then_tail_call(*stores) -> ProgramInfo:
    """`<stores>; tail_call(slot 0); return TC_ACT_UNSPEC;` (the failing call passes)."""
    return program(1, *stores, *tail_call_to(MAP, 0), *ret(-1))


# --- pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("verdict", [2, -1, 0, 7])
def test_a_verdict_stored_in_cb_before_a_tail_call_is_what_the_callee_returns(
    verdict: int,
) -> None:
    verdicts = analyse(store_then_tail_call(st_imm(4, R1, CB1, verdict)), program(12, *RETURN_CB1))
    assert exit_values(verdicts, 12) == {frozenset({verdict})}, explain(verdicts)
    assert verdicts.values == {verdict, -1}


def test_without_the_layout_or_for_another_program_type_cb_is_unknown() -> None:
    caller, callee = store_then_tail_call(st_imm(4, R1, CB1, 2)), program(12, *RETURN_CB1)
    for verdicts in (
        analyse(caller, callee, area=None),
        analyse(program(1, *caller.insns, prog_type=1), program(12, *RETURN_CB1, prog_type=1)),
    ):
        assert exit_values(verdicts, 12) == {None}
        assert "loaded from memory" in exit_note(verdicts, 12)


def test_the_offset_comes_from_the_layout_not_from_struct_sk_buff() -> None:
    verdicts = analyse(
        store_then_tail_call(st_imm(4, R1, 200 + 4, 2)),
        program(12, ldx(4, R0, R1, 200 + 4), exit_()),
        area=(200, 20),
    )
    assert exit_values(verdicts, 12) == {frozenset({2})}
    moved = analyse(
        store_then_tail_call(st_imm(4, R1, CB1, 2)), program(12, *RETURN_CB1), area=(200, 20)
    )
    assert exit_values(moved, 12) == {None}


def test_cb_read_at_a_programs_own_entry_is_unknown() -> None:
    verdicts = analyse(program(1, *RETURN_CB1))
    assert verdicts.values is None
    assert "skb->cb[1]" in exit_note(verdicts, 1) and "nothing set before" in exit_note(verdicts, 1)


def test_cb_set_on_one_path_only_keeps_the_verdict_as_a_may_fact() -> None:
    caller = program(
        1,
        ldx(4, R2, R1, 0),  # skb->len
        jeq_imm(R2, 100, "skip"),
        st_imm(4, R1, CB1, 2),
        label("skip"),
        *tail_call_to(MAP, 0),
        *ret(-1),
    )
    verdicts = analyse(caller, program(12, *RETURN_CB1))
    (callee_exit,) = (e for e in verdicts.exits if e.prog_id == 12)
    assert callee_exit.values is None and callee_exit.may_return == {2}
    assert "not set on every path" in callee_exit.note


@pytest.mark.parametrize(
    ("stores", "expected"),
    [
        ([st_imm(1, R1, CB1, 2)], None),  # one byte of four: the rest is whatever was there
        ([st_imm(4, R1, CB1, 0x100), st_imm(1, R1, CB1, 2)], 0x102),
        ([st_imm(4, R1, CB1, 0x1FF), st_imm(2, R1, CB1 + 2, 0)], 0x1FF),
        ([st_imm(4, R1, CB1, 2), st_imm(1, R1, CB1 + 3, 0x80)], -0x7FFFFFFE),
    ],
)
def test_narrow_stores_into_a_cb_word_are_exact_or_unknown(
    stores: list, expected: int | None
) -> None:
    verdicts = analyse(store_then_tail_call(*stores), program(12, *RETURN_CB1))
    assert exit_values(verdicts, 12) == {None if expected is None else frozenset({expected})}


def test_an_eight_byte_store_and_two_word_stores_join_per_word() -> None:
    """clang merges `cb[0] = reason; cb[1] = TC_ACT_SHOT;` into one 8-byte store on some paths
    and not on others; the words still join exactly."""
    caller = program(
        1,
        ldx(4, R2, R1, 0),
        jeq_imm(R2, 100, "words"),
        mov64_imm(R3, 2),
        alu64_imm("lsh", R3, 32),
        alu64_imm("or", R3, 0x97),  # cb[0] = 0x97 (the reason), cb[1] = 2 (TC_ACT_SHOT)
        stx(8, R1, R3, CB),
        *tail_call_to(MAP, 0),
        *ret(-1),
        label("words"),
        st_imm(4, R1, CB, 0x88),
        st_imm(4, R1, CB1, 2),
        *tail_call_to(MAP, 0),
        *ret(-1),
    )
    verdicts = analyse(caller, program(12, *RETURN_CB1))
    assert exit_values(verdicts, 12) == {frozenset({2})}, explain(verdicts)
    reason = analyse(caller, program(12, ldx(4, R0, R1, CB), exit_()))
    assert exit_values(reason, 12) == {frozenset({0x97, 0x88})}


def test_the_context_pointer_survives_copies_spills_and_calls() -> None:
    caller = program(
        1,
        mov64_reg(R6, R1),
        stx(8, R10, R6, -8),
        mov64_imm(R1, 0),
        ldx(8, R2, R10, -8),  # the context, reloaded
        st_imm(4, R2, CB1, 7),
        mov64_reg(R1, R6),
        call_pseudo("sub"),
        mov64_reg(R1, R6),
        *tail_call_to(MAP, 0),
        ldx(4, R0, R6, CB),  # what the subprogram stored
        exit_(),
        label("sub"),
        st_imm(4, R1, CB, 2),
        *ret(0),
    )
    verdicts = analyse(caller, program(12, *RETURN_CB1))
    assert exit_values(verdicts, 12) == {frozenset({7})}, explain(verdicts)
    assert exit_values(verdicts, 1) == {frozenset({2})}, explain(verdicts)


@pytest.mark.parametrize(
    ("call", "kept"),
    [
        ([call_helper(SKB_HELPER)], True),  # bpf_skb_load_bytes(skb, ...) leaves cb alone
        ([*ZERO_ARGUMENTS, call_helper(NEW_SKB_HELPER)], True),  # not given the context
        ([mov64_imm(R1, 0), call_helper(NEW_SKB_HELPER)], False),  # r2..r5 may hold it
        ([call_helper(NEW_SKB_HELPER)], False),  # given it, not known to leave cb alone
        ([mov64_imm(R1, 0), call_helper(UNKNOWN_HELPER)], False),  # a helper tcprio can't name
        ([mov64_imm(R1, 0), call_helper(LOOP)], False),  # a callback may reach the context
        ([call_kfunc(KFUNC)], False),
    ],
)
def test_helper_calls_that_may_write_cb_forget_it(call: list, kept: bool) -> None:
    code = program(1, mov64_reg(R6, R1), st_imm(4, R1, CB1, 2), *call, ldx(4, R0, R6, CB1), exit_())
    verdicts = analyse(code)
    assert exit_values(verdicts, 1) == ({frozenset({2})} if kept else {None}), explain(verdicts)


def test_stores_elsewhere_in_the_context_keep_cb_and_overlapping_ones_forget_it() -> None:
    mark, tc_classid_word = 8, 44
    kept = analyse(program(1, st_imm(4, R1, CB1, 2), st_imm(4, R1, mark, 1), *RETURN_CB1))
    assert exit_values(kept, 1) == {frozenset({2})}
    overlapping = analyse(program(1, st_imm(4, R1, CB, 2), st_imm(8, R1, tc_classid_word, 0),
                                  ldx(4, R0, R1, CB), exit_()))  # fmt: skip
    assert exit_values(overlapping, 1) == {None}
    past_the_end = analyse(program(1, st_imm(4, R1, CB + 16, 2), ldx(8, R0, R1, CB + 16), exit_()))
    assert exit_values(past_the_end, 1) == {None}
    atomic_add = analyse(
        program(1, st_imm(4, R1, CB1, 2), mov64_imm(R2, 1), atomic(4, R1, R2, CB1, 0),
                *RETURN_CB1)
    )  # fmt: skip
    assert exit_values(atomic_add, 1) == {None}


def test_cb_survives_a_failed_tail_call() -> None:
    caller = program(1, mov64_reg(R6, R1), st_imm(4, R1, CB1, 2), *tail_call_to(MAP, 1),
                     ldx(4, R0, R6, CB1), exit_())  # fmt: skip
    verdicts = analyse(caller, program(12, *RETURN_CB1), slots={1: 12})
    assert verdicts.values == {2}


# --- against the kernel ----------------------------------------------------------------------

SCHED_CLS = 3


@pytest.fixture(scope="module")
def kernel_area() -> tuple[int, int]:
    area = running_kernel_skb_cb_area()
    assert area is not None, "the running kernel's BTF shows no sk_buff.cb"
    return area


def test_the_kernel_rewrites_cb_accesses_to_the_btf_offset(kernel_area: tuple[int, int]) -> None:
    code = assemble(*[st_imm(4, R1, CB + 4 * i, i) for i in range(5)], ldx(2, R0, R1, CB + 6),
                    exit_())  # fmt: skip
    fd = bpf_syscalls.prog_load_raw(SCHED_CLS, encode_insns(code), "tcprio_cb_rw")
    try:
        xlated = bpf_syscalls.prog_xlated_bytes(bpf_syscalls.prog_id_of_fd(fd)) or b""
    finally:
        os.close(fd)
    insns = list(struct.iter_unpack("<BBhi", xlated))
    start, length = kernel_area
    assert length == 20
    assert [(c, off, imm) for c, _r, off, imm in insns[:5]] == [
        (0x62, start + 4 * i, i) for i in range(5)
    ]  # same size and mode, through the context register
    assert insns[5][0] == 0x69 and insns[5][2] == start + 6


class _Loaded:
    """A caller and a callee loaded in the kernel, the callee in slot 0 of a prog array."""

    def __init__(self, caller: list, callee: list) -> None:
        self.fds: list[int] = []
        self.map_fd = bpf_syscalls.prog_array_create(1)
        callee_fd = self._load(callee, "tcprio_cb_callee")
        bpf_syscalls.prog_array_set(self.map_fd, 0, callee_fd)
        self.caller_fd = self._load(
            [*caller, *ld_map(R2, self.map_fd), mov64_imm(R3, 0), call_helper(12), *ret(-1)],
            "tcprio_cb_caller",
        )

    def _load(self, items: list, name: str) -> int:
        fd = bpf_syscalls.prog_load_raw(SCHED_CLS, encode_insns(assemble(*items)), name)
        self.fds.append(fd)
        return fd

    def analyse(self, area: tuple[int, int]) -> ProgramVerdicts:
        root = bpf_syscalls.prog_id_of_fd(self.caller_fd)
        programs, maps, pending = {}, {}, [root]
        while pending:
            info = bpf_syscalls.prog_info(pending.pop())
            programs[info.id] = info
            for map_id in info.map_ids:
                maps[map_id] = bpf_syscalls.map_info(map_id)
                pending.extend(p for p in (maps[map_id].prog_array or {}).values()
                               if p not in programs)  # fmt: skip
        return analyse_program(root, programs, maps, bpf_syscalls.helper_symbols(), ctx_cb=area)

    def callee_id(self) -> int:
        return bpf_syscalls.prog_id_of_fd(self.fds[0])

    def close(self) -> None:
        for fd in (*self.fds, self.map_fd):
            os.close(fd)


@pytest.fixture
def loaded() -> Iterator[list[_Loaded]]:
    made: list[_Loaded] = []
    yield made
    for one in made:
        one.close()


def _ctx_with_cb(*words: int) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN with cb[] set (the kernel lets it be)."""
    return bytes(CB) + struct.pack("<5I", *(list(words) + [0] * (5 - len(words))))


@pytest.mark.parametrize(
    ("verdict", "verdict_class"),
    [(2, VerdictClass.TERMINAL), (-1, VerdictClass.TRANSPARENT), (7, VerdictClass.TERMINAL)],
)
def test_kernel_a_verdict_in_cb_across_a_tail_call(
    kernel_area: tuple[int, int], loaded: list[_Loaded], verdict: int, verdict_class: VerdictClass
) -> None:
    pair = _Loaded([st_imm(4, R1, CB1, verdict)], RETURN_CB1)
    loaded.append(pair)
    assert bpf_syscalls.prog_test_run(pair.caller_fd, ipv4_udp_packet()) == verdict
    verdicts = pair.analyse(kernel_area)
    assert exit_values(verdicts, pair.callee_id()) == {frozenset({verdict})}, explain(verdicts)
    assert verdicts.values == {verdict, -1}  # -1: the call fails once the slot is empty
    assert semantics.classify_clsact_direct_action(verdicts.values).verdict_class is verdict_class


def test_kernel_cb_read_before_anything_stored_is_unknown(
    kernel_area: tuple[int, int], loaded: list[_Loaded]
) -> None:
    pair = _Loaded([], RETURN_CB1)
    loaded.append(pair)
    for word in (0, 2, 0xFFFFFFFF):  # whatever cb[1] held when the program started
        returned = bpf_syscalls.prog_test_run(
            pair.caller_fd, ipv4_udp_packet(), ctx=_ctx_with_cb(0, word)
        )
        assert returned == struct.unpack("<i", struct.pack("<I", word))[0]
    verdicts = pair.analyse(kernel_area)
    assert exit_values(verdicts, pair.callee_id()) == {None}
    assert verdicts.values is None and "skb->cb[1]" in " ".join(verdicts.unknown_reasons)


@pytest.mark.parametrize(
    ("stores", "expected"),
    [
        ([st_imm(1, R1, CB1, 2)], None),
        ([st_imm(4, R1, CB1, 0x100), st_imm(1, R1, CB1, 2)], 0x102),
        ([mov64_imm(R2, 2), stx(2, R1, R2, CB1 + 2), st_imm(2, R1, CB1, 0)], 0x20000),
    ],
)
def test_kernel_narrow_stores_into_cb_are_exact_or_unknown(
    kernel_area: tuple[int, int], loaded: list[_Loaded], stores: list, expected: int | None
) -> None:
    pair = _Loaded(stores, RETURN_CB1)
    loaded.append(pair)
    returned = {
        bpf_syscalls.prog_test_run(pair.caller_fd, ipv4_udp_packet(), ctx=_ctx_with_cb(0, word))
        for word in (0, 0xAB00)
    }
    verdicts = pair.analyse(kernel_area)
    callee_exit = exit_values(verdicts, pair.callee_id())
    if expected is None:
        assert callee_exit == {None} and len(returned) == 2  # it depends on what was there
    else:
        assert callee_exit == {frozenset({expected})} and returned == {expected}


def test_kernel_the_endpoint_drop_stage_returns_the_verdict_its_caller_stored(
    kernel_area: tuple[int, int],
) -> None:
    """bpf/endpoint.c: from_container drops an unknown ethertype through send_drop (cb[1] =
    TC_ACT_SHOT, tail call to drop_notify, which returns cb[1])."""
    from tests.endpoint_programs import EndpointTemplate
    from tests.test_sharing import UNKNOWN_ETHERTYPE

    with EndpointTemplate() as template:
        endpoint = template.load_endpoint(0, ifindex=100)
        try:
            root = endpoint.prog_id("from_container")
            assert bpf_syscalls.prog_test_run(endpoint.fd("from_container"), UNKNOWN_ETHERTYPE) == 2
            catalogue = collect_programs([root])
            verdicts = analyse_program(
                root, catalogue.programs, catalogue.maps, bpf_syscalls.helper_symbols(),
                ctx_cb=kernel_area,
            )  # fmt: skip
            for stage in ("drop_notify", "trace_stage"):
                assert exit_values(verdicts, endpoint.prog_id(stage)) == {frozenset({2})}, stage
            assert verdicts.values == {0, 2, 7}, explain(verdicts)
        finally:
            endpoint.close()


_ACCESS = st.sampled_from(
    [(1, off) for off in range(20)]
    + [(2, off) for off in range(0, 20, 2)]
    + [(4, off) for off in range(0, 20, 4)] * 2
    + [(8, 0), (8, 8)]
)
_IMM = st.sampled_from([-1, 0, 1, 2, 7, 0x80, 0xFF, 0x102, 0x7FFFFFFF, -0x80000000])


@settings(max_examples=80, deadline=None)
@given(
    stores=st.lists(st.tuples(_ACCESS, _IMM, st.booleans()), max_size=6),
    load=_ACCESS,
    load_stored=st.booleans(),
    initial=st.lists(st.integers(0, 0xFFFFFFFF), min_size=5, max_size=5),
)
def test_kernel_random_cb_stores_and_loads_never_contradict_the_kernel(
    stores: list, load: tuple[int, int], load_stored: bool, initial: list[int]
) -> None:
    """Stores of every size into cb[] (some skipped on long packets), a tail call, a load of
    any size (often where a store went): whatever cb[] held before, the kernel's result is in
    the analysed set."""
    area = running_kernel_skb_cb_area()
    assert area is not None
    if load_stored and stores:
        load = stores[-1][0]
    caller: list = [ldx(4, R6, R1, 0)]  # skb->len
    for n, ((size, off), imm, guarded) in enumerate(stores):
        if guarded:
            skip = f"s{n}"
            caller += [jmp_imm("jgt", R6, 100, skip), st_imm(size, R1, CB + off, imm), label(skip)]
        else:
            caller.append(st_imm(size, R1, CB + off, imm))
    pair = _Loaded(caller, [ldx(load[0], R0, R1, CB + load[1]), exit_()])
    try:
        verdicts = pair.analyse(area)
        (callee_values,) = exit_values(verdicts, pair.callee_id())
        for packet in (ipv4_udp_packet(), ipv4_udp_packet(pad_to=200)):
            for words in (initial, [0] * 5):
                ctx = _ctx_with_cb(*words)
                returned = bpf_syscalls.prog_test_run(pair.caller_fd, packet, ctx=ctx)
                assert callee_values is None or returned in callee_values, explain(verdicts)
    finally:
        pair.close()
