"""The known incompatibilities, one row at a time, at their boundaries: versions (the vendor's,
the agent's), the kernel's release, and what was observed (a program on tcx is tcx mode)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from tcprio.analysis import remedies
from tcprio.analysis.incompatibilities import KNOWN, NodeFacts, check, known_incompatibilities
from tcprio.model import DatadogSettings, HookKind, Setting, VendorVersion

OLD_CILIUM, CILIUM_TCX, CALICO_TCX = KNOWN
CLSACT, TCX = frozenset({HookKind.CLSACT}), frozenset({HookKind.TCX})


def facts(
    vendor: str | None = None,
    version: str | None = None,
    agent: str | None = None,
    kernel: str | None = "6.18.0-1-amd64",
    observed: Mapping[str, frozenset[HookKind]] | None = None,
    configured: bool = True,
) -> NodeFacts:
    versions = (
        {vendor: VendorVersion(vendor, version, "image quay.io/x:v" + version)}
        if (vendor and version)
        else {}
    )
    return NodeFacts(versions, agent, kernel, observed or {}, configured)


@pytest.mark.parametrize(
    ("cilium", "agent", "flagged"),
    [
        ("1.9.18", "7.36.0", True),
        ("1.9.18", "7.39.1", True),
        ("1.9.18", "7.39.2", False),
        ("1.9.18", "7.35.9", False),
        ("1.10.0", "7.37.0", False),
        ("1.8.5", "7.38.0", True),
        ("1.9.18", None, False),
    ],
)
def test_cilium_up_to_1_9_with_agent_7_36_to_7_39_1(
    cilium: str, agent: str | None, flagged: bool
) -> None:
    line = check(OLD_CILIUM, facts("Cilium", cilium, agent))
    assert (line is not None) is flagged
    if line:
        assert "7.39.2" in line and f"Cilium {cilium}" in line and "image quay.io" in line


@pytest.mark.parametrize(
    ("cilium", "kernel", "flagged"),
    [
        ("1.16.0", "6.6.0", True),
        ("1.16.3", "6.18.0-1-amd64", True),
        ("1.15.9", "6.18.0", False),
        ("1.16.0", "6.5.13", False),
        ("1.17.1", None, False),
    ],
)
def test_cilium_1_16_with_tcx_on_kernel_6_6(cilium: str, kernel: str | None, flagged: bool) -> None:
    line = check(CILIUM_TCX, facts("Cilium", cilium, kernel=kernel))
    assert (line is not None) is flagged
    if line:
        assert "enable-tcx" in line and "Datadog's included" in line and "\n" not in line


def test_cilium_tcx_needs_datadog_configured_not_its_version() -> None:
    assert check(CILIUM_TCX, facts("Cilium", "1.16.0", agent=None)) is not None
    assert check(CILIUM_TCX, facts("Cilium", "1.16.0", configured=False)) is None


def test_cilium_seen_only_on_legacy_tc_is_not_in_tcx_mode() -> None:
    seen = {"Cilium": CLSACT}
    assert check(CILIUM_TCX, facts("Cilium", "1.16.0", observed=seen)) is None


def test_a_cilium_program_on_tcx_is_tcx_mode_without_any_version() -> None:
    line = check(CILIUM_TCX, facts(kernel=None, observed={"Cilium": TCX}))
    assert line is not None and line.startswith("Cilium runs on tcx here")
    assert "deletes the legacy tc filters on that device" in line
    assert check(CILIUM_TCX, facts(observed={"Cilium": TCX}, configured=False)) is None


@pytest.mark.parametrize(
    ("calico", "kernel", "flagged"),
    [
        ("3.31.0", "6.6.1", True),
        ("3.30.4", "6.18.0", False),
        ("3.31.0", "6.5.0", False),
    ],
)
def test_calico_3_31_in_tcx_mode(calico: str, kernel: str, flagged: bool) -> None:
    line = check(CALICO_TCX, facts("Calico", calico, kernel=kernel))
    assert (line is not None) is flagged
    if line:
        assert "bpfAttachType: TC" in line and "clsact qdisc" in line


def test_calico_on_tcx_is_flagged_by_observation() -> None:
    line = check(CALICO_TCX, facts(observed={"Calico": TCX}))
    assert line is not None and line.startswith("Calico runs on tcx here")
    assert check(CALICO_TCX, facts("Calico", "3.31.0", observed={"Calico": CLSACT})) is None


def test_rows_of_other_vendors_do_not_apply() -> None:
    assert known_incompatibilities(facts("Retina", "1.2.0", observed={"Retina": TCX})) == []


SETTINGS = DatadogSettings(
    enabled=Setting(True, "default"),
    classifier_priority=Setting(10, "default"),
    classifier_handle=Setting(0, "default"),
    agent_version="7.38.0",
)


def test_notes_from_versions_observation_and_what_cannot_be_checked() -> None:
    versions = {"Cilium": VendorVersion("Cilium", "1.9.3", "--cilium-version")}
    [line] = remedies.incompatibility_notes(SETTINGS, versions, {"Cilium": CLSACT}, "6.1.0")
    assert "Cilium 1.9.3 (--cilium-version)" in line and "7.38.0" in line
    [missing] = remedies.incompatibility_notes(SETTINGS, {}, {"Cilium": CLSACT}, "6.1.0")
    assert "cannot be checked without Cilium's version (--cilium-version)" in missing
    [tcx] = remedies.incompatibility_notes(SETTINGS, {}, {"Cilium": TCX}, "6.18.0")
    assert tcx.startswith("Cilium runs on tcx here")
    assert remedies.incompatibility_notes(SETTINGS, {}, {}, "6.18.0") == []
    off = remedies.incompatibility_notes(
        SETTINGS, {}, {"Cilium": TCX}, "6.18.0", datadog_configured=False
    )
    assert off == []
