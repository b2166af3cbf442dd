"""The vendors, from vendors.yaml: who is who (each rule's own examples, and the names that only
look like a vendor's), the vendor-side fix for the hook a program is on, the order of the fixes,
the Datadog-side spellings (Helm, Operator), and the README table generated from the file."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcprio.analysis import remedies, vendor_table, vendors
from tcprio.analysis.datadog_settings import FIRST_RAW_PACKET_DEFAULT_ON, check_raw_handles
from tcprio.inputs import Log
from tcprio.model import (
    Classifier,
    ClassifierVerdict,
    Conflict,
    DatadogSettings,
    Direction,
    HookKind,
    Remedy,
    Setting,
    Severity,
    VerdictClass,
)

ROOT = Path(__file__).resolve().parent.parent
VENDORS_YAML = ROOT / "daemon" / "tcprio" / "data" / "vendors.yaml"
ENTRIES: list[dict[str, Any]] = yaml.safe_load(VENDORS_YAML.read_text())["vendors"]


def who(program: str | None, filter_name: str | None) -> str | None:
    found = vendors.identify_with_evidence(program, filter_name)
    return None if found is None else found[0].name


def cases(key: str, kind: str) -> list[tuple[str, Any]]:
    return [(entry["name"], name) for entry in ENTRIES for name in entry.get(key, {}).get(kind, [])]


# --- identity: every rule's examples, both ways ----------------------------------------------


@pytest.mark.parametrize(("vendor", "program"), cases("examples", "programs"))
def test_each_vendors_program_names(vendor: str, program: str) -> None:
    assert who(program, None) == vendor


@pytest.mark.parametrize(("vendor", "filter_name"), cases("examples", "filters"))
def test_each_vendors_filter_names(vendor: str, filter_name: str) -> None:
    assert who(None, filter_name) == vendor


@pytest.mark.parametrize(("vendor", "pair"), cases("examples", "pairs"))
def test_names_that_count_only_together(vendor: str, pair: list[str]) -> None:
    program, filter_name = pair
    assert who(program, filter_name) == vendor
    assert who(program, None) is None and who(None, filter_name) is None


@pytest.mark.parametrize(("vendor", "program"), cases("not_examples", "programs"))
def test_program_names_that_only_look_like_a_vendors(vendor: str, program: str) -> None:
    assert who(program, None) != vendor


@pytest.mark.parametrize(("vendor", "filter_name"), cases("not_examples", "filters"))
def test_filter_names_that_only_look_like_a_vendors(vendor: str, filter_name: str) -> None:
    assert who(None, filter_name) != vendor


@pytest.mark.parametrize(("vendor", "pair"), cases("not_examples", "pairs"))
def test_pairs_that_do_not_count(vendor: str, pair: list[str]) -> None:
    assert who(*pair) != vendor


def test_every_vendor_has_examples_and_its_table_words() -> None:
    for rule in vendors.default_rules():
        entry = next(e for e in ENTRIES if e["name"] == rule.name)
        assert entry.get("examples"), rule.name
        assert rule.hooks and rule.returns and rule.identified_by and rule.remedy_summary


def test_cilium_section_names_are_filter_names_only() -> None:
    """The kernel allows no '-' in a program name: `from-container` is only ever a filter's."""
    assert who("from-container", None) is None
    assert who(None, "bpf_lxc.o:[from-container]") == "Cilium"
    rule = vendors.rule_by_name("Cilium")
    assert rule is not None and [p.pattern for p in rule.programs] == ["cil_"]


def test_datadogs_look_alikes_are_nobodys() -> None:
    assert who("classifier_ingress_fw", None) is None
    assert who("classifier_ingress_fw", "classifier_ingress_0_4242") is None
    assert who("classifier_raw_packet_egress", None) == "Datadog"


def test_beyla_up_to_1_9_is_not_claimed_from_its_generic_program_names() -> None:
    assert who("app_egress", None) is None
    assert who("app_egress", "tc/app_egress") == "Beyla"


def test_aws_vpc_cni_policy_programs() -> None:
    rule = vendors.rule_by_name("AWS VPC CNI")
    assert rule is not None and rule.role == "datapath"
    assert who("handle_ingress", None) == "AWS VPC CNI"
    assert who("handle_ingress_v6", None) is None


# --- the vendor-side fix, by hook --------------------------------------------------------------

TERMINAL = ClassifierVerdict(VerdictClass.TERMINAL, ("TC_ACT_OK",), "returns TC_ACT_OK")
UNKNOWN = ClassifierVerdict(VerdictClass.UNKNOWN, (), "r0 loaded from memory")
SETTINGS = DatadogSettings(
    enabled=Setting(True, "default"),
    classifier_priority=Setting(10, "default"),
    classifier_handle=Setting(0, "default"),
)


