"""A callback that a helper runs (bpf_loop, bpf_for_each_map_elem) may write anywhere in the
frame its pointer points into, below the pointer too: checked against the kernel.

Each program stores TC_ACT_UNSPEC (-1) in a stack slot below the pointer it hands to the
callback as its context, runs the callback, and returns the slot. BPF_PROG_TEST_RUN shows what
the kernel returns; tcprio analyses the program as the kernel shows it (xlated) and must never
call it transparent when the kernel shows it returning a chain-ending code.

What the verifier of 6.18 showed:
- a callback's address is `ld_imm64 rX, BPF_PSEUDO_FUNC` (src 4, imm: the function's offset
  from the instruction, pc + imm + 1); the program needs BTF and func_info ("missing btf
  func_info" otherwise), the callback a static FUNC `int (u64, void *)` here;
- the callback gets the pointer as a pointer into its caller's frame (`R2=fp[0]-8`) and may
  write through it at any aligned offset that stays in that frame: `*(u64 *)(r2 - 504) = 0`
  with r2 = fp-8 is accepted (fp-512, the bottom of the frame), `r2 - 512` is refused ("invalid
  write to stack R2 off=-520"), so is `r2 + 8` (off=0: above the frame) and `r2 - 4` for 8 bytes
  ("misaligned stack access");
- bpf_for_each_map_elem is never inlined, but the xlated image calls the map type's own
  `map_for_each_callback` (bpf_for_each_array_elem, bpf_for_each_hash_elem);
- bpf_loop with flags known to be 0 is inlined: the xlated image has no helper call, but a loop
  calling the callback as a BPF-to-BPF call, which tcprio follows (and stays exact); with flags
  the verifier cannot know (read from skb->mark here) the helper call stays, and tcprio only
  knows the callback may write anywhere in the frame (unknown);
- bpf_throw cannot be called from a callback ("bpf_throw kfunc (insn N) cannot be called from
  callback subprog 1").
Timers (bpf_timer_set_callback) need a map value holding a `struct bpf_timer` described in the
map's BTF: not built here (the analysis treats them like any helper it cannot name: whole frame).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

import pytest

from tcprio.analysis import semantics
from tcprio.analysis.verdicts import analyse_program, explain
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls.syscall import BpfCmd, MapCreateAttr, MapElemAttr, bpf
from tcprio.model import ClassifierVerdict, ProgramVerdicts, VerdictClass
from tests.bpf_asm import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R10,
    Item,
    alu64_imm,
    call_helper,
    call_pseudo,
    exit_,
    label,
    ld_func,
    ld_imm64,
    ldx,
    mov64_imm,
    mov64_reg,
    st_imm,
)
from tests.freplace_programs import (
    BTF_FUNC_STATIC,
    CTX,
    U64,
    VOID_PTR,
    BtfFunc,
    prog_load_functions,
)
from tests.test_bpf_syscalls import ipv4_udp_packet

SCHED_CLS = bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS
TRANSPARENT, TERMINAL, UNKNOWN = (
    VerdictClass.TRANSPARENT,
    VerdictClass.TERMINAL,
    VerdictClass.UNKNOWN,
)
BPF_LOOP, BPF_FOR_EACH_MAP_ELEM = 181, 164
# map type: the name the xlated image calls for bpf_for_each_map_elem
FOR_EACH_OPS = {1: "bpf_for_each_hash_elem", 2: "bpf_for_each_array_elem"}
POINTER = -8  # the callback's context: fp-8
SKB_MARK = 8  # offsetof(struct __sk_buff, mark): 0 in a test run without a context

MAIN = BtfFunc("main_fn", (CTX,))
LOOP_CALLBACK = BtfFunc("loop_cb", (U64, VOID_PTR), BTF_FUNC_STATIC)
MAP_CALLBACK = BtfFunc("map_cb", (VOID_PTR, VOID_PTR, VOID_PTR, VOID_PTR), BTF_FUNC_STATIC)
WRITER = BtfFunc("writer", (VOID_PTR,), BTF_FUNC_STATIC)


def _with_mark(mark: int) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN with only `mark` set."""
    ctx = bytearray(80)
    struct.pack_into("<I", ctx, SKB_MARK, mark)
    return bytes(ctx)


