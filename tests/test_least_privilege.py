"""tcprio with only the capabilities systemd/tcprio.service grants it, and with each one taken
away: what still works, what breaks, and the one line that says so.

`setpriv --bounding-set` limits root's capabilities for the command it runs (a root process gets
its bounding set as permitted and effective capabilities at exec), as the unit's
CapabilityBoundingSet= does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
from tests.kernel import TestNetns, add_clsact, netns, veth_in_one
from tests.test_daemon import free_port
from tests.timing import HANG_GUARD_S, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tcprio.service"
TCPRIO = [sys.executable, "-m", "tcprio"]
E, IN = Direction.EGRESS, Direction.INGRESS


def unit_capabilities() -> list[str]:
    line = next(ln for ln in UNIT.read_text().splitlines()
                if ln.startswith("CapabilityBoundingSet="))  # fmt: skip
    return [cap.removeprefix("CAP_").lower() for cap in line.split("=", 1)[1].split()]


def with_caps(caps: list[str], argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    return subprocess.run(["setpriv", "--bounding-set", bounding, "--", *argv],
                          capture_output=True, text=True, timeout=120, **kwargs)  # fmt: skip


def comparable(scan_json: str) -> dict:
    doc = json.loads(scan_json)
    for volatile in ("scanned_at", "duration_seconds"):
        doc.pop(volatile, None)
    return doc


@pytest.fixture(scope="module")
def scene(classifier_programs) -> Iterator[TestNetns]:
    with netns("lp") as ns:
        veth_in_one(ns, "l0", "l1")
        add_clsact(ns, "l0")
        attach_filter(ns, "l0", E, 1, "term_redirect")  # a helper call: needs kallsyms
        attach_filter(ns, "l0", E, 10, "classifier_egress")
        with tcx_attached(ns, "l0", IN, "term_ok"):
            yield ns


def scan(ns: TestNetns, caps: list[str] | None) -> subprocess.CompletedProcess[str]:
    argv = [*TCPRIO, "scan", "--format", "json", "--netns", ns.name, "--no-agent-process",
            "--no-datadog-config"]  # fmt: skip
    if caps is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return with_caps(caps, argv)


def test_the_unit_grants_exactly_the_documented_set():
    assert sorted(unit_capabilities()) == sorted(
        ["sys_admin", "sys_ptrace", "syslog", "dac_read_search", "net_admin"]
    )


def test_the_units_capabilities_are_enough_for_the_whole_scan(scene: TestNetns):
    full = scan(scene, None)
    limited = scan(scene, unit_capabilities())
    assert full.returncode == limited.returncode == 2, limited.stderr  # critical conflicts
    assert comparable(limited.stdout) == comparable(full.stdout)
    doc = comparable(limited.stdout)
    kinds = {c["blocker_hook"] for c in doc["conflicts"]}
    assert kinds == {"clsact", "tcx"}  # tcx read, and bpf_redirect recognised (kallsyms)


REQUIRED = {
    "sys_admin": "CAP_SYS_ADMIN (to enter other network namespaces and open BPF programs by id)",
    "sys_ptrace": "CAP_SYS_PTRACE (to open the network namespaces and environments of other "
    "processes)",
    "syslog": "CAP_SYSLOG (to read programs' instructions with their map ids and helper "
    "addresses)",
}


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_without_a_required_capability_the_scan_says_which_in_one_line(missing, scene):
    caps = [c for c in unit_capabilities() if c != missing]
    proc = scan(scene, caps)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr == (
        f"tcprio: running as root without {REQUIRED[missing]}: run tcprio as root with these "
        "capabilities (e.g. sudo tcprio scan)\n"
    )


def test_the_daemon_refuses_to_start_without_a_required_capability(tmp_path: Path):
    caps = [c for c in unit_capabilities() if c != "sys_admin"]
    proc = with_caps(caps, [*TCPRIO, "serve", "--listen-address", "127.0.0.1:1"])
    assert proc.returncode == 3
    assert proc.stderr.startswith("tcprio: running as root without CAP_SYS_ADMIN")
    assert proc.stderr.count("\n") == 1


def test_without_net_admin_tcx_is_still_read_on_this_kernel(scene: TestNetns):
    """Kernel 6.6 checks CAP_NET_ADMIN alone for BPF_PROG_QUERY on tcx; later kernels accept
    CAP_SYS_ADMIN too (docs/systemd.md). This machine runs a later one."""
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    proc = scan(scene, [c for c in unit_capabilities() if c != "net_admin"])
    doc = comparable(proc.stdout)
    tcx = [c for ns in doc["namespaces"] for i in ns["interfaces"] for h in i["hooks"]
           for c in h["classifiers"] if c["hook"] == "tcx"]  # fmt: skip
    if release >= (6, 7):
        assert len(tcx) == 1
    else:
        assert tcx == [] or proc.returncode == 3


@contextlib.contextmanager
def fake_system_probe(tmp_path: Path, priority: int) -> Iterator[int]:
    """A process named system-probe running as nobody, with Datadog's variable in its
    environment (mode 0400 /proc/<pid>/environ: reading it as root needs DAC_READ_SEARCH or
    DAC_OVERRIDE, and the unit grants only the first)."""
    binary = tmp_path / "system-probe"
    shutil.copy("/bin/sleep", binary)
    binary.chmod(0o755)
    tmp_path.chmod(0o755)
    env = {"DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY": str(priority)}
    proc = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534",
                             "--clear-groups", str(binary), "60"], env=env)  # fmt: skip
    try:
        wait_until(
            lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "system-probe",
            "the fake system-probe never started",
            poll_s=0.01,
        )
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def datadog_scan(caps: list[str], pid: int) -> subprocess.CompletedProcess[str]:
    return with_caps(caps, [*TCPRIO, "scan", "--format", "json", "--netns", "host"])


def test_a_system_probe_that_is_not_datadogs_is_never_read_whatever_the_capabilities(
    tmp_path: Path,
):
    """Datadog's system-probe runs as root from its install: this one (run by nobody, not in
    an install) is named in one note and its environment is not read, with or without
    DAC_READ_SEARCH."""
    with fake_system_probe(tmp_path, 5) as pid:
        granted = datadog_scan(unit_capabilities(), pid)
        without = datadog_scan([c for c in unit_capabilities() if c != "dac_read_search"], pid)
    for proc in (granted, without):
        datadog = json.loads(proc.stdout)["datadog"]
        assert datadog["classifier_priority"] == {"value": 10, "source": "default"}, proc.stderr
        not_taken = f"process {pid} (system-probe) not taken as Datadog's"
        assert any(n.startswith(not_taken) for n in datadog["notes"]), datadog["notes"]
        assert "bad Datadog setting" not in proc.stderr


def test_the_daemon_runs_with_the_units_capabilities(scene: TestNetns, tmp_path: Path):
    port = free_port()
    config = tmp_path / "tcprio.yaml"
    config.write_text(
        f'web:\n  listen_address: "127.0.0.1:{port}"\n'
        f'namespaces: {{include: ["{scene.name}"]}}\n'
        "datadog: {config_files: [], scan_processes: false}\nlive_probe: false\n"
    )
    bounding = ",".join(["-all", *(f"+{c}" for c in unit_capabilities())])
    log = tmp_path / "daemon.log"
    argv = ["setpriv", "--bounding-set", bounding, "--", *TCPRIO, "--config", str(config)]
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        body = ""
        while 'severity="critical"' not in body or 'hook="tcx"' not in body:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, body[-2000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r,
            ):
                body = r.read().decode()
            time.sleep(0.1)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        effective = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        assert effective == sum(1 << n for n in (21, 19, 34, 2, 12))  # the unit's five
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, log.read_text()
