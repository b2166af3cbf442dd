"""freplace: a BPF_PROG_TYPE_EXT program running instead of a program's global function.

The kernel keeps showing the target's original instructions, but runs the EXT program: a
classifier whose subprogram returns TC_ACT_UNSPEC looks transparent, and returns TC_ACT_OK once
an EXT program returning 0 replaces that subprogram. tcprio follows the freplace links it finds
(`kernel/bpf_syscalls/freplace.py`, `kernel/programs.py`) into the EXT program
(`analysis/verdicts/freplace.py`). First on hand-made images (pure), then against the kernel:
BTF, func_info, the EXT program, the link, BPF_PROG_TEST_RUN and run counters on real traffic.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest

from tcprio.analysis import semantics
from tcprio.analysis.verdicts import analyse_program, explain
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.programs import ProgramCatalogue, collect_programs
from tcprio.model import (
    ETH_P_ALL,
    ClassifierVerdict,
    Direction,
    ProgramInfo,
    ProgramVerdicts,
    VerdictClass,
)
from tcprio.scan import tail_call_state
from tests.bpf_asm import (
    R0,
    R1,
    assemble,
    call_helper,
    call_pseudo,
    exit_,
    jeq_imm,
    label,
    ret,
    tail_call_to,
)
from tests.bpf_programs import CLSACT_PARENT
from tests.freplace_programs import (
    EXT_ID,
    EXT_MAIN_ID,
    MAIN_ID,
    SUB_ID,
    Loaded,
    btf_blob,
    btf_load,
    ext_unavailable,
    for_loading,
    freplace_link,
    loaded,
    prog_load_btf,
)
from tests.kernel import TestNetns
from tests.test_bpf_syscalls import ipv4_udp_packet
from tests.test_run_counters import PACKETS, pair, send_udp  # noqa: F401 (fixture)
from tests.test_scan_kernel import datadog_settings, scan_only
from tests.test_verdicts import analyse, prog_array, program

TRANSPARENT, TERMINAL, UNKNOWN = (
    VerdictClass.TRANSPARENT, VerdictClass.TERMINAL, VerdictClass.UNKNOWN
)  # fmt: skip
SCHED_CLS, EXT = bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, bpf_syscalls.BPF_PROG_TYPE_EXT

# main: `return sub();`, sub (pc 2): `return TC_ACT_UNSPEC;`
CALLS_SUB = (call_pseudo("sub"), exit_(), label("sub"), ret(semantics.TC_ACT_UNSPEC))
SUB_PC = 2


def replaced(info: ProgramInfo, *entries: tuple[int, int]) -> ProgramInfo:
    return replace(info, replaced_functions=tuple(sorted(entries)))


def classify(verdicts: ProgramVerdicts) -> ClassifierVerdict:
    return semantics.classify_clsact_direct_action(verdicts.values, verdicts.known_values)


# --- the analysis, pure ------------------------------------------------------------------------


def test_without_a_link_the_original_subprogram_decides() -> None:
    verdicts = analyse(program(1, CALLS_SUB))
    assert verdicts.values == {-1}
    assert classify(verdicts).verdict_class is TRANSPARENT


@pytest.mark.parametrize(("ext_returns", "expected"), [(0, TERMINAL), (-1, TRANSPARENT)])
def test_a_call_to_a_replaced_function_returns_what_the_ext_program_returns(
    ext_returns: int, expected: VerdictClass
) -> None:
    target = replaced(program(1, CALLS_SUB), (SUB_PC, 9))
    verdicts = analyse(target, program(9, ret(ext_returns)))
    assert verdicts.values == {ext_returns}, explain(verdicts)
    # The EXT program's exit is the function's return: the program exits at its own pc 1.
    assert [(e.prog_id, e.pc) for e in verdicts.exits] == [(1, 1)]
    assert classify(verdicts).verdict_class is expected


def test_the_caller_goes_on_with_the_ext_programs_value() -> None:
    # `if (sub() == 0) return TC_ACT_SHOT; return TC_ACT_UNSPEC;`
    main = assemble(
        call_pseudo("sub"),
        jeq_imm(R0, 0, "drop"),
        ret(semantics.TC_ACT_UNSPEC),
        label("drop"),
        ret(semantics.TC_ACT_SHOT),
        label("sub"),
        ret(semantics.TC_ACT_UNSPEC),
    )
    sub_pc = 6
    assert analyse(program(1, insns=main)).values == {-1}
    verdicts = analyse(replaced(program(1, insns=main), (sub_pc, 9)), program(9, ret(0)))
    assert verdicts.values == {semantics.TC_ACT_SHOT}, explain(verdicts)


def test_a_replaced_main_function_is_the_whole_program() -> None:
    target = replaced(program(1, ret(semantics.TC_ACT_UNSPEC)), (0, 9))
    ext = program(9, jeq_imm(R1, 0, "ok"), ret(semantics.TC_ACT_SHOT), label("ok"), ret(0))
    verdicts = analyse(target, ext)
    assert verdicts.values == {0, 2}, explain(verdicts)
    assert {e.prog_id for e in verdicts.exits} == {9}
    assert all("freplace: EXT prog 9" in e.note for e in verdicts.exits)


@pytest.mark.parametrize(
    ("ext", "reason"),
    [
        (None, "EXT program's code is not available"),
        (ProgramInfo(9, "ext", "0" * 16, 28, "ext", 0, (), None, error="hidden"), "not available"),
        (ProgramInfo(9, "ext", "0" * 16, 28, "ext", 0, (), ()), "no instructions"),
    ],
)
def test_an_ext_program_that_cannot_be_followed_makes_the_call_unknown(
    ext: ProgramInfo | None, reason: str
) -> None:
    target = replaced(program(1, CALLS_SUB), (SUB_PC, 9))
    verdicts = analyse(target, *([ext] if ext else []))
    assert verdicts.values is None
    assert any(reason in r and "EXT prog 9" in r for r in verdicts.unknown_reasons), verdicts
    assert classify(verdicts).verdict_class is UNKNOWN


@pytest.mark.parametrize(("ext", "who"), [(9, "EXT prog 9"), (0, "links were not read")])
def test_a_replaced_function_that_cannot_be_placed_makes_the_program_unknown(
    ext: int, who: str
) -> None:
    target = replaced(program(1, CALLS_SUB), (-1, ext))
    verdicts = analyse(target, program(9, ret(0)))
    assert verdicts.values is None
    assert any(who in r and "cannot place" in r for r in verdicts.unknown_reasons), verdicts
    assert classify(verdicts).verdict_class is UNKNOWN


def test_a_tail_call_from_an_ext_program_replaces_the_function() -> None:
    """Like a tail call from the function itself: the program reached returns to its caller."""
    target = replaced(program(1, CALLS_SUB), (SUB_PC, 9))
    ext = program(9, tail_call_to(4, 0), ret(semantics.TC_ACT_UNSPEC))
    ext = replace(ext, map_ids=(4,))
    verdicts = analyse(
        target, ext, program(5, ret(semantics.TC_ACT_REDIRECT)), maps={4: prog_array(4, {0: 5})}
    )
    assert verdicts.values == {-1, 7}, explain(verdicts)


def test_a_tail_call_into_a_program_whose_main_function_is_replaced_follows_both() -> None:
    """An x86 tail call jumps past the patched entry (the original runs), and newer kernels
    refuse the combination (no extending a tail-call target, no extended program in a prog
    array). Both are followed: sound either way."""
    root = program(1, tail_call_to(4, 0), ret(semantics.TC_ACT_UNSPEC))
    root = replace(root, map_ids=(4,))
    callee = replaced(program(5, ret(semantics.TC_ACT_UNSPEC)), (0, 9))
    verdicts = analyse(root, callee, program(9, ret(0)), maps={4: prog_array(4, {0: 5})})
    assert verdicts.values == {-1, 0}, explain(verdicts)


def test_the_scan_cache_key_follows_freplace_links() -> None:
    """A verdict is reused only while the links are the same (they come and go)."""
    plain = program(1, CALLS_SUB)
    keys = {
        tail_call_state(1, ProgramCatalogue(programs={1: p, 9: program(9, ret(0))}))
        for p in (plain, replaced(plain, (SUB_PC, 9)), replaced(plain, (SUB_PC, 8)))
    }
    assert len(keys) == 3


# --- against the kernel --------------------------------------------------------------------------


def _target(fds: Loaded, btf_fd: int, name: str = "fr_target") -> int:
    """A classifier whose global function `sub_fn` returns TC_ACT_UNSPEC, after a call to
    bpf_get_smp_processor_id() that the verifier may inline (the function then moves)."""
    insns = assemble(
        call_helper(8),  # bpf_get_smp_processor_id
        call_pseudo("sub"),
        exit_(),
        label("sub"),
        ret(semantics.TC_ACT_UNSPEC),
    )
    return fds.add(prog_load_btf(SCHED_CLS, insns, name, btf_fd, [(0, MAIN_ID), (3, SUB_ID)]))


def _ext(fds: Loaded, btf_fd: int, target_fd: int, func_id: int, returns: int) -> int:
    """An EXT program returning `returns`, for the function `func_id` of the target (its own
    BTF function has the same prototype: the kernel checks)."""
    own = EXT_MAIN_ID if func_id == MAIN_ID else EXT_ID
    insns = assemble(ret(returns))
    return fds.add(prog_load_btf(EXT, insns, "fr_ext", btf_fd, [(0, own)], target_fd, func_id))


def _catalogue_and_verdicts(prog_id: int) -> tuple[ProgramCatalogue, ProgramVerdicts]:
    catalogue = collect_programs([prog_id])
    verdicts = analyse_program(
        prog_id, catalogue.programs, catalogue.maps, bpf_syscalls.helper_symbols()
    )
    return catalogue, verdicts


def test_func_starts_place_the_global_function_in_the_translated_image() -> None:
    """func_info's insn_off is rewritten with the image: it is where the xlated call lands."""
    with loaded() as fds:
        btf_fd = fds.add(btf_load(btf_blob()))
        prog_id = bpf_syscalls.prog_id_of_fd(_target(fds, btf_fd))
        insns = bpf_syscalls.prog_info(prog_id).insns
        assert insns is not None
        calls = [pc + i.off + 1 for pc, i in enumerate(insns) if i.code == 0x85 and i.src == 1]
        starts = bpf_syscalls.func_starts(prog_id)
        assert starts == {MAIN_ID: 0, SUB_ID: calls[0]}, (starts, calls)
        # Without a link: nothing replaced, and the original body decides.
        catalogue, verdicts = _catalogue_and_verdicts(prog_id)
        assert catalogue.programs[prog_id].replaced_functions == ()
        assert verdicts.values == {-1}, explain(verdicts)
        assert bpf_syscalls.prog_test_run(fds.fds[-1], ipv4_udp_packet()) == -1