# --- the programs ------------------------------------------------------------------------------


def _flags(inlined: bool) -> Item:
    """bpf_loop's flags (r4): 0, which the verifier sees (it inlines the loop), or skb->mark,
    which it cannot (0 in a run without a context: the callback runs; bpf_loop refuses any
    other value with -EINVAL and does not call it)."""
    return mov64_imm(R4, 0) if inlined else ldx(4, R4, R6, SKB_MARK)


def _bpf_loop_caller(slot: int, inlined: bool) -> list[Item]:
    """`*(fp + slot) = -1; bpf_loop(1, loop_cb, fp - 8, flags); return *(fp + slot);`"""
    return [
        label("main"),
        mov64_reg(R6, R1),
        st_imm(8, R10, slot, semantics.TC_ACT_UNSPEC),
        mov64_imm(R1, 1),
        ld_func(R2, "loop_cb"),
        mov64_reg(R3, R10),
        alu64_imm("add", R3, POINTER),
        _flags(inlined),
        call_helper(BPF_LOOP),
        ldx(8, R0, R10, slot),
        exit_(),
    ]


def _loop_callback(write_at: int) -> list[Item]:
    """`*(u64 *)(ctx + write_at) = TC_ACT_OK; return 1;` (1: stop the loop)."""
    return [label("loop_cb"), st_imm(8, R2, write_at, semantics.TC_ACT_OK), *_ret(1)]


def _loop_callback_through_writer(write_at: int) -> list[Item]:
    """The callback hands its pointer on to a subprogram that writes below it."""
    return [
        label("loop_cb"),
        mov64_reg(R1, R2),
        call_pseudo("writer"),
        *_ret(1),
        label("writer"),
        st_imm(8, R1, write_at, semantics.TC_ACT_OK),
        *_ret(0),
    ]


def _ret(value: int) -> list[Item]:
    return [mov64_imm(R0, value), exit_()]


def _load_bpf_loop(slot: int, write_at: int, inlined: bool, through_writer: bool) -> int:
    callback = _loop_callback_through_writer if through_writer else _loop_callback
    items = [*_bpf_loop_caller(slot, inlined), *callback(write_at)]
    funcs = [("main", MAIN), ("loop_cb", LOOP_CALLBACK)]
    if through_writer:
        funcs.append(("writer", WRITER))
    return prog_load_functions(SCHED_CLS, items, "cb_loop", funcs)


def _one_entry_map(map_type: int) -> int:
    """A map (u32 -> u64) holding one entry: bpf_for_each_map_elem calls the callback once."""
    attr = MapCreateAttr(map_type=map_type, key_size=4, value_size=8, max_entries=1)
    fd = bpf(BpfCmd.MAP_CREATE, attr)
    key, value = ctypes.c_uint32(0), ctypes.c_uint64(0)
    update = MapElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    bpf(BpfCmd.MAP_UPDATE_ELEM, update)
    return fd


def _load_for_each(map_fd: int, slot: int, write_at: int) -> int:
    """`*(fp + slot) = -1; bpf_for_each_map_elem(map, map_cb, fp - 8, 0); return *(fp + slot);`
    with map_cb(map, key, value, ctx) writing TC_ACT_OK at ctx + write_at."""
    items = [
        label("main"),
        st_imm(8, R10, slot, semantics.TC_ACT_UNSPEC),
        ld_imm64(R1, map_fd, src=1),  # BPF_PSEUDO_MAP_FD
        ld_func(R2, "map_cb"),
        mov64_reg(R3, R10),
        alu64_imm("add", R3, POINTER),
        mov64_imm(R4, 0),
        call_helper(BPF_FOR_EACH_MAP_ELEM),
        ldx(8, R0, R10, slot),
        exit_(),
        label("map_cb"),
        st_imm(8, R4, write_at, semantics.TC_ACT_OK),
        *_ret(0),
    ]
    funcs = [("main", MAIN), ("map_cb", MAP_CALLBACK)]
    return prog_load_functions(SCHED_CLS, items, "cb_map", funcs)


# --- judging -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helpers() -> dict[int, str]:
    names = bpf_syscalls.helper_symbols()
    assert "bpf_loop" in names.values(), "kallsyms shows no bpf_loop"
    return names


