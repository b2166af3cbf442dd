"""The verdict analysis of the real programs of bpf/classifiers.c, checked against the kernel.

Every program is fetched from the kernel (xlated code, maps, prog-array slots), analysed, and
run with BPF_PROG_TEST_RUN over a small packet corpus: every value the kernel returns must be in
the analysed set, and the verdict class must be the one the program was written to have.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from tcprio.analysis import semantics
from tcprio.analysis.verdicts import analyse_program, explain
from tcprio.kernel import bpf_syscalls
from tcprio.model import ClassifierVerdict, MapInfo, ProgramInfo, ProgramVerdicts, VerdictClass
from tests.bpf_programs import ClassifierPrograms

TERMINAL, TRANSPARENT = VerdictClass.TERMINAL, VerdictClass.TRANSPARENT

# --- a hand-made packet corpus ---------------------------------------------------------------

DST_MAC = bytes.fromhex("02000000000b")
SRC_MAC = bytes.fromhex("02000000000a")


def _ethernet(ethertype: int, payload: bytes) -> bytes:
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype) + payload


def _ipv4(protocol: int, l4: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        0x4000,
        64,
        protocol,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    return _ethernet(0x0800, header + l4)


def _ipv6(next_header: int, l4: bytes) -> bytes:
    src = bytes.fromhex("fd000000000000000000000000000001")
    dst = bytes.fromhex("fd000000000000000000000000000002")
    header = struct.pack("!IHBB16s16s", 0x60000000, len(l4), next_header, 64, src, dst)
    return _ethernet(0x86DD, header + l4)


def _tcp(payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload


def _udp(payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload


def _arp() -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        SRC_MAC,
        bytes([10, 0, 0, 1]),
        bytes(6),
        bytes([10, 0, 0, 2]),
    )
    return _ethernet(0x0806, body)


CORPUS: dict[str, bytes] = {
    "ipv4-tcp": _ipv4(6, _tcp()),
    "ipv4-udp": _ipv4(17, _udp(b"hello")),
    "ipv6-tcp": _ipv6(6, _tcp()),
    "ipv6-udp": _ipv6(17, _udp(b"hello")),
    "arp": _arp(),
    "ipv4-udp-large": _ipv4(17, _udp(bytes(1200))),  # > 1000 bytes: decide_by_length says OK
    "ipv6-tcp-large": _ipv6(6, _tcp(bytes(1100))),
}

# --- what each program should be -------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    verdict_class: VerdictClass
    terminal_actions: tuple[str, ...] = ()
    classid_mode: bool = False  # classify as cls_bpf without direct-action


EXPECTED: dict[str, Expected] = {
    "term_ok": Expected(TERMINAL, ("TC_ACT_OK",)),
    "term_shot": Expected(TERMINAL, ("TC_ACT_SHOT",)),
    "term_redirect": Expected(TERMINAL, ("TC_ACT_REDIRECT",)),
    "pass_unspec": Expected(TRANSPARENT),
    "pass_pipe": Expected(TRANSPARENT),
    "pass_42": Expected(TRANSPARENT),
    "by_packet": Expected(TERMINAL, ("TC_ACT_SHOT",)),
    "bpf2bpf_call": Expected(TERMINAL, ("TC_ACT_OK",)),
    "tail_entry": Expected(TERMINAL, ("TC_ACT_OK",)),
    "tail_target_ok": Expected(TERMINAL, ("TC_ACT_OK",)),
    "decide_by_length_sub": Expected(TERMINAL, ("TC_ACT_OK",)),
    "classid_match": Expected(TERMINAL, ("TC_ACT_OK",), classid_mode=True),
    "classid_none": Expected(TRANSPARENT, classid_mode=True),
    "classifier_egress": Expected(TRANSPARENT),
    "classifier_ingress": Expected(TRANSPARENT),
}

# What the corpus makes each program return, beyond "inside the analysed set".
EXPECTED_RUNS: dict[str, dict[str, int]] = {
    "by_packet": {name: 2 if name.startswith("ipv6") else -1 for name in CORPUS},
    "bpf2bpf_call": {name: 0 if name.endswith("large") else -1 for name in CORPUS},
    "tail_entry": dict.fromkeys(CORPUS, 0),
    "term_redirect": dict.fromkeys(CORPUS, 7),
}


# --- fetching what the kernel layer would fetch ----------------------------------------------


@dataclass
class Catalogue:
    programs: dict[int, ProgramInfo]
    maps: dict[int, MapInfo]
    helper_names: dict[int, str]


def _fetch(prog_ids: list[int]) -> Catalogue:
    programs: dict[int, ProgramInfo] = {}
    maps: dict[int, MapInfo] = {}
    pending = list(prog_ids)
    while pending:
        prog_id = pending.pop()
        if prog_id in programs:
            continue
        info = bpf_syscalls.prog_info(prog_id)
        programs[prog_id] = info
        for map_id in info.map_ids:
            if map_id not in maps:
                maps[map_id] = bpf_syscalls.map_info(map_id)
                pending.extend((maps[map_id].prog_array or {}).values())
    return Catalogue(programs, maps, bpf_syscalls.helper_symbols())


@pytest.fixture(scope="module")
def catalogue(classifier_programs: ClassifierPrograms) -> Catalogue:
    return _fetch([classifier_programs.prog_id(name) for name in classifier_programs.names])


@pytest.fixture(scope="module")
def analysed(
    classifier_programs: ClassifierPrograms, catalogue: Catalogue
) -> dict[str, ProgramVerdicts]:
    return {
        name: analyse_program(
            classifier_programs.prog_id(name),
            catalogue.programs,
            catalogue.maps,
            catalogue.helper_names,
        )
        for name in classifier_programs.names
    }


def _classify(name: str, values: frozenset[int] | None) -> ClassifierVerdict:
    if EXPECTED[name].classid_mode:
        return semantics.classify_clsact_classid(values, ())
    return semantics.classify_clsact_direct_action(values)


# --- the tests -------------------------------------------------------------------------------


def test_every_program_of_classifiers_c_has_an_expectation(
    classifier_programs: ClassifierPrograms,
) -> None:
    assert set(classifier_programs.names) == set(EXPECTED)


def test_the_kernel_shows_the_code_and_helper_names(catalogue: Catalogue) -> None:
    assert all(info.insns for info in catalogue.programs.values())
    if not catalogue.helper_names:
        pytest.fail("kallsyms shows no addresses: helper calls cannot be named")
    assert "bpf_redirect" in catalogue.helper_names.values()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kernel_results_are_inside_the_analysed_set(
    name: str, classifier_programs: ClassifierPrograms, analysed: dict[str, ProgramVerdicts]
) -> None:
    verdicts = analysed[name]
    assert verdicts.values is not None, "\n".join(explain(verdicts))
    fd = classifier_programs.fd(name)
    returned = {packet: bpf_syscalls.prog_test_run(fd, data) for packet, data in CORPUS.items()}
    for packet, value in returned.items():
        assert value in verdicts.values, (packet, value, explain(verdicts))
    if name in EXPECTED_RUNS:
        assert returned == EXPECTED_RUNS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_classification_matches_what_the_program_was_written_for(
    name: str, analysed: dict[str, ProgramVerdicts]
) -> None:
    expected = EXPECTED[name]
    verdict = _classify(name, analysed[name].values)
    assert verdict.verdict_class is expected.verdict_class, (verdict, explain(analysed[name]))
    assert verdict.terminal_actions == expected.terminal_actions, verdict


def test_tail_entry_gets_its_verdict_through_the_tail_call(
    classifier_programs: ClassifierPrograms, analysed: dict[str, ProgramVerdicts]
) -> None:
    verdicts = analysed["tail_entry"]
    target = classifier_programs.prog_id("tail_target_ok")
    through_tail_call = [e for e in verdicts.exits if e.prog_id == target]
    assert through_tail_call and all(e.values == {0} for e in through_tail_call)
    assert "tail call to prog" in through_tail_call[0].note
    assert verdicts.values == {-1, 0}  # -1 only when the slot is empty


def test_exact_sets_of_the_simple_programs(analysed: dict[str, ProgramVerdicts]) -> None:
    assert analysed["term_ok"].values == {0}
    assert analysed["term_shot"].values == {2}
    assert analysed["term_redirect"].values == {7}  # flags 0: never TC_ACT_SHOT
    assert analysed["pass_unspec"].values == {-1}
    assert analysed["pass_pipe"].values == {3}
    assert analysed["pass_42"].values == {42}
    assert analysed["by_packet"].values == {-1, 2}
    assert analysed["bpf2bpf_call"].values == {-1, 0}
    assert analysed["classid_match"].values == {0x10001}
    assert analysed["classid_none"].values == {0}