def conflict(
    severity: Severity,
    vendor: str | None,
    hook: HookKind = HookKind.CLSACT,
    priority: int | None = 1,
    verdict: ClassifierVerdict = TERMINAL,
    recommended: int | None = None,
) -> Conflict:
    blocker = Classifier(
        hook=hook,
        position=0,
        prog_id=7,
        name="prog",
        vendor=vendor,
        verdict=verdict,
        priority=priority if hook is HookKind.CLSACT else None,
    )
    return Conflict(
        namespace="ns",
        interface="eth0",
        direction=Direction.EGRESS,
        severity=severity,
        blocker=blocker,
        datadog_priority=10,
        datadog_attached=True,
        message="m",
        recommended_priority=recommended,
    )


def summaries(found: tuple[Remedy, ...]) -> list[str]:
    return [r.summary for r in found]


def text_of(remedy: Remedy) -> str:
    return " ".join([remedy.summary, *remedy.extra])


def test_a_cilium_tcx_blocker_is_never_told_to_change_a_tc_priority() -> None:
    found = remedies.remedies_for(conflict(Severity.CRITICAL, "Cilium", HookKind.TCX), SETTINGS)
    assert "enable-tcx" in found[0].summary and "bpf.enableTCX=false" in found[0].summary
    assert all("bpf-filter-priority" not in text_of(r) for r in found)
    assert not any(r.summary.startswith("set Workload Protection's classifier priority")
                   for r in found)  # fmt: skip


def test_a_cilium_clsact_blocker_gets_bpf_filter_priority() -> None:
    found = remedies.remedies_for(conflict(Severity.CRITICAL, "Cilium"), SETTINGS)
    assert "bpf-filter-priority" in found[0].summary and "cilium#36172" in found[0].summary


@pytest.mark.parametrize(
    ("vendor", "hook", "words"),
    [
        ("Cilium", HookKind.NETKIT, "datapath-mode: veth"),
        ("Calico", HookKind.TCX, "bpfAttachType: TC"),
        ("Calico", HookKind.CLSACT, "49152"),
        ("Retina", HookKind.TCX, "enableTCX: off"),
        ("Retina", HookKind.CLSACT, "v0.0.8"),
        ("Beyla", HookKind.TCX, "BEYLA_BPF_TC_BACKEND=tc"),
        ("Beyla", HookKind.CLSACT, "past 1.9"),
        ("AWS VPC CNI", HookKind.CLSACT, "enableNetworkPolicy"),
    ],
)
def test_each_vendors_fix_fits_the_hook(vendor: str, hook: HookKind, words: str) -> None:
    remedy = remedies.vendor_remedy(vendor, hook)
    assert remedy is not None and words in remedy.summary and f"({hook})" in remedy.summary


def test_no_early_hook_fix_is_a_tc_priority() -> None:
    for rule in vendors.default_rules():
        for hook in ("tcx", "netkit", "xdp"):
            text = rule.remedy_for(hook) or ""
            assert "bpf-filter-priority" not in text, (rule.name, hook)


def test_a_hook_without_a_known_fix_gets_no_vendor_remedy() -> None:
    assert remedies.vendor_remedy("AWS VPC CNI", HookKind.TCX) is None
    assert remedies.vendor_remedy("Nobody", HookKind.CLSACT) is None
    assert remedies.vendor_remedy(None) is None


DISABLING = (
    "disable Workload Protection network detection",
    "disable Workload Protection entirely",
)


@pytest.mark.parametrize(
    "case",
    [
        conflict(Severity.CRITICAL, "Cilium", HookKind.TCX),
        conflict(Severity.CRITICAL, "Calico", HookKind.CLSACT),
        conflict(Severity.CRITICAL, None, HookKind.XDP),
        conflict(Severity.ERROR, "Calico", priority=5, recommended=4),
        conflict(Severity.ERROR, "Calico", priority=5),
        conflict(Severity.WARNING, "Cilium", priority=10, recommended=9),
        conflict(Severity.WARNING, "Cilium", HookKind.TCX, verdict=UNKNOWN),
        conflict(Severity.WARNING, None, priority=5, verdict=UNKNOWN),
    ],
)
def test_the_routine_fix_comes_first_and_disabling_last(case: Conflict) -> None:
    found = summaries(remedies.remedies_for(case, SETTINGS))
    assert found, "every conflict but info gets a fix"
    kept = [s for s in found if s not in DISABLING]
    assert found[: len(kept)] == kept, "disabling after everything else"
    assert [s for s in found if s in DISABLING] == [s for s in DISABLING if s in found]
    if case.severity is Severity.CRITICAL and case.blocker.vendor:
        assert found[0].startswith(f"reconfigure {case.blocker.vendor}")
    if case.recommended_priority is not None:
        assert found[0].startswith("set Workload Protection's classifier priority")
    if case.blocker.hook is not HookKind.CLSACT:
        assert not any("classifier priority" in s for s in found)


