"""One analysis for programs that differ only in constants (analysis/verdicts/sharing.py).

Against the kernel: copies are loaded for real, tcprio fetches them like a scan does, and
BPF_PROG_TEST_RUN says what each copy returns. A shared verdict must be the copy's own, and a
copy whose constants decide its verdict must get its own analysis.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

import pytest

from tcprio.analysis import semantics
from tcprio.analysis.verdicts import analyse_program
from tcprio.analysis.verdicts.sharing import graph_shape, shape_diff
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.programs import collect_programs
from tcprio.model import Instruction, ProgramVerdicts, RawInstructions, VerdictClass
from tcprio.scan import ProgramCache
from tests.bpf_asm import (
    R0,
    R1,
    R2,
    alu64_imm,
    assemble,
    exit_,
    jeq_imm,
    label,
    ld_imm64,
    ldx,
    mov32_imm,
    mov64_imm,
    st_imm,
)
from tests.endpoint_programs import ENTRY_POINTS, STAGES, Endpoint, EndpointTemplate
from tests.test_bpf_syscalls import encode_insns, ipv4_udp_packet

ARP_PACKET = bytes(6) + bytes.fromhex("02000000000a") + b"\x08\x06" + bytes(28)
UNKNOWN_ETHERTYPE = bytes(6) + bytes.fromhex("02000000000a") + b"\x88\xb5" + bytes(46)


def _load(insns: tuple[Instruction, ...], name: str) -> int:
    return bpf_syscalls.prog_load_raw(
        bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, encode_insns(insns), name
    )


@contextlib.contextmanager
def loaded(*programs: tuple[Instruction, ...]) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for n, insns in enumerate(programs):
            fds.append(_load(insns, f"copy{n}"))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _classify(verdicts: ProgramVerdicts) -> VerdictClass:
    return semantics.classify_clsact_direct_action(
        verdicts.values, verdicts.known_values
    ).verdict_class


def _scan_verdicts(fds: list[int]) -> tuple[ProgramCache, list[int], dict[int, ProgramVerdicts]]:
    """What a scan's program cache decides for these programs (fetched from the kernel)."""
    ids = [bpf_syscalls.prog_id_of_fd(fd) for fd in fds]
    cache = ProgramCache()
    catalogue = cache.catalogue(ids)
    return cache, ids, cache.verdicts(catalogue, ids)


def _copy_with_constant(value: int, shape: str) -> tuple[Instruction, ...]:
    """A program whose verdict depends on `value`, in one of three ways."""
    if shape == "returned":  # r0 = value; exit
        return assemble(mov64_imm(R0, value), exit_())
    if shape == "compared":  # return value == 7 ? TC_ACT_OK : TC_ACT_UNSPEC
        return assemble(
            mov64_imm(R2, value), jeq_imm(R2, 7, "ok"), mov64_imm(R0, -1), exit_(),
            label("ok"), mov64_imm(R0, 0), exit_(),
        )  # fmt: skip
    if shape == "spilled":  # the value goes through the stack, 64-bit constant first
        return assemble(
            ld_imm64(R2, value), st_imm(8, 10, -8, 0), alu64_imm("add", R2, 0),
            mov64_imm(R0, 0), ldx(8, R0, 10, -8), alu64_imm("add", R0, value), exit_(),
        )  # fmt: skip
    raise ValueError(shape)


@pytest.mark.parametrize("shape", ["returned", "compared", "spilled"])
def test_copies_whose_constants_decide_the_verdict_each_get_their_own(shape: str) -> None:
    """Copy 0 is transparent (returns -1), copy 1 terminal (returns 0), in the kernel's eyes;
    they differ only in one constant, and tcprio must not hand one copy's verdict to the other."""
    values = {"returned": (-1, 0), "compared": (8, 7), "spilled": (-1, 0)}[shape]
    with loaded(*(_copy_with_constant(v, shape) for v in values)) as fds:
        returned = [bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) for fd in fds]
        assert returned == [-1, 0]  # the kernel: copy 0 lets the next filter run, copy 1 not
        cache, ids, verdicts = _scan_verdicts(fds)
        assert _classify(verdicts[ids[0]]) is VerdictClass.TRANSPARENT
        assert _classify(verdicts[ids[1]]) is VerdictClass.TERMINAL
        assert verdicts[ids[1]].values == frozenset({0})
        # the copies were recognised as copies, and the generic result refused (it lost the
        # constant): each was analysed on its own
        assert cache.shared.stats.generic == 1
        assert cache.shared.stats.analysed == 2
        assert cache.shared.stats.shared == 0


def test_copies_whose_constants_do_not_matter_share_one_analysis() -> None:
    """r1 = <per-copy constant> does not reach the verdict: one analysis serves every copy,
    and each copy's verdict names its own program."""
    copies = [assemble(mov64_imm(R1, 1000 + n), mov64_imm(R0, 2), exit_()) for n in range(5)]
    with loaded(*copies) as fds:
        assert {bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) for fd in fds} == {2}
        cache, ids, verdicts = _scan_verdicts(fds)
        assert [verdicts[i].values for i in ids] == [frozenset({2})] * 5
        assert all(verdicts[i].prog_id == i for i in ids)
        assert all(e.prog_id == i for i in ids for e in verdicts[i].exits)
        assert (cache.shared.stats.analysed, cache.shared.stats.generic) == (1, 1)
        assert cache.shared.stats.shared == 4