def test_the_node_has_no_unreadable_links() -> None:
    found = bpf_syscalls.freplace_links()
    assert found.errors == ()
    assert all(link.ext_prog_id and link.target_prog_id for link in found.links)


@pytest.fixture(scope="module")
def ext_loadable() -> None:
    why = ext_unavailable()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize(("ext_returns", "expected"), [(0, TERMINAL), (-1, TRANSPARENT)])
def test_an_ext_program_replacing_the_subprogram_decides_and_tcprio_follows_it(
    ext_loadable, ext_returns: int, expected: VerdictClass
) -> None:
    with loaded() as fds:
        btf_fd = fds.add(btf_load(btf_blob()))
        target_fd = _target(fds, btf_fd)
        target_id = bpf_syscalls.prog_id_of_fd(target_fd)
        ext_fd = _ext(fds, btf_fd, target_fd, SUB_ID, ext_returns)
        ext_id = bpf_syscalls.prog_id_of_fd(ext_fd)
        link = fds.add(freplace_link(ext_fd, target_fd, SUB_ID))
        assert bpf_syscalls.prog_test_run(target_fd, ipv4_udp_packet()) == ext_returns

        found = [x for x in bpf_syscalls.freplace_links().links if x.target_prog_id == target_id]
        assert [(x.ext_prog_id, x.target_btf_id) for x in found] == [(ext_id, SUB_ID)]
        catalogue, verdicts = _catalogue_and_verdicts(target_id)
        sub_pc = bpf_syscalls.func_starts(target_id)[SUB_ID]
        assert catalogue.programs[target_id].replaced_functions == ((sub_pc, ext_id),)
        assert ext_id in catalogue.programs
        assert verdicts.values == {ext_returns}, explain(verdicts)
        assert classify(verdicts).verdict_class is expected

        os.close(link)  # the link goes: the original body runs again, and tcprio says so
        fds.fds.remove(link)
        assert bpf_syscalls.prog_test_run(target_fd, ipv4_udp_packet()) == -1
        catalogue, verdicts = _catalogue_and_verdicts(target_id)
        assert catalogue.programs[target_id].replaced_functions == ()
        assert verdicts.values == {-1}


