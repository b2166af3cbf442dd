"""Datadog's classifier is Datadog's: exact program names, or its filter naming, never a prefix.

Datadog's programs are `classifier_egress`, `classifier_ingress` and the raw-packet ones; its
filters are named `<ELF section>_<uid>_<pid>` with every non-alphanumeric as `_`. A program named
`classifier_ingress_fw` is someone else's. The kernel keeps 15 characters of a program's name
(the full one comes from BTF when the program has it), so a cut name needs the filter name too.
Checked on names as tcprio reads them from the kernel, and on the rules alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tcprio.analysis import vendors
from tcprio.kernel import bpf_syscalls
from tcprio.model import Direction
from tests.bpf_asm import assemble, ret
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_bpf_syscalls import encode_insns
from tests.test_scan_kernel import datadog_settings, scan_only


def datadog(program: str | None, filter_name: str | None) -> str | None:
    """The evidence when the names are Datadog's classifier's, else None."""
    found = vendors.identify_with_evidence(program, filter_name)
    if found is None or not found[0].datadog_classifier:
        return None
    return found[1]


@pytest.mark.parametrize(
    "program",
    ["classifier_egress", "classifier_ingress", "classifier_raw_packet_egress",
     "classifier_raw_packet_ingress"],
)  # fmt: skip
def test_datadogs_full_program_names_are_enough(program: str) -> None:
    assert datadog(program, None) == f"program name {program}"
    assert datadog(program, "anything") == f"program name {program}"


@pytest.mark.parametrize(
    ("program", "filter_name"),
    [
        ("classifier_ingress_fw", None),  # a longer name, full from BTF
        ("classifier_ingress_fw", "classifier_ingress_fw"),
        ("classifier_ingress_fw", "classifier_ingress_0_4242"),  # its full name says otherwise
        ("classifier_egre", "classifier_egress"),  # cut name, filter not named like Datadog's
        ("classifier_egre", None),
        ("my_classifier_egress", None),
        (None, "classifier_egress"),
        (None, "classifier_egress_0_4242_x"),
        ("classifier_egre", "classifier_egress_0"),
    ],
)
def test_names_that_only_look_like_datadogs_are_not(program, filter_name) -> None:
    assert datadog(program, filter_name) is None


@pytest.mark.parametrize(
    ("program", "filter_name"),
    [
        ("classifier_egre", "classifier_egress_0_4242"),
        ("classifier_ingr", "classifier_ingress_0_17"),
        ("classifier_raw_", "classifier_raw_packet_ingress_1000_9"),
        (None, "classifier_egress_0_4242"),
    ],
)
def test_a_cut_or_missing_program_name_counts_with_datadogs_filter_name(
    program, filter_name
) -> None:
    evidence = datadog(program, filter_name)
    assert evidence is not None and f"filter name {filter_name}" in evidence


def test_other_vendors_say_which_name_matched() -> None:
    rule, evidence = vendors.identify_with_evidence("cil_from_container", None)
    assert rule.name == "Cilium" and "program name cil_from_container" in evidence


# --- names read from the kernel ------------------------------------------------------------------


@pytest.fixture
def raw_program() -> Iterator[int]:
    """A transparent program loaded without BTF as `classifier_ingress_fw`: the kernel keeps
    `classifier_ingr`, exactly what it keeps of Datadog's classifier_ingress."""
    fd = bpf_syscalls.prog_load_raw(
        bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS,
        encode_insns(assemble(ret(-1))),
        "classifier_ingress_fw",
    )
    yield fd
    os.close(fd)


@pytest.mark.parametrize(
    ("filter_name", "is_datadog"),
    [("classifier_ingress_fw", False), (f"classifier_ingress_0_{os.getpid()}", True)],
)
def test_the_scan_decides_from_the_names_the_kernel_reports(
    raw_program: int, filter_name: str, is_datadog: bool
) -> None:
    assert bpf_syscalls.prog_info(bpf_syscalls.prog_id_of_fd(raw_program)).name == (
        "classifier_ingr"
    )
    with netns("ident") as ns:
        veth_in_one(ns, "i0", "i1")
        add_clsact(ns, "i0")
        attach_filter(ns, "i0", Direction.INGRESS, 10, "x", prog_fd=raw_program,
                      filter_name=filter_name)  # fmt: skip
        scan = scan_only({ns.name}, datadog_settings())
    [classifier] = [c for h in scan.result.hooks for c in h.classifiers]
    assert classifier.filter_name == filter_name
    assert classifier.is_datadog is is_datadog
    if is_datadog:
        assert classifier.vendor == "Datadog"
        assert f"filter name {filter_name}" in classifier.vendor_evidence
        assert "cut to 15 characters" in classifier.vendor_evidence
    else:
        assert classifier.vendor is None and classifier.vendor_evidence == ""
