"""tcprio never changes the datapath: the kernel's state is identical before and after a scan, a
daemon run, a bundle and a self-test; and under strace, a scan sends no netlink or bpf command
that could change anything.

The state compared: in a test namespace full of classifiers, every qdisc and every filter
(`tc -j`), its tcx chains (`bpftool -j link show`, by program and link id); on the whole machine,
every loaded program and every BPF link (ids, types, names, tags).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio.model import Direction
from tests.bpf_programs import attach_filter, tcx_attached
from tests.kernel import TestNetns, add_clsact, netns, run, veth_in_one
from tests.test_daemon import free_port
from tests.timing import HANG_GUARD_S, wait_until

TCPRIO = [sys.executable, "-m", "tcprio"]
NO_DATADOG = ["--no-agent-process", "--no-datadog-config"]
E, IN = Direction.EGRESS, Direction.INGRESS
# The daemon's first periodic full resync comes 5 s (the shortest interval) after its first
# scan: about 5.1 s after it exports the scene here. 10x that, and more:
RESYNC_GUARD_S = 60.0
FULL_SCANS = re.compile(r'^tcprio_scans_total\{kind="full"\} (\S+)$', re.M)


def bpftool(*argv: str) -> list:
    return json.loads(run("bpftool", "-j", *argv).stdout or "[]")


def machine_state() -> dict:
    """Every program and link of the machine, as bpftool lists them (no run counters)."""
    programs = sorted(
        (p["id"], p["type"], p.get("name", ""), p.get("tag", "")) for p in bpftool("prog", "show")
    )
    links = sorted((k["id"], k["type"], k.get("prog_id", 0)) for k in bpftool("link", "show"))
    return {"programs": programs, "links": links}


def namespace_state(ns: TestNetns) -> dict:
    interfaces = [i["ifname"] for i in json.loads(ns.ip("-j", "link", "show").stdout)]
    return {
        "qdiscs": ns.tc_json("qdisc", "show"),
        "filters": {
            (ifname, direction): ns.tc_json("filter", "show", "dev", ifname, direction)
            for ifname in interfaces
            for direction in ("ingress", "egress")
        },
    }


def state(ns: TestNetns) -> dict:
    return {"machine": machine_state(), "namespace": namespace_state(ns)}


@pytest.fixture(scope="module")
def scene(classifier_programs) -> Iterator[TestNetns]:
    """A namespace with clsact and legacy ingress qdiscs, cls_bpf (da and not), u32 with an
    action, and a tcx link."""
    with netns("ro") as ns:
        veth_in_one(ns, "r0", "r1")
        veth_in_one(ns, "r2", "r3")
        add_clsact(ns, "r0")
        ns.tc("qdisc", "add", "dev", "r2", "ingress")
        attach_filter(ns, "r0", E, 1, "term_ok")
        attach_filter(ns, "r0", E, 10, "classifier_egress")
        attach_filter(ns, "r0", IN, 5, "classid_match", direct_action=False)
        ns.tc("filter", "add", "dev", "r0", "ingress", "prio", "7", "protocol", "ip", "u32",
              "match", "ip", "dst", "10.1.0.1/32", "classid", "1:1",
              "action", "mirred", "egress", "redirect", "dev", "r1")  # fmt: skip
        attach_filter(ns, "r2", IN, 1, "term_shot")
        with tcx_attached(ns, "r0", IN, "pass_unspec"):
            yield ns


def assert_unchanged(ns: TestNetns, before: dict, what: str) -> None:
    after = state(ns)
    assert after["namespace"] == before["namespace"], f"{what} changed the test namespace"
    assert after["machine"] == before["machine"], f"{what} changed the machine's programs/links"


def test_the_scene_is_what_the_comparison_sees(scene: TestNetns):
    """Guard against comparing nothing: the snapshot does hold the classifiers and the link."""
    snapshot = state(scene)
    filters = [f for entries in snapshot["namespace"]["filters"].values() for f in entries
               if "options" in f]  # fmt: skip
    assert len(filters) >= 5
    # Debian's bpftool 7.1 does not know tcx links by name: type 11 (BPF_LINK_TYPE_TCX)
    assert any(kind in ("tcx", 11) for _id, kind, _prog in snapshot["machine"]["links"])


def test_a_scan_changes_nothing(scene: TestNetns):
    before = state(scene)
    for shape in (["--explain"], ["--format", "json"]):
        proc = subprocess.run([*TCPRIO, "scan", *shape, *NO_DATADOG],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode in (0, 1, 2), proc.stderr
    assert_unchanged(scene, before, "tcprio --scan")


def test_a_daemon_run_changes_nothing(scene: TestNetns, tmp_path: Path):
    before = state(scene)
    port = free_port()
    config = tmp_path / "tcprio.yaml"
    config.write_text(
        f'web:\n  listen_address: "127.0.0.1:{port}"\nresync_interval_seconds: 5\n'
        "proc_sweep_interval_seconds: 0.5\ntcx_poll_interval_seconds: 0.2\n"
        "datadog: {config_files: [], scan_processes: false}\n"
        "metrics: {full_inventory: true}\n"  # the scene's own classifiers, tcx included
    )  # live_probe stays at its default (on): on this kernel it cannot attach
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([*TCPRIO, "--config", str(config)], stdout=err, stderr=err)

    def metrics() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            assert proc.poll() is None, log.read_text()
            return ""

    out = ""
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            out = metrics()
            if f'netns="{scene.name}"' in out and 'hook="tcx"' in out:
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        else:
            mine = [line for line in out.splitlines() if scene.name in line]
            raise AssertionError(f"the daemon never exported the scene: {mine[:5]}")

        def full_scans() -> float:
            found = FULL_SCANS.search(metrics())
            return float(found.group(1)) if found else 0.0

        # a full resync (the first periodic one, after the start's) and many tcx polls meanwhile
        wait_until(lambda: full_scans() >= 2, "a periodic full resync", RESYNC_GUARD_S, 0.2)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, log.read_text()
    assert_unchanged(scene, before, "the daemon")


def test_a_bundle_changes_nothing(scene: TestNetns, tmp_path: Path):
    before = state(scene)
    argv = [*TCPRIO, "bundle", "--yes", "--output", str(tmp_path / "b.tar.gz"),
            "--no-agent-process"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert_unchanged(scene, before, "tcprio bundle")


def test_the_self_test_creates_only_in_its_own_namespaces(scene: TestNetns):
    before = state(scene)
    proc = subprocess.run([*TCPRIO, "self-test", "--no-daemon-check", *NO_DATADOG],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # programs are freed after an RCU grace period once the scene's namespaces are gone
    deadline = time.monotonic() + HANG_GUARD_S
    while state(scene) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_unchanged(scene, before, "tcprio self-test")


# --- what a scan asks the kernel, seen by strace ------------------------------------------------

# bpf(2) commands that only read (or, for ENABLE_STATS, only switch counting on for the caller's
# lifetime); anything else (PROG_LOAD, MAP_CREATE, LINK_CREATE, *_UPDATE_ELEM, *_DELETE_ELEM,
# PROG_ATTACH, PROG_DETACH, LINK_UPDATE, LINK_DETACH, OBJ_PIN ...) would be a write.
READ_ONLY_BPF = {
    "BPF_PROG_GET_NEXT_ID", "BPF_MAP_GET_NEXT_ID", "BPF_LINK_GET_NEXT_ID", "BPF_BTF_GET_NEXT_ID",
    "BPF_PROG_GET_FD_BY_ID", "BPF_MAP_GET_FD_BY_ID", "BPF_LINK_GET_FD_BY_ID",
    "BPF_BTF_GET_FD_BY_ID", "BPF_OBJ_GET_INFO_BY_FD", "BPF_PROG_QUERY", "BPF_MAP_LOOKUP_ELEM",
    "BPF_MAP_GET_NEXT_KEY", "BPF_ENABLE_STATS",
}  # fmt: skip
NETLINK_TYPE = re.compile(r"nlmsg_type=(RTM_[A-Z]+|0x[0-9a-f]+|\d+)")
BPF_COMMAND = re.compile(r"\bbpf\((BPF_[A-Z_]+|0x[0-9a-f]+|\d+)")
RTM_NAMES = {"RTM_GETLINK": 18, "RTM_GETQDISC": 38, "RTM_GETTFILTER": 46}


def rtm_number(text: str) -> int:
    """strace names a message type only when it knows the socket is NETLINK_ROUTE, which it
    cannot for a socket opened in another namespace: then it prints the number."""
    if text in RTM_NAMES:
        return RTM_NAMES[text]
    if text.startswith("RTM_"):
        return -1  # a named type that is not one of the three reads: fail below
    return int(text, 0)


def is_get_request(number: int) -> bool:
    # rtnetlink types come in fours from RTM_BASE (16): NEW, DEL, GET, SET
    return number >= 16 and (number - 16) % 4 == 2


def traced_scan(tmp_path: Path) -> str:
    trace = tmp_path / "strace.txt"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=bpf,sendto,sendmsg", "-s", "64", "-o", str(trace),
         *TCPRIO, "--scan", "--format", "json", *NO_DATADOG],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode in (0, 1, 2), proc.stderr
    return trace.read_text()


def test_a_scan_asks_the_kernel_only_to_read(scene: TestNetns, tmp_path: Path):
    text = traced_scan(tmp_path)
    bpf_commands = set(BPF_COMMAND.findall(text))
    netlink_types = {rtm_number(t) for t in NETLINK_TYPE.findall(text)}
    # the trace did see the scan's work (else the checks below would be vacuous)
    assert {"BPF_PROG_GET_FD_BY_ID", "BPF_OBJ_GET_INFO_BY_FD", "BPF_PROG_QUERY"} <= bpf_commands
    assert set(RTM_NAMES.values()) <= netlink_types
    assert bpf_commands <= READ_ONLY_BPF, f"bpf commands that write: {bpf_commands - READ_ONLY_BPF}"
    writes = {t for t in netlink_types if not is_get_request(t)}
    assert writes == set(), f"netlink messages that are not GET requests: {writes}"


@pytest.mark.parametrize(
    ("number", "get"), [(18, True), (38, True), (46, True), (16, False), (17, False),
                        (44, False), (45, False), (36, False), (19, False), (2, False)],
)  # fmt: skip
def test_only_rtnetlink_get_types_count_as_reads(number: int, get: bool):
    assert is_get_request(number) is get