def test_an_ext_program_replacing_the_main_function_is_the_program(ext_loadable) -> None:
    with loaded() as fds:
        btf_fd = fds.add(btf_load(btf_blob()))
        target_fd = _target(fds, btf_fd)
        target_id = bpf_syscalls.prog_id_of_fd(target_fd)
        ext_fd = _ext(fds, btf_fd, target_fd, MAIN_ID, semantics.TC_ACT_SHOT)
        fds.add(freplace_link(ext_fd, target_fd, MAIN_ID))
        assert bpf_syscalls.prog_test_run(target_fd, ipv4_udp_packet()) == semantics.TC_ACT_SHOT
        catalogue, verdicts = _catalogue_and_verdicts(target_id)
        assert catalogue.programs[target_id].replaced_functions[0][0] == 0
        assert verdicts.values == {semantics.TC_ACT_SHOT}, explain(verdicts)


def test_a_missing_ext_program_is_unknown_never_transparent(ext_loadable) -> None:
    """The catalogue could not read the EXT program (here: removed from it by hand)."""
    with loaded() as fds:
        btf_fd = fds.add(btf_load(btf_blob()))
        target_fd = _target(fds, btf_fd)
        target_id = bpf_syscalls.prog_id_of_fd(target_fd)
        ext_fd = _ext(fds, btf_fd, target_fd, SUB_ID, 0)
        fds.add(freplace_link(ext_fd, target_fd, SUB_ID))
        catalogue = collect_programs([target_id])
        programs = {k: v for k, v in catalogue.programs.items() if v.type != EXT}
        helpers = bpf_syscalls.helper_symbols()
        verdicts = analyse_program(target_id, programs, catalogue.maps, helpers)
        assert verdicts.values is None
        assert classify(verdicts).verdict_class is UNKNOWN