def _analysed(fd: int, helpers: dict[int, str]) -> ProgramVerdicts:
    prog_id = bpf_syscalls.prog_id_of_fd(fd)
    info = bpf_syscalls.prog_info(prog_id)
    return analyse_program(prog_id, {prog_id: info}, {}, helpers)


def _classified(verdicts: ProgramVerdicts) -> ClassifierVerdict:
    return semantics.classify_clsact_direct_action(verdicts.values, verdicts.known_values)


def _helper_calls(fd: int, helpers: dict[int, str]) -> set[str]:
    """The helpers the xlated image calls, by name."""
    insns = bpf_syscalls.prog_info(bpf_syscalls.prog_id_of_fd(fd)).insns or ()
    calls = (i.imm for i in insns if i.code == 0x85 and i.src == 0)
    return {helpers.get(imm, f"imm {imm}").split(".", 1)[0] for imm in calls}


def _never_transparent_when_the_kernel_ends_the_chain(
    verdicts: ProgramVerdicts, returned: set[int]
) -> VerdictClass:
    """The rule, and soundness: a claimed set holds every value the kernel returned."""
    verdict = _classified(verdicts)
    if returned & semantics.CLSACT_TERMINAL_VALUES:
        assert verdict.verdict_class is not TRANSPARENT, (returned, explain(verdicts))
    if verdicts.values is not None:
        assert returned <= verdicts.values, (returned, explain(verdicts))
    return verdict.verdict_class


@pytest.fixture
def closing() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in reversed(fds):
        os.close(fd)


# --- bpf_loop ------------------------------------------------------------------------------------

# (slot of the verdict, where the callback writes relative to its pointer fp-8)
BELOW = (-16, -8)  # the slot just below the pointer
BOTTOM = (-512, -504)  # the bottom of the frame, the farthest the verifier allows
UNTOUCHED = (-16, 0)  # the callback writes at its pointer, not in the slot


@pytest.mark.parametrize("through_writer", [False, True], ids=["callback", "callback's callee"])
@pytest.mark.parametrize(("slot", "write_at"), [BELOW, BOTTOM], ids=["below", "frame bottom"])
def test_a_callback_writing_below_its_pointer_is_never_transparent(
    helpers: dict[int, str], closing: list[int], slot: int, write_at: int, through_writer: bool
) -> None:
    """Inlined bpf_loop (flags 0): the callback is a BPF-to-BPF call in the xlated image; tcprio
    follows it through the pointer and is exact: TC_ACT_OK, terminal."""
    fd = _load_bpf_loop(slot, write_at, inlined=True, through_writer=through_writer)
    closing.append(fd)
    assert "bpf_loop" not in _helper_calls(fd, helpers)  # the verifier inlined it
    returned = bpf_syscalls.prog_test_run(fd, ipv4_udp_packet())
    assert returned == semantics.TC_ACT_OK
    verdicts = _analysed(fd, helpers)
    assert _never_transparent_when_the_kernel_ends_the_chain(verdicts, {returned}) is TERMINAL
    assert verdicts.values == {semantics.TC_ACT_OK}, explain(verdicts)


@pytest.mark.parametrize("through_writer", [False, True], ids=["callback", "callback's callee"])
@pytest.mark.parametrize(("slot", "write_at"), [BELOW, BOTTOM], ids=["below", "frame bottom"])
def test_bpf_loop_left_as_a_helper_call_may_write_the_whole_frame(
    helpers: dict[int, str], closing: list[int], slot: int, write_at: int, through_writer: bool
) -> None:
    """Flags the verifier cannot know keep `call bpf_loop` in the image: tcprio does not follow
    the callback, it only knows it may write anywhere in the frame: unknown, never transparent.
    The kernel returns TC_ACT_OK with mark 0 (the callback ran) and -1 with mark 1 (bpf_loop
    refused the flags and did not call it)."""
    fd = _load_bpf_loop(slot, write_at, inlined=False, through_writer=through_writer)
    closing.append(fd)
    assert "bpf_loop" in _helper_calls(fd, helpers)
    returned = {
        bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()),
        bpf_syscalls.prog_test_run(fd, ipv4_udp_packet(), ctx=_with_mark(1)),
    }
    assert returned == {semantics.TC_ACT_OK, semantics.TC_ACT_UNSPEC}
    verdicts = _analysed(fd, helpers)
    assert _never_transparent_when_the_kernel_ends_the_chain(verdicts, returned) is UNKNOWN
    assert "may be written by the call" in " ".join(verdicts.unknown_reasons), explain(verdicts)


