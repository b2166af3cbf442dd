"""Hidden classifiers (analysis/shadowing.py) against what the kernel does on real traffic.

Vendor-shaped programs of the test's own (named like Cilium's, Retina's, Beyla's, so that
data/vendors.yaml names them from the 15 characters the kernel keeps) sit on the egress hook of
a veth between two test namespaces; BPF run counters show which ran, and tcprio must say the
same: what it reports hidden ran 0 times, what it does not report ran for every packet.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator

import jsonschema
import pytest

from tcprio.analysis.shadowing import ObserverRule
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import Direction, Severity, Shadowing, ShadowKind
from tcprio.scan import Scan, run_scan
from tests.bpf_asm import assemble, ret
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth_in_one
from tests.test_bpf_syscalls import encode_insns
from tests.test_cli import schema, tcprio
from tests.test_daemon import daemon, find
from tests.test_run_counters import PACKETS, pair, send_udp
from tests.test_scan_kernel import datadog_settings

__all__ = ["pair"]  # the fixture, shared with test_run_counters

E = Direction.EGRESS
TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_PIPE = -1, 0, 2, 3


class Programs:
    """sched_cls programs that return one constant, loaded under vendor-like names."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def load(self, name: str, value: int) -> int:
        code = encode_insns(assemble(ret(value)))
        self.fds[name] = bpf_syscalls.prog_load_raw(
            bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, code, name
        )
        return self.fds[name]

    def prog_id(self, name: str) -> int:
        return bpf_syscalls.prog_id_of_fd(self.fds[name])

    def runs(self, name: str) -> int:
        return bpf_syscalls.prog_info(self.prog_id(name), with_insns=False).run_cnt

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def programs() -> Iterator[Programs]:
    loaded = Programs()
    try:
        yield loaded
    finally:
        loaded.close()


def attach(
    ns: TestNetns, prio: int, programs: Programs, name: str, value: int, ifname: str = "a0"
) -> None:
    fd = programs.load(name, value)
    # Filter name: what the kernel keeps of the program's name, as Retina and Beyla name theirs.
    attach_filter(ns, ifname, E, prio, name, prog_fd=fd, filter_name=name[:15])


def traffic(tx: TestNetns, rx: TestNetns, programs: Programs) -> tuple[int, dict[str, int]]:
    """Datagrams that arrived, and how many times each program ran meanwhile."""
    before = {n: programs.runs(n) for n in programs.fds}
    with bpf_syscalls.run_stats():
        arrived = send_udp(tx, rx, PACKETS)
    return arrived, {n: programs.runs(n) - before[n] for n in programs.fds}


def scan(ns: TestNetns, observers: tuple[ObserverRule, ...] = ()) -> Scan:
    def discover():
        return [n for n in discover_namespaces() if n.name == ns.name]

    return run_scan(discover=discover, settings=datadog_settings(), observers=observers)


def hidden_names(found: list[Shadowing]) -> list[str]:
    return [s.hidden.name for s in found]


def test_a_terminal_cni_filter_hides_an_observer_and_tcprio_says_so(pair, programs):
    """(a) Cilium-like at priority 1 returning TC_ACT_OK, Retina-like at priority 5."""
    tx, rx = pair
    attach(tx, 1, programs, "cil_from_container", TC_ACT_OK)
    attach(tx, 5, programs, "endpoint_egress_filter", TC_ACT_UNSPEC)
    arrived, runs = traffic(tx, rx, programs)
    assert arrived == PACKETS
    assert runs["cil_from_container"] >= PACKETS
    assert runs["endpoint_egress_filter"] == 0
    [s] = scan(tx).result.shadowings
    assert (s.kind, s.severity, s.hidden_label) == (
        ShadowKind.OBSERVER_HIDDEN, Severity.ERROR, "Retina",
    )  # fmt: skip
    assert s.hidden.prog_id == programs.prog_id("endpoint_egress_filter")
    assert s.blocker.prog_id == programs.prog_id("cil_from_container")
    assert s.blocker.vendor == "Cilium" and "at priority 1, before it," in s.message