def test_other_code_is_not_a_copy() -> None:
    """Another operation, another register or a 32-bit move is other code: no sharing."""
    base = assemble(mov64_imm(R1, 5), mov64_imm(R0, 2), exit_())
    others = [
        assemble(alu64_imm("add", R1, 5), mov64_imm(R0, 2), exit_()),
        assemble(mov64_imm(R2, 5), mov64_imm(R0, 2), exit_()),
        assemble(mov64_imm(R1, 5), mov32_imm(R0, 2), exit_()),
    ]
    with loaded(base, *others) as fds:
        ids = [bpf_syscalls.prog_id_of_fd(fd) for fd in fds]
        catalogue = collect_programs(ids)
        shapes = [graph_shape(i, catalogue.programs, catalogue.maps) for i in ids]
        assert all(s is not None for s in shapes)
        for other in shapes[1:]:
            assert shape_diff(shapes[0], other) is None  # type: ignore[arg-type]


def test_kernel_images_are_kept_raw() -> None:
    """The scan keeps the kernel's bytes: no Instruction objects until one is asked for."""
    with loaded(assemble(mov64_imm(R0, 2), exit_())) as fds:
        info = bpf_syscalls.prog_info_from_fd(fds[0])
        assert isinstance(info.insns, RawInstructions)
        assert len(info.insns) == 2 and info.insns[0].imm == 2


# --- the CNI-shaped endpoint programs ----------------------------------------------------------


@pytest.fixture(scope="module")
def endpoints() -> Iterator[list[Endpoint]]:
    with EndpointTemplate() as template:
        loaded_endpoints: list[Endpoint] = []
        try:
            for index in range(3):
                loaded_endpoints.append(template.load_endpoint(index, ifindex=100 + index))
            yield loaded_endpoints
        finally:
            for endpoint in loaded_endpoints:
                endpoint.close()


def test_endpoint_programs_have_the_shapes_of_a_cni_datapath(endpoints: list[Endpoint]) -> None:
    ids = [endpoints[0].prog_id(name) for name in (*ENTRY_POINTS, *set(STAGES.values()))]
    catalogue = collect_programs(ids[:2])
    counts = sorted(len(catalogue.programs[i].insns or ()) for i in ids)
    assert len(catalogue.programs) == len(ids) >= 20  # both entry points reach every stage
    assert sum(n >= 1000 for n in counts) >= 6, counts  # stages of thousands of instructions


@pytest.mark.parametrize(
    ("entry", "packet", "expected"),
    [
        ("from_container", UNKNOWN_ETHERTYPE, 2),  # dropped: skb->cb verdict after a tail call
        ("from_container", ipv4_udp_packet(), 2),  # spoofed source address: dropped
        ("to_container", ARP_PACKET, 0),  # handed to the pod: TC_ACT_OK
    ],
)
def test_endpoint_entry_points_are_terminal_as_the_kernel_shows(
    endpoints: list[Endpoint], entry: str, packet: bytes, expected: int
) -> None:
    fd = endpoints[1].fd(entry)
    assert bpf_syscalls.prog_test_run(fd, packet) == expected
    _cache, ids, verdicts = _scan_verdicts([fd])
    assert expected in verdicts[ids[0]].known_values
    assert _classify(verdicts[ids[0]]) is VerdictClass.TERMINAL


def test_endpoint_copies_share_one_analysis_and_agree_with_their_own(
    endpoints: list[Endpoint],
) -> None:
    """Three endpoints: two concrete analyses (the entry points of the first), two generic
    ones, four shared verdicts; each shared verdict is what the copy's own analysis finds."""
    fds = [e.fd(name) for e in endpoints for name in ENTRY_POINTS]
    cache, ids, verdicts = _scan_verdicts(fds)
    stats = cache.shared.stats
    assert (stats.analysed, stats.generic, stats.shared) == (2, 2, 4)
    catalogue = cache.catalogue(ids)
    helpers = bpf_syscalls.helper_symbols()
    for prog_id in ids:
        own = analyse_program(
            prog_id, catalogue.programs, catalogue.maps, helpers, ctx_cb=cache.ctx_cb()
        )
        assert verdicts[prog_id].values == own.values
        assert set(verdicts[prog_id].exits) == set(own.exits)
        assert set(verdicts[prog_id].unknown_reasons) == set(own.unknown_reasons)


def test_endpoint_copies_differ_only_in_constants(endpoints: list[Endpoint]) -> None:
    ids = [e.prog_id("ipv4_from_lxc") for e in endpoints[:2]]
    raws = [bpf_syscalls.prog_xlated_bytes(i) for i in ids]
    assert raws[0] != raws[1]
    words = [struct.iter_unpack("<BBhi", raw or b"") for raw in raws]
    differing = [(a, b) for a, b in zip(*words, strict=True) if a != b]
    assert differing and all(a[:3] == b[:3] for a, b in differing)  # same code, other imm