# --- run counters on real traffic ----------------------------------------------------------------


def _attach(ns: TestNetns, ifname: str, prio: int, prog_fd: int, name: str) -> None:
    """A direct-action cls_bpf filter on the egress of `ifname` (clsact), in a test namespace."""
    from pyroute2 import IPRoute

    with ns.entered(), IPRoute() as ipr:
        ipr.tc("add-filter", "bpf", socket.if_nametoindex(ifname), None, fd=prog_fd, name=name,
               parent=CLSACT_PARENT[Direction.EGRESS], classid=1, direct_action=True, prio=prio,
               protocol=ETH_P_ALL)  # fmt: skip


def _run_cnt(fd: int) -> int:
    return bpf_syscalls.prog_info_from_fd(fd, with_insns=False).run_cnt


def test_the_replaced_classifier_starves_the_next_one_and_the_scan_says_terminal(
    ext_loadable,
    pair: tuple[TestNetns, TestNetns],  # noqa: F811
) -> None:
    tx, rx = pair
    with loaded() as fds:
        btf_fd = fds.add(btf_load(btf_blob()))
        target_fd = _target(fds, btf_fd)
        counter_fd = fds.add(  # returns TC_ACT_UNSPEC: its run_cnt says whether it ran
            bpf_syscalls.prog_load_raw(SCHED_CLS, for_loading(assemble(ret(-1))), "fr_counter")
        )
        ext_fd = _ext(fds, btf_fd, target_fd, SUB_ID, semantics.TC_ACT_OK)
        fds.add(freplace_link(ext_fd, target_fd, SUB_ID))
        _attach(tx, "a0", 1, target_fd, "fr_target")
        _attach(tx, "a0", 2, counter_fd, "fr_counter")
        with bpf_syscalls.run_stats():
            before = (_run_cnt(target_fd), _run_cnt(counter_fd))
            arrived = send_udp(tx, rx, PACKETS)
            after = (_run_cnt(target_fd), _run_cnt(counter_fd))
        assert arrived == PACKETS  # TC_ACT_OK lets the packets through...
        assert after[0] - before[0] >= PACKETS
        assert after[1] == before[1]  # ...and ends the chain: priority 2 never runs
        scan = scan_only({tx.name}, datadog_settings(priority=2))
    hook = next(h for h in scan.result.hooks if h.interface == "a0")
    first = next(c for c in hook.classifiers if c.priority == 1)
    assert first.verdict.verdict_class is TERMINAL, first.verdict
    assert first.verdict.terminal_actions == ("TC_ACT_OK",)


# --- the daemon ----------------------------------------------------------------------------------


def _daemon_verdict(running, ns: TestNetns) -> str | None:
    for (name, labels), _ in running.metrics().items():
        found = dict(labels)
        if name == "tcprio_classifier_info" and found.get("netns") == ns.name:
            return found["verdict_class"]
    return None


def test_the_daemon_follows_an_freplace_link_without_a_resync(ext_loadable, tmp_path) -> None:
    """freplace links send no netlink event: the daemon's link poll sees one attached and
    closed, and /metrics flips terminal and back, with the full resync an hour away."""
    from tests.kernel import add_clsact, netns, veth_in_one
    from tests.test_daemon import daemon, find
    from tests.timing import wait_until

    with netns("d-fr") as ns, loaded() as fds:
        veth_in_one(ns, "fr0", "fr1")
        add_clsact(ns, "fr0")
        btf_fd = fds.add(btf_load(btf_blob()))
        target_fd = _target(fds, btf_fd)
        _attach(ns, "fr0", 1, target_fd, "fr_target")
        with daemon(tmp_path, resync=3600) as running:
            wait_until(lambda: _daemon_verdict(running, ns) == "transparent", "not transparent")
            ext_fd = _ext(fds, btf_fd, target_fd, SUB_ID, semantics.TC_ACT_OK)
            link_fd = freplace_link(ext_fd, target_fd, SUB_ID)
            try:
                wait_until(lambda: _daemon_verdict(running, ns) == "terminal", "never terminal")
            finally:
                os.close(link_fd)
            wait_until(lambda: _daemon_verdict(running, ns) == "transparent", "not back")
            assert find(running.metrics(), "tcprio_scans_total", kind="full") == [1.0]