def test_an_observer_returning_ok_bypasses_a_deny_all_policy_and_tcprio_says_so(pair, programs):
    """(b) Retina before v0.0.8 returned TC_ACT_OK at priority 1; Cilium's policy program at
    priority 2 drops everything, yet every datagram arrives: it never ran."""
    tx, rx = pair
    attach(tx, 1, programs, "host_egress_filter", TC_ACT_OK)
    attach(tx, 2, programs, "cil_to_container", TC_ACT_SHOT)
    arrived, runs = traffic(tx, rx, programs)
    assert arrived == PACKETS  # a deny-all policy, bypassed
    assert runs["host_egress_filter"] >= PACKETS and runs["cil_to_container"] == 0
    [s] = scan(tx).result.shadowings
    assert (s.kind, s.severity, s.hidden_label) == (
        ShadowKind.POLICY_BYPASS, Severity.CRITICAL, "Cilium",
    )  # fmt: skip
    assert s.blocker.vendor == "Retina" and "POLICY BYPASS" in s.message


def test_a_tcx_program_that_passes_bypasses_the_policy_of_every_clsact_filter(pair, programs):
    """Beyla-like in tcx returning TCX_PASS, Cilium's deny-all filter at priority 1."""
    tx, rx = pair
    attach(tx, 1, programs, "cil_from_container", TC_ACT_SHOT)
    fd = programs.load("beyla_tc_egress", TC_ACT_OK)
    with tx.entered():
        link = bpf_syscalls.tcx_attach(fd, socket.if_nametoindex("a0"), E)
    try:
        arrived, runs = traffic(tx, rx, programs)
        found = scan(tx).result.shadowings
    finally:
        os.close(link)
    assert arrived == PACKETS
    assert runs["beyla_tc_egress"] >= PACKETS and runs["cil_from_container"] == 0
    [s] = found
    assert s.kind is ShadowKind.POLICY_BYPASS and s.blocker.vendor == "Beyla"
    assert "runs in tcx, before every clsact filter" in s.message and "TCX_PASS" in s.message


def test_a_transparent_classifier_hides_nothing_and_tcprio_finds_nothing(pair, programs):
    """(c) OBI-like returning TC_ACT_PIPE (the next filter runs), then an observer, then the
    CNI: every one of them sees every datagram."""
    tx, rx = pair
    attach(tx, 1, programs, "obi_egress", TC_ACT_PIPE)
    attach(tx, 5, programs, "endpoint_egress_filter", TC_ACT_UNSPEC)
    attach(tx, 6, programs, "cil_from_container", TC_ACT_OK)
    arrived, runs = traffic(tx, rx, programs)
    assert arrived == PACKETS
    assert all(n >= PACKETS for n in runs.values()), runs
    result = scan(tx).result
    assert result.shadowings == []
    assert [c.vendor for h in result.hooks for c in h.classifiers] == ["Beyla", "Retina", "Cilium"]


def test_an_observer_named_by_the_configuration_is_reported_as_one(pair, programs, tmp_path):
    """Through the command line: --config's `observers:`, and the JSON keeps to its schema."""
    tx, rx = pair
    attach(tx, 1, programs, "term_any", TC_ACT_OK)
    attach(tx, 7, programs, "my_tap_egress", TC_ACT_UNSPEC)
    _, runs = traffic(tx, rx, programs)
    assert runs["term_any"] >= PACKETS and runs["my_tap_egress"] == 0
    config = tmp_path / "tcprio.yaml"
    config.write_text("observers:\n  - name: my-tap\n    programs: ['my_tap_*']\n")
    kinds = {}
    for args in ((), ("--config", str(config))):
        document = _scan_json(tx, *args)
        [entry] = document["shadowed"]
        kinds[args] = (entry["kind"], entry["hidden_label"])
        assert entry["hidden"]["name"] == "my_tap_egress" and entry["blocker"]["name"] == "term_any"
    assert list(kinds.values()) == [("hidden", ""), ("observer_hidden", "my-tap")]


