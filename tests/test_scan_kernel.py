"""The whole scan against a real scene: namespaces, veths, clsact, BCC programs, tcx links.

What tcprio reads is cross-checked with `tc -j` and `bpftool -j`; what it decides is checked
against the conflict each interface was built to show.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import DatadogSettings, Direction, HookKind, Setting, Severity, VerdictClass
from tcprio.scan import Scan, run_scan
from tests.bpf_programs import attach_filter, attach_tcx, requires_tcx, tcx_missing
from tests.kernel import TestNetns, add_clsact, netns, run, veth_in_one

E, IN = Direction.EGRESS, Direction.INGRESS


def datadog_settings(priority: int = 10, enabled: bool = True) -> DatadogSettings:
    return DatadogSettings(
        enabled=Setting(enabled, "test"),
        classifier_priority=Setting(priority, "test"),
        classifier_handle=Setting(0, "test"),
    )


@dataclass(frozen=True)
class Expect:
    """What one interface of the scene was built to show on its egress/ingress hook."""

    severities: tuple[Severity, ...]
    blocker_priorities: tuple[int | None, ...] = ()


# interface -> (direction, expected findings). Datadog's observer sits at priority 10 on each.
EXPECTED = {
    "crit1": (E, Expect((Severity.CRITICAL,), (1,))),
    "err5": (E, Expect((Severity.ERROR,), (5,))),
    "tcx1": (E, Expect((Severity.CRITICAL,), (None,))),
    "after20": (E, Expect(())),
    "transp": (E, Expect(())),
    "bypkt": (E, Expect((Severity.ERROR,), (5,))),
    "b2b": (E, Expect((Severity.ERROR,), (5,))),
    "tail": (E, Expect((Severity.ERROR,), (5,))),
    "nonda": (E, Expect((Severity.ERROR,), (5,))),
    "u32f": (IN, Expect((Severity.ERROR,), (5,))),
    "same10": (E, Expect((Severity.ERROR,), (10,))),
    "ingr1": (IN, Expect((Severity.CRITICAL,), (1,))),
    "chain1": (E, Expect(())),  # a terminal filter in chain 1 only runs if something jumps there
    "legacy": (IN, Expect((Severity.CRITICAL,), (1,))),  # legacy ingress qdisc, not clsact
}
if tcx_missing():  # kernels before 6.6: tcx1 keeps its Datadog observer only
    EXPECTED["tcx1"] = (E, Expect(()))


def _build_scene(ns: TestNetns, links: list[int]) -> None:
    for name in EXPECTED:
        veth_in_one(ns, name, f"{name}p")
        if name == "legacy":
            ns.tc("qdisc", "add", "dev", name, "ingress")
        else:
            add_clsact(ns, name)

    def dd(ifname: str, direction: Direction = E) -> None:
        prog = "classifier_egress" if direction is E else "classifier_ingress"
        attach_filter(ns, ifname, direction, 10, prog, filter_name=f"classifier/{direction}_1_2")

    attach_filter(ns, "crit1", E, 1, "term_ok")
    dd("crit1")
    attach_filter(ns, "err5", E, 5, "term_shot")
    dd("err5")
    if not tcx_missing():
        links.append(attach_tcx(ns, "tcx1", E, "pass_unspec"))
        links.append(attach_tcx(ns, "tcx1", E, "term_redirect"))
    dd("tcx1")
    dd("after20")
    attach_filter(ns, "after20", E, 20, "term_ok")
    attach_filter(ns, "transp", E, 6, "pass_unspec")
    attach_filter(ns, "transp", E, 7, "pass_pipe")
    attach_filter(ns, "transp", E, 8, "pass_42")
    dd("transp")
    attach_filter(ns, "bypkt", E, 5, "by_packet")
    dd("bypkt")
    attach_filter(ns, "b2b", E, 5, "bpf2bpf_call")
    dd("b2b")
    attach_filter(ns, "tail", E, 5, "tail_entry")
    dd("tail")
    attach_filter(ns, "nonda", E, 5, "classid_match", direct_action=False)
    attach_filter(ns, "nonda", E, 6, "classid_none", direct_action=False)
    dd("nonda")
    ns.tc("filter", "add", "dev", "u32f", "ingress", "prio", "5", "protocol", "all",
          "u32", "match", "u32", "0", "0", "flowid", "1:1")  # fmt: skip
    dd("u32f", IN)
    dd("same10")
    attach_filter(ns, "same10", E, 10, "term_ok")  # added last: heads priority 10's list
    attach_filter(ns, "ingr1", IN, 1, "term_redirect")
    dd("ingr1", IN)
    ns.tc("filter", "add", "dev", "chain1", "egress", "chain", "1", "prio", "1",
          "protocol", "all", "u32", "match", "u32", "0", "0", "flowid", "1:1")  # fmt: skip
    dd("chain1")
    attach_filter(ns, "legacy", IN, 1, "term_shot")
    dd("legacy", IN)


@dataclass
class Scene:
    ns: TestNetns
    scan: Scan


def scan_only(ns_names: set[str], settings: DatadogSettings | None = None) -> Scan:
    def discover():
        return [n for n in discover_namespaces() if n.name in ns_names]

    return run_scan(discover=discover, settings=settings or datadog_settings())


@pytest.fixture(scope="module")
def scene(classifier_programs) -> Iterator[Scene]:
    links: list[int] = []
    with netns("scan") as ns:
        try:
            _build_scene(ns, links)
            yield Scene(ns, scan_only({ns.name}))
        finally:
            for fd in links:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _hook(scan: Scan, ifname: str, direction: Direction):
    return next(
        h for h in scan.result.hooks if h.interface == ifname and h.direction is direction
    )


@pytest.mark.parametrize("ifname", sorted(EXPECTED))
def test_each_interface_shows_the_conflict_it_was_built_for(scene: Scene, ifname: str):
    direction, expect = EXPECTED[ifname]
    hook = _hook(scene.scan, ifname, direction)
    assert tuple(c.severity for c in hook.conflicts) == expect.severities, [
        c.message for c in hook.conflicts
    ]
    assert tuple(c.blocker.priority for c in hook.conflicts) == expect.blocker_priorities


def test_datadog_classifiers_are_recognised_where_they_sit(scene: Scene):
    for ifname, (direction, _) in EXPECTED.items():
        datadog = [c for c in _hook(scene.scan, ifname, direction).classifiers if c.is_datadog]
        assert len(datadog) == 1, ifname
        assert datadog[0].priority == 10 and datadog[0].vendor == "Datadog"
        assert datadog[0].verdict.verdict_class is VerdictClass.TRANSPARENT


VERDICT_CLASSES = {
    "term_ok": VerdictClass.TERMINAL,
    "term_shot": VerdictClass.TERMINAL,
    "term_redirect": VerdictClass.TERMINAL,
    "pass_unspec": VerdictClass.TRANSPARENT,
    "pass_pipe": VerdictClass.TRANSPARENT,
    "pass_42": VerdictClass.TRANSPARENT,
    "by_packet": VerdictClass.TERMINAL,
    "bpf2bpf_call": VerdictClass.TERMINAL,
    "tail_entry": VerdictClass.TERMINAL,
    "classid_match": VerdictClass.TERMINAL,
    "classid_none": VerdictClass.TRANSPARENT,
    "classifier_egress": VerdictClass.TRANSPARENT,
    "classifier_ingress": VerdictClass.TRANSPARENT,
}


def test_every_classifier_gets_the_verdict_class_of_its_program(scene: Scene):
    seen = set()
    for hook in scene.scan.result.hooks:
        for c in hook.classifiers:
            if c.kind != "bpf":
                assert c.kind == "u32" and c.verdict.verdict_class is VerdictClass.TERMINAL
                continue
            assert c.verdict.verdict_class is VerdictClass(VERDICT_CLASSES[c.name]), c
            seen.add(c.name)
    assert seen == set(VERDICT_CLASSES)


def test_terminal_actions_are_named(scene: Scene):
    actions = {
        c.name: set(c.verdict.terminal_actions)
        for h in scene.scan.result.hooks
        for c in h.classifiers
        if c.kind == "bpf" and c.hook is HookKind.CLSACT
    }
    assert actions["term_ok"] == {"TC_ACT_OK"}
    assert actions["term_shot"] == {"TC_ACT_SHOT"}
    assert actions["term_redirect"] == {"TC_ACT_REDIRECT"}  # flags 0: bpf_redirect cannot fail
    assert actions["by_packet"] == {"TC_ACT_SHOT"}
    assert actions["bpf2bpf_call"] == {"TC_ACT_OK"}
    assert actions["tail_entry"] == {"TC_ACT_OK"}


def test_one_recommended_priority_fixes_every_fixable_conflict(scene: Scene):
    # Fixable blockers sit at 5 and 10; priorities 1 and 5-8, 10, 20 are taken: 4 is free.
    assert scene.scan.result.recommended_priority == 4
    errors = [c for c in scene.scan.result.conflicts if c.severity is Severity.ERROR]
    assert errors and all(c.recommended_priority == 4 for c in errors)


@requires_tcx
def test_tcx_order_and_links_are_reported(scene: Scene):
    tcx = [c for c in _hook(scene.scan, "tcx1", E).classifiers if c.hook is HookKind.TCX]
    assert [c.name for c in tcx] == ["pass_unspec", "term_redirect"]
    assert all(c.link_id for c in tcx)
    assert [c.verdict.verdict_class for c in tcx] == [
        VerdictClass.TRANSPARENT,
        VerdictClass.TERMINAL,
    ]


# --- differential: what tcprio read equals what tc and bpftool say ---------------------------


def _tc_filters(ns: TestNetns, ifname: str, direction: Direction) -> list[tuple]:
    rows = []
    for entry in ns.tc_json("filter", "show", "dev", ifname, str(direction)):
        options = entry.get("options")
        if not options or ("handle" not in options and "fh" not in options):
            continue
        if entry["kind"] == "u32" and "divisor" in json.dumps(options):
            continue
        prog = options.get("prog", {})
        handle = int(options.get("handle", options.get("fh", "0")).split(":")[-1] or "0", 16)
        rows.append(
            (entry["pref"], entry["kind"], entry.get("chain", 0), entry["protocol"],
             options.get("bpf_name"), prog.get("id"), prog.get("tag"),
             bool(options.get("direct-action", False)) if entry["kind"] == "bpf" else None,
             handle if entry["kind"] == "bpf" else None)
        )  # fmt: skip
    return rows


PROTOCOL_NAMES = {3: "all", 0x0800: "ip", 0x86DD: "ipv6"}


def _our_filters(scan: Scan, ns_name: str, ifname: str, direction: Direction) -> list[tuple]:
    inventory = next(i for i in scan.inventories if i.namespace.name == ns_name)
    interface = next(i for i in inventory.interfaces if i.name == ifname)
    hook = next(h for h in interface.hooks if h.direction is direction)
    return [
        (f.priority, f.kind, f.chain, PROTOCOL_NAMES[f.protocol], f.name, f.prog_id, f.tag,
         f.direct_action, f.handle if f.kind == "bpf" else None)
        for f in hook.filters
    ]  # fmt: skip


def _legacy_egress(interface, direction: Direction) -> bool:
    qdiscs = {h.direction: h.qdisc for h in interface.hooks}
    return direction is E and qdiscs[IN] == "ingress"


def test_filters_equal_tc_json_on_every_interface_and_direction(scene: Scene):
    inventory = next(i for i in scene.scan.inventories if i.namespace.name == scene.ns.name)
    compared = 0
    for interface in inventory.interfaces:
        for direction in Direction:
            theirs = _tc_filters(scene.ns, interface.name, direction)
            if _legacy_egress(interface, direction):
                # A legacy ingress qdisc answers an egress dump with its one (ingress) block:
                # tc shows the ingress filters again, though the kernel never runs them on egress.
                assert theirs == _tc_filters(scene.ns, interface.name, IN)
                theirs = []
            ours = _our_filters(scene.scan, scene.ns.name, interface.name, direction)
            assert ours == theirs, (interface.name, direction)
            compared += len(ours)
    assert compared >= 25


def test_tc_programs_equal_bpftool_net_show(scene: Scene):
    out = scene.ns.exec("bpftool", "-j", "net", "show").stdout
    theirs = set()
    for section in json.loads(out):
        for row in section.get("tc", []):
            direction = "ingress" if row["kind"].endswith("ingress") else "egress"
            if row["devname"] == "legacy" and direction == "egress":
                continue  # bpftool repeats a legacy ingress qdisc's filters as egress (see above)
            theirs.add((row["devname"], direction, row["id"]))
    inventory = next(i for i in scene.scan.inventories if i.namespace.name == scene.ns.name)
    ours = {
        (i.name, str(h.direction), f.prog_id)
        for i in inventory.interfaces
        for h in i.hooks
        for f in h.filters
        if f.kind == "bpf"
    }
    assert ours == theirs


@requires_tcx
def test_tcx_links_equal_bpftool_link_show(scene: Scene):
    links = json.loads(run("bpftool", "-j", "link", "show").stdout)
    by_id = {row["id"]: row for row in links}
    inventory = next(i for i in scene.scan.inventories if i.namespace.name == scene.ns.name)
    entries = [t for i in inventory.interfaces for h in i.hooks for t in h.tcx]
    assert len(entries) == 2
    for entry in entries:
        assert by_id[entry.link_id]["prog_id"] == entry.prog_id


def test_programs_equal_bpftool_prog_show(scene: Scene):
    for prog_id, info in scene.scan.catalogue.programs.items():
        theirs = json.loads(run("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)
        # The kernel keeps 15 characters of a name; bpftool prints the full one from BTF.
        assert (info.full_name or info.name) == theirs["name"]
        assert theirs["name"].startswith(info.name) and len(info.name) <= 15
        assert info.tag == theirs["tag"]
        assert info.type_name == theirs["type"]
        assert list(info.map_ids) == theirs.get("map_ids", [])
        assert info.insns is not None and len(info.insns) * 8 == theirs["bytes_xlated"]


def test_chains_and_legacy_ingress_qdiscs_are_read(scene: Scene):
    inventory = next(i for i in scene.scan.inventories if i.namespace.name == scene.ns.name)
    interfaces = {i.name: i for i in inventory.interfaces}
    legacy = {h.direction: h.qdisc for h in interfaces["legacy"].hooks}
    assert legacy == {IN: "ingress", E: None}
    chained = [f for h in interfaces["chain1"].hooks for f in h.filters if f.kind == "u32"]
    assert [(f.chain, f.priority) for f in chained] == [(1, 1)]


def test_tail_call_targets_are_fetched(scene: Scene):
    names = {info.name for info in scene.scan.catalogue.programs.values()}
    assert "tail_target_ok" in names  # reached only through verdict_jmp[0]


# --- robustness ------------------------------------------------------------------------------


def test_a_namespace_vanishing_mid_scan_is_skipped(classifier_programs):
    with netns("stay") as stay, netns("vanish") as vanish:
        veth_in_one(stay, "v0", "v1")
        add_clsact(stay, "v0")
        attach_filter(stay, "v0", E, 1, "term_ok")
        wanted = {stay.name, vanish.name}
        found = [n for n in discover_namespaces() if n.name in wanted]
        subprocess.run(["ip", "netns", "del", vanish.name], check=True)
        scan = run_scan(discover=lambda: found, settings=datadog_settings(), assume_datadog=True)
    assert scan.vanished == [vanish.name]
    assert [i.namespace.name for i in scan.inventories] == [stay.name]
    assert [c.severity for c in scan.result.conflicts] == [Severity.CRITICAL]
    assert scan.errors == []
