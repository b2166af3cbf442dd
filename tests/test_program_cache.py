"""The program cache shared by scans and the daemon: reuse what cannot change, not more."""

from __future__ import annotations

from tcprio.scan import ProgramCache
from tests.bpf_programs import ClassifierPrograms


def analyse(cache: ProgramCache, root: int):
    catalogue = cache.catalogue([root])
    return cache.verdicts(catalogue, [root])[root]


def test_verdicts_are_reused_until_a_tail_call_slot_changes():
    with ClassifierPrograms() as programs:  # its own prog array: the shared one stays intact
        root = programs.prog_id("tail_entry")
        cache = ProgramCache()
        first = analyse(cache, root)
        assert first.values == frozenset({-1, 0})
        assert analyse(cache, root) is first  # same slots: not analysed again

        programs.set_tail_call(0, "term_shot")
        assert analyse(cache, root).values == frozenset({-1, 2})

        programs.set_tail_call(0, None)
        emptied = analyse(cache, root)
        assert emptied.values is None  # the empty slot: unknown, not transparent
        assert emptied.known_values == frozenset({-1})


def test_an_empty_slot_is_unknown_because_the_kernel_runs_whatever_fills_it():
    """What the kernel does with tail_entry while verdict_jmp[0] is empty, then filled."""
    from tcprio.kernel import bpf_syscalls
    from tests.test_bpf_syscalls import ipv4_udp_packet

    with ClassifierPrograms() as programs:
        root, fd = programs.prog_id("tail_entry"), programs.fd("tail_entry")
        programs.set_tail_call(0, None)
        assert bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) == -1  # transparent today...
        assert analyse(ProgramCache(), root).values is None  # ...so tcprio says unknown
        programs.set_tail_call(0, "term_shot")  # the slot's owner fills it: no netlink event
        assert bpf_syscalls.prog_test_run(fd, ipv4_udp_packet()) == 2  # now it ends the chain


def test_program_infos_are_kept_and_unreachable_ones_forgotten(classifier_programs):
    cache = ProgramCache()
    ok, shot = classifier_programs.prog_id("term_ok"), classifier_programs.prog_id("term_shot")
    first = cache.catalogue([ok, shot])
    assert set(first.programs) == {ok, shot}
    again = cache.catalogue([ok])
    assert again.programs[ok] is first.programs[ok]
    assert set(cache.infos) == {ok}