def test_a_tcx_conflict_with_a_recommended_priority_still_gets_no_priority() -> None:
    case = conflict(Severity.WARNING, "Cilium", HookKind.TCX, verdict=UNKNOWN, recommended=9)
    found = summaries(remedies.remedies_for(case, SETTINGS))
    assert not any("classifier priority" in s for s in found)


def test_info_gets_no_fix() -> None:
    assert remedies.remedies_for(conflict(Severity.INFO, "Cilium"), SETTINGS) == ()


# --- Datadog's side: Helm and the Operator ----------------------------------------------------

PRIO_ENV = "DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY"
ENABLED_ENV = "DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED"


def operator_env(snippet: str) -> list[dict[str, str]]:
    spec = yaml.safe_load(snippet)["spec"]
    return spec["override"]["nodeAgent"]["containers"]["system-probe"]["env"]


def test_the_priority_goes_on_the_system_probe_container_for_helm_and_the_operator() -> None:
    remedy = remedies.priority_remedy(9)
    helm = yaml.safe_load(remedy.helm_values)["agents"]["containers"]["systemProbe"]["env"]
    assert helm == [{"name": PRIO_ENV, "value": "9"}]
    assert operator_env(remedy.operator_values) == [{"name": PRIO_ENV, "value": "9"}]


def test_disabling_on_the_operator_is_the_variable_not_the_cws_network_field() -> None:
    remedy = remedies.disable_network_remedy()
    assert operator_env(remedy.operator_values) == [{"name": ENABLED_ENV, "value": "false"}]
    assert "network" not in yaml.safe_load(remedy.operator_values)["spec"].get("features", {})
    assert any("spec.features.cws.network.enabled: false` changes nothing" in e
               for e in remedy.extra)  # fmt: skip


def test_disabling_workload_protection_on_the_operator() -> None:
    remedy = remedies.disable_workload_protection_remedy()
    features = yaml.safe_load(remedy.operator_values)["spec"]["features"]
    assert features == {"cws": {"enabled": False}}


# --- raw packets: system-probe's own check of the two handles ------------------------------------


def raw_settings(raw: object, main: int, raw_handle: int, enabled: bool = True) -> dict:
    return {
        "enabled": Setting(enabled, "default"),
        "raw_packet_enabled": Setting(raw, "file:/etc/datadog-agent/system-probe.yaml:x"),
        "classifier_handle": Setting(main, "default"),
        "raw_classifier_handle": Setting(raw_handle, "env:DD_X"),
    }


@pytest.mark.parametrize(
    ("raw", "main", "raw_handle", "refused"),
    [
        (True, 0, 0, None),
        (True, 5, 6, None),
        (True, 5, 5, "they must differ"),
        (True, 5, 0, "both be 0 or both be set"),
        (True, 0, 6, "both be 0 or both be set"),
        (False, 5, 5, None),
    ],
)
def test_raw_packet_handles(raw: bool, main: int, raw_handle: int, refused: str | None) -> None:
    log = Log()
    check_raw_handles(raw_settings(raw, main, raw_handle), log)
    if refused is None:
        assert log.errors == []
    else:
        [line] = log.errors
        assert refused in line and "system-probe refuses" in line and "\n" not in line


def test_raw_handles_do_not_matter_when_network_detection_is_off() -> None:
    log = Log()
    check_raw_handles(raw_settings(True, 5, 5, enabled=False), log)
    assert log.errors == []


def test_raw_packets_and_handle_are_resolved_with_the_agents_precedence(tmp_path: Path) -> None:
    from tcprio import datadog

    probe = tmp_path / "system-probe.yaml"
    probe.write_text(
        "event_monitoring_config:\n  network:\n    classifier_handle: 7\n"
        "    raw_classifier_handle: 7\n"
    )
    s = datadog.resolve_settings(files=[probe], environ={}, scan_processes=False,
                                 host_root=tmp_path)  # fmt: skip
    assert s.raw_packet_enabled == Setting(True, "default")
    assert s.raw_classifier_handle is not None and s.raw_classifier_handle.value == 7
    assert any("must differ" in e for e in s.errors)
    off = datadog.resolve_settings(
        files=[probe], environ={"DD_EVENT_MONITORING_CONFIG_NETWORK_RAW_PACKET_ENABLED": "false"},
        scan_processes=False, host_root=tmp_path,
    )  # fmt: skip
    assert off.raw_packet_enabled == Setting(
        False, "env:DD_EVENT_MONITORING_CONFIG_NETWORK_RAW_PACKET_ENABLED"
    )
    assert not any("raw_classifier_handle" in e for e in off.errors)