@pytest.mark.parametrize("inlined", [True, False], ids=["inlined", "helper call"])
def test_a_callback_that_leaves_the_slot_alone(
    helpers: dict[int, str], closing: list[int], inlined: bool
) -> None:
    """The callback writes at its pointer, not below: the kernel returns the -1 stored below.
    Inlined, tcprio sees the callback and stays exact (transparent); behind the helper call it
    cannot tell (unknown)."""
    fd = _load_bpf_loop(*UNTOUCHED, inlined=inlined, through_writer=False)
    closing.append(fd)
    returned = bpf_syscalls.prog_test_run(fd, ipv4_udp_packet())
    assert returned == semantics.TC_ACT_UNSPEC
    verdicts = _analysed(fd, helpers)
    verdict_class = _never_transparent_when_the_kernel_ends_the_chain(verdicts, {returned})
    if inlined:
        assert verdicts.values == {semantics.TC_ACT_UNSPEC}, explain(verdicts)
        assert verdict_class is TRANSPARENT
    else:
        assert verdict_class is UNKNOWN


def test_an_unidentified_helper_is_taken_to_run_a_callback(
    helpers: dict[int, str], closing: list[int]
) -> None:
    """The same helper-call program, analysed without the helpers' names (as when kallsyms
    hides addresses): the call may be one that runs a callback, so the whole frame is lost."""
    fd = _load_bpf_loop(*BELOW, inlined=False, through_writer=False)
    closing.append(fd)
    returned = bpf_syscalls.prog_test_run(fd, ipv4_udp_packet())
    verdicts = _analysed(fd, {})
    assert _never_transparent_when_the_kernel_ends_the_chain(verdicts, {returned}) is UNKNOWN
    assert "may be written by the call" in " ".join(verdicts.unknown_reasons), explain(verdicts)


# --- bpf_for_each_map_elem ---------------------------------------------------------------------


@pytest.mark.parametrize("map_type", sorted(FOR_EACH_OPS), ids=["hash", "array"])
@pytest.mark.parametrize(("slot", "write_at"), [BELOW, BOTTOM, UNTOUCHED])
def test_a_map_iteration_callback_writing_below_its_context(
    helpers: dict[int, str], closing: list[int], slot: int, write_at: int, map_type: int
) -> None:
    """bpf_for_each_map_elem is never inlined: its callback (ctx in r4) may write anywhere in
    the caller's frame, so tcprio says unknown whatever the callback does. Regression: the
    xlated image calls bpf_for_each_array_elem or _hash_elem (the verifier's rewrite), taken for
    a helper writing at and above its pointers only, and called the program transparent while
    the kernel returned TC_ACT_OK."""
    map_fd = _one_entry_map(map_type)
    closing.append(map_fd)
    fd = _load_for_each(map_fd, slot, write_at)
    closing.append(fd)
    # the verifier calls the map type's own map_for_each_callback
    assert _helper_calls(fd, helpers) == {FOR_EACH_OPS[map_type]}
    returned = bpf_syscalls.prog_test_run(fd, ipv4_udp_packet())
    touched = (slot, write_at) != UNTOUCHED
    assert returned == (semantics.TC_ACT_OK if touched else semantics.TC_ACT_UNSPEC)
    verdicts = _analysed(fd, helpers)
    assert _never_transparent_when_the_kernel_ends_the_chain(verdicts, {returned}) is UNKNOWN


def test_the_verifier_keeps_callback_writes_inside_the_callers_frame(closing: list[int]) -> None:
    """What the analysis may rely on: one slot past the bottom of the frame, above its top, or
    misaligned, and the verifier refuses the program."""
    for slot, write_at in ((-512, -512), (-16, 8), (-16, -4)):
        with pytest.raises(bpf_syscalls.BpfError) as refused:
            closing.append(_load_bpf_loop(slot, write_at, inlined=True, through_writer=False))
        assert "stack" in str(refused.value), refused.value