def test_a_bad_configuration_costs_the_scan_only_its_observers(pair, programs, tmp_path):
    tx, _ = pair
    attach(tx, 1, programs, "term_any", TC_ACT_SHOT)
    attach(tx, 7, programs, "my_tap_egress", TC_ACT_UNSPEC)
    config = tmp_path / "tcprio.yaml"
    config.write_text("observers: [{name: my-tap}]\n")  # neither programs nor filters
    proc = tcprio("--scan", "--format", "json", "--netns", tx.name, "--config", str(config))
    assert proc.returncode in (0, 1, 2), proc.stderr
    assert "configuration ignored, no extra observers" in proc.stderr
    assert "needs programs or filters" in proc.stderr
    assert [e["kind"] for e in json.loads(proc.stdout)["shadowed"]] == ["hidden"]


def _scan_json(ns: TestNetns, *args: str) -> dict:
    proc = tcprio("--scan", "--format", "json", "--netns", ns.name, *args)
    assert proc.returncode in (0, 1, 2), proc.stderr
    assert proc.stderr == ""
    document = json.loads(proc.stdout)
    jsonschema.validate(document, schema())
    return document


def test_the_text_report_names_who_hides_what(pair, programs):
    tx, _ = pair
    attach(tx, 1, programs, "host_egress_filter", TC_ACT_OK)
    attach(tx, 2, programs, "cil_to_container", TC_ACT_SHOT)
    proc = tcprio("scan", "--netns", tx.name, "--color", "never", "--no-agent-process")
    lines = proc.stdout.splitlines()
    # the first screen: one group, who hides whom
    at = lines.index("OTHER CLASSIFIERS HIDDEN (1 hook, 1 cause)")
    assert lines[at + 1].startswith("  CRITICAL policy bypass: Cilium hidden by Retina (clsact")
    assert f"e.g. {tx.name}/a0 egress" in " ".join(lines[at + 1 : at + 5])
    # --detail: every one, as before
    proc = tcprio("scan", "--netns", tx.name, "--color", "never", "--detail", "--no-agent-process")
    lines = proc.stdout.splitlines()
    at = lines.index("HIDDEN CLASSIFIERS (1 policy bypass)")
    assert lines[at + 1].startswith(f"  CRITICAL {tx.name} / a0 egress [policy bypass]: Cilium")
    entry = " ".join(line.strip() for line in lines[at + 1 : at + 4])  # wrapped at 100 columns
    assert "Retina bpf classifier 'host_egress_fil'" in entry


def test_the_daemon_exports_them_and_takes_its_observers_from_its_configuration(tmp_path, programs):
    with daemon(tmp_path) as running, netns("d-shadow") as ns:
        veth_in_one(ns, "s0", "s1")
        add_clsact(ns, "s0")
        attach(ns, 1, programs, "host_egress_filter", TC_ACT_OK, ifname="s0")
        attach(ns, 2, programs, "cil_to_container", TC_ACT_SHOT, ifname="s0")
        attach(ns, 3, programs, "my_tap_egress", TC_ACT_UNSPEC, ifname="s0")
        where = {"netns": ns.name, "interface": "s0", "direction": "egress"}
        name = "tcprio_shadowed_classifiers"
        running.wait_for(
            "the policy bypass and the unnamed classifier hidden",
            lambda s: (
                find(s, name, **where, kind="policy_bypass", severity="critical",
                     hidden_vendor="Cilium", blocker_vendor="Retina") == [1.0]
                and find(s, name, **where, kind="hidden", hidden_vendor="") == [1.0]
            ),
        )  # fmt: skip
        with running.config.open("a") as config:
            config.write("observers:\n  - name: my-tap\n    programs: ['my_tap_*']\n")
        running.proc.send_signal(signal.SIGHUP)
        samples = running.wait_for(
            "the configured observer hidden",
            lambda s: (
                find(s, name, **where, kind="observer_hidden", hidden_vendor="my-tap") == [1.0]
            ),
        )
        assert find(samples, name, **where, kind="hidden") == []