def test_older_agents_default_raw_packets_off() -> None:
    from tcprio.analysis.datadog_settings import ConfigView, resolve

    version = ".".join(map(str, FIRST_RAW_PACKET_DEFAULT_ON))
    older = f"{FIRST_RAW_PACKET_DEFAULT_ON[0]}.{FIRST_RAW_PACKET_DEFAULT_ON[1] - 1}.0"
    assert (
        resolve(ConfigView((), {}), (version, "x"), Log()).settings["raw_packet_enabled"].value
        is True
    )
    assert (
        resolve(ConfigView((), {}), (older, "x"), Log()).settings["raw_packet_enabled"].value
        is False
    )


# --- the README table -------------------------------------------------------------------------


def test_the_readme_vendor_table_is_generated_from_vendors_yaml() -> None:
    readme = (ROOT / "README.md").read_text()
    assert vendor_table.table_in(readme) == vendor_table.render_table(), (
        "regenerate it: cd daemon && python -m tcprio.analysis.vendor_table --update ../README.md"
    )


def test_the_table_has_one_row_per_vendor_and_escapes_pipes() -> None:
    table = vendor_table.render_table()
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == [e["name"] for e in ENTRIES]
    assert all(r.count(" | ") == len(vendor_table.HEADER) - 1 for r in rows)


def test_updating_replaces_only_between_the_markers() -> None:
    text = f"a\n{vendor_table.START}\nold\n{vendor_table.END}\nb\n"
    assert vendor_table.with_table(text, "new\n") == (
        f"a\n{vendor_table.START}\nnew\n{vendor_table.END}\nb\n"
    )
    with pytest.raises(ValueError):
        vendor_table.with_table("no markers", "new\n")


# --- against the kernel: a Cilium-named program on tcx before Datadog's clsact classifier ---


@pytest.fixture
def cilium_on_tcx() -> Iterator[int]:
    """A program of our own named like Cilium's host program, returning TC_ACT_OK."""
    from tcprio.kernel import bpf_syscalls
    from tests.bpf_asm import assemble, ret
    from tests.test_bpf_syscalls import encode_insns

    fd = bpf_syscalls.prog_load_raw(
        bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, encode_insns(assemble(ret(0))), "cil_from_netdev"
    )
    yield fd
    os.close(fd)


def test_the_scan_gives_a_cilium_tcx_program_the_tcx_remedy(
    classifier_programs: object, cilium_on_tcx: int
) -> None:
    from tcprio.kernel import bpf_syscalls
    from tests.bpf_programs import attach_filter
    from tests.kernel import add_clsact, netns, veth_in_one
    from tests.test_cli import scan_json

    with netns("vtcx") as ns:
        veth_in_one(ns, "c0", "c1")
        add_clsact(ns, "c0")
        attach_filter(ns, "c0", Direction.EGRESS, 10, "classifier_egress",
                      filter_name=f"classifier_egress_0_{os.getpid()}")  # fmt: skip
        with ns.entered():  # the ifindex is the namespace's: attach from inside it
            ifindex = socket.if_nametoindex("c0")
            link = bpf_syscalls.tcx_attach(cilium_on_tcx, ifindex, Direction.EGRESS)
        try:
            status, doc = scan_json(ns)
        finally:
            os.close(link)
    assert status == 2
    [critical] = [c for c in doc["conflicts"] if c["severity"] == "critical"]
    assert critical["blocker_hook"] == "tcx" and critical["blocker"]["vendor"] == "Cilium"
    fixes = critical["remedies"]
    assert fixes[0]["summary"].startswith("reconfigure Cilium (tcx)")
    assert "bpf.enableTCX=false" in fixes[0]["summary"]
    assert all("bpf-filter-priority" not in json.dumps(fix) for fix in fixes)
    assert [f["summary"] for f in fixes[1:]] == list(DISABLING)
    assert fixes[1]["operator_values"] and "system-probe" in fixes[1]["operator_values"]
    assert any(n.startswith("Cilium runs on tcx here") for n in doc["notes"])
