"""Is Datadog's network detection active here? The state decided from what the node shows, the
severities that follow, and which running `system-probe` is taken as Datadog's.

The processes are real (copies of /bin/sh or /bin/sleep named system-probe); the verified one
lives in a private mount namespace whose /opt is a bind mount of a temporary install, so nothing
of the host's /opt or /etc is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tcprio import datadog
from tcprio.analysis.conflicts import HookClassifiers
from tcprio.analysis.datadog_presence import decide_presence
from tcprio.kernel import datadog_agent
from tcprio.kernel.containers import read_containers
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import Classifier as Cls
from tcprio.model import (
    ClassifierVerdict,
    DatadogSettings,
    Direction,
    HookKind,
    PresenceState,
    Setting,
    Severity,
    VerdictClass,
)
from tcprio.scan import Scan, run_scan
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth_in_one
from tests.test_cli import schema, tcprio
from tests.test_containers import Scene, in_container_cgroup
from tests.timing import HANG_GUARD_S

E = Direction.EGRESS
NO_FILES = ("--no-datadog-config",)
CILIUM_FILTER = "bpf_lxc.o:[from-container]"
NOBODY = 65534
NETWORK_OFF_ENV = {"DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED": "false"}
WP_ON = "runtime_security_config:\n  enabled: true\n"


# --- pure: the state from hand-made settings and classifiers ---------------------------------


def settings(found: str = "none", wp: object = None, enabled: Setting | None = None, **kw):
    return DatadogSettings(
        enabled=enabled or Setting(True, "default"),
        classifier_priority=Setting(10, "default"),
        classifier_handle=Setting(0, "default"),
        wp_enabled=None if wp is None else Setting(wp, "test"),
        found=found,
        found_evidence=(f"found: {found}",) if found != "none" else (),
        **kw,
    )


def datadog_hook(attached: bool) -> list[HookClassifiers]:
    verdict = ClassifierVerdict(VerdictClass.TRANSPARENT)
    c = Cls(HookKind.CLSACT, 0, 7, "classifier_egress", "Datadog", verdict, priority=10,
            is_datadog=attached, vendor_evidence="program classifier_egress")  # fmt: skip
    return [HookClassifiers("host", "eth0", E, (c,))]


@pytest.mark.parametrize(
    ("found", "wp", "enabled", "attached", "assume", "state"),
    [
        ("none", None, None, False, False, PresenceState.ABSENT),
        ("none", None, None, False, True, PresenceState.ASSUMED),
        ("none", None, None, True, False, PresenceState.ACTIVE),
        ("none", None, Setting(False, "test"), False, False, PresenceState.DISABLED),
        ("process", True, None, False, False, PresenceState.ACTIVE),
        ("process", False, None, False, False, PresenceState.DISABLED),
        ("process", True, Setting(False, "env:X"), False, False, PresenceState.DISABLED),
        ("process", False, None, True, False, PresenceState.ACTIVE),  # attached beats files
        ("files", True, None, False, False, PresenceState.CONFIGURED),
        ("files", False, None, False, False, PresenceState.DISABLED),
        ("files", True, None, False, True, PresenceState.ASSUMED),
    ],
)  # fmt: skip
def test_state_from_settings_and_attached_classifiers(
    found: str, wp: object, enabled: Setting | None, attached: bool, assume: bool,
    state: PresenceState,
) -> None:  # fmt: skip
    presence = decide_presence(settings(found, wp, enabled), datadog_hook(attached), assume)
    assert presence.state is state
    assert presence.evidence and all("\n" not in line for line in presence.evidence)
    if attached:
        assert "1 Datadog classifier attached" in presence.evidence[0]
        assert "host/eth0 egress at priority 10" in presence.evidence[0]
    if found != "none" and not attached:
        assert f"found: {found}" in presence.evidence


SEEN = "Datadog's classifiers were last seen attached 12 s ago"


@pytest.mark.parametrize(
    ("found", "wp", "state"),
    [
        ("none", None, PresenceState.ACTIVE),  # deleted by a CNI while the agent runs
        ("none", False, PresenceState.ACTIVE),  # Workload Protection's default alone
        ("files", True, PresenceState.ACTIVE),
        ("files", False, PresenceState.DISABLED),  # turned off, then the agent restarted
        ("process", False, PresenceState.DISABLED),  # a verified agent says off: it is off
        ("process", True, PresenceState.ACTIVE),
    ],
)
def test_classifiers_seen_a_moment_ago_keep_datadog_active(
    found: str, wp: object, state: PresenceState
) -> None:
    presence = decide_presence(settings(found, wp), datadog_hook(False), seen_before=SEEN)
    assert presence.state is state
    assert (presence.evidence[0] == SEEN) is (state is PresenceState.ACTIVE and found != "process")


# --- the CLI on a Cilium node without Datadog ------------------------------------------------


@pytest.fixture
def cilium_node(classifier_programs) -> Iterator[TestNetns]:
    """Cilium's terminal classifier at priority 1, no Datadog classifier."""
    with netns("ddp") as ns:
        veth_in_one(ns, "lxc0", "lxc0p")
        add_clsact(ns, "lxc0")
        attach_filter(ns, "lxc0", E, 1, "term_ok", filter_name=CILIUM_FILTER)
        yield ns


def scan_cli(*args: str) -> tuple[int, dict]:
    proc = tcprio("--scan", "--format", "json", *NO_FILES, *args)
    assert proc.returncode in (0, 1, 2), proc.stderr
    document = json.loads(proc.stdout)
    jsonschema.validate(document, schema())
    return proc.returncode, document


def test_a_cilium_node_without_datadog_is_info_and_exit_0(cilium_node: TestNetns) -> None:
    status, doc = scan_cli("--netns", cilium_node.name)
    assert status == 0
    assert doc["datadog"]["state"] == "absent"
    assert "no verified system-probe" in doc["datadog"]["evidence"][0]
    (conflict,) = doc["conflicts"]
    assert conflict["severity"] == "info"
    assert "would hide Datadog's classifier once network detection runs" in conflict["message"]
    assert doc["summary"]["conflicts"]["critical"] == 0
    text = tcprio("--scan", *NO_FILES, "--netns", cilium_node.name, "--color", "never")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1].startswith("Datadog network detection: absent")


def test_assume_datadog_keeps_the_critical(cilium_node: TestNetns) -> None:
    status, doc = scan_cli("--netns", cilium_node.name, "--assume-datadog")
    assert status == 2
    assert doc["datadog"]["state"] == "assumed"
    assert [c["severity"] for c in doc["conflicts"]] == ["critical"]


def test_datadog_attached_in_another_namespace_makes_it_active(cilium_node: TestNetns) -> None:
    with netns("ddq") as other:
        veth_in_one(other, "eth0", "eth0p")
        add_clsact(other, "eth0")
        attach_filter(other, "eth0", E, 10, "classifier_egress",
                      filter_name="classifier_egress_0_1234")  # fmt: skip
        status, doc = scan_cli("--netns", cilium_node.name, "--netns", other.name)
    assert status == 2
    assert doc["datadog"]["state"] == "active"
    assert f"on {other.name}/eth0 egress" in doc["datadog"]["evidence"][0]
    assert [c["severity"] for c in doc["conflicts"]] == ["critical"]


# --- which system-probe is Datadog's ---------------------------------------------------------


def _wait_exec(proc: subprocess.Popen, name: str = "system-probe") -> None:
    """Until the process runs `name` (the wrappers exec it) with its arguments (during an exec
    the new executable shows before the new command line)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        try:
            running = os.path.basename(os.readlink(f"/proc/{proc.pid}/exe")) == name
            if running and Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the process exited: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError(f"{name} never started")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory that `nobody` can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tcprio-ddp-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _install(base: Path, program: str, version: str = "7.70.0") -> Path:
    """<base>/datadog-agent with embedded/bin/system-probe (a copy of `program`) and a manifest."""
    install = base / "datadog-agent"
    (install / "embedded" / "bin").mkdir(parents=True)
    shutil.copy2(program, install / "embedded" / "bin" / "system-probe")
    (install / "version-manifest.json").write_text(json.dumps({"build_version": version}))
    for path in (base, install, install / "embedded", install / "embedded" / "bin"):
        path.chmod(0o755)
    return install


def _as_nobody() -> None:
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def start_fake(public_dir: Path, procs: list[subprocess.Popen]) -> subprocess.Popen:
    """A copy of sleep named system-probe, in an install layout, run by nobody, saying network
    detection is off."""
    install = _install(public_dir / "fake", "/bin/sleep")
    proc = subprocess.Popen(
        [str(install / "embedded" / "bin" / "system-probe"), "1000"],
        env=NETWORK_OFF_ENV, preexec_fn=_as_nobody, stderr=subprocess.PIPE,
    )  # fmt: skip
    procs.append(proc)
    _wait_exec(proc)
    return proc


def start_verified(tmp_path: Path, procs: list[subprocess.Popen], config: str) -> subprocess.Popen:
    """A copy of /bin/sh blocked on `read`, as /opt/datadog-agent/embedded/bin/system-probe of
    an install that exists only in its own private mount namespace (its /opt a bind mount)."""
    opt = tmp_path / "opt"
    install = _install(opt, "/bin/sh")
    (install / "wait.sh").write_text("read _line\n")
    (install / "etc").mkdir()
    (install / "etc" / "system-probe.yaml").write_text(config)
    inner = "/opt/datadog-agent"
    script = (
        f'mount --bind "$1" /opt && exec {inner}/embedded/bin/system-probe {inner}/wait.sh '
        f"--config={inner}/etc/system-probe.yaml"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
         str(opt)],
        env={}, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    procs.append(proc)
    _wait_exec(proc)
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def resolve(*running: subprocess.Popen) -> DatadogSettings:
    return datadog.resolve_settings(
        files=[], environ={}, host_root=Path("/nonexistent-root"),
        only_pids={p.pid for p in running},
    )  # fmt: skip


def scan_node(ns: TestNetns, dd: DatadogSettings) -> Scan:
    return run_scan(
        discover=lambda: [n for n in discover_namespaces() if n.name == ns.name], settings=dd
    )


def test_a_fake_system_probe_never_lowers_a_severity(
    classifier_programs, public_dir: Path, procs: list[subprocess.Popen]
) -> None:
    fake = start_fake(public_dir, procs)
    dd = resolve(fake)
    assert dd.found == "none" and dd.enabled == Setting(True, "default")
    (line,) = [n for n in dd.notes if n.startswith(f"process {fake.pid} (system-probe) not taken")]
    assert f"runs as uid {NOBODY}, not root" in line
    with netns("ddf") as ns:
        veth_in_one(ns, "lxc0", "lxc0p")
        add_clsact(ns, "lxc0")
        attach_filter(ns, "lxc0", E, 1, "term_ok", filter_name=CILIUM_FILTER)
        attach_filter(ns, "lxc0", E, 10, "classifier_egress", filter_name="classifier_egress_0_1")
        scan = scan_node(ns, dd)
    assert scan.result.datadog_presence.state is PresenceState.ACTIVE
    assert [c.severity for c in scan.result.conflicts] == [Severity.CRITICAL]


def test_the_verified_system_probe_is_taken_over_a_lower_pid_fake(
    classifier_programs, tmp_path: Path, public_dir: Path, procs: list[subprocess.Popen]
) -> None:
    fake = start_fake(public_dir, procs)
    config = WP_ON + "event_monitoring_config:\n  network:\n    classifier_priority: 5\n"
    real = start_verified(tmp_path, procs, config)
    assert not (Path("/opt/datadog-agent").exists()), "the install must stay in its namespace"
    dd = resolve(fake, real)
    assert dd.found == "process"
    assert dd.classifier_priority.value == 5
    assert dd.classifier_priority.source.startswith(f"process {real.pid} (system-probe) file:")
    (taken,) = dd.found_evidence
    assert taken.startswith(f"system-probe pid {real.pid} taken (the only verified system-probe)")
    assert "/opt/datadog-agent/embedded/bin/system-probe" in taken and "7.70.0" in taken
    assert any(n.startswith(f"process {fake.pid} (system-probe) not taken") for n in dd.notes)
    with netns("ddv") as ns:  # no Datadog classifier: the verified process makes it active
        veth_in_one(ns, "lxc0", "lxc0p")
        add_clsact(ns, "lxc0")
        attach_filter(ns, "lxc0", E, 1, "term_ok", filter_name=CILIUM_FILTER)
        scan = scan_node(ns, dd)
    presence = scan.result.datadog_presence
    assert presence.state is PresenceState.ACTIVE, presence
    assert "verified system-probe" in presence.evidence[0]
    assert [c.severity for c in scan.result.conflicts] == [Severity.CRITICAL]


def test_a_verified_system_probe_with_workload_protection_off_is_disabled(
    tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    real = start_verified(tmp_path, procs, "{}\n")
    dd = resolve(real)
    presence = decide_presence(dd, [])
    assert presence.state is PresenceState.DISABLED
    assert presence.evidence[0].startswith("Workload Protection (runtime_security_config.enabled)")


def test_an_executable_replaced_after_start_is_not_verified(
    tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    install = _install(tmp_path, "/bin/sh")
    exe = install / "embedded" / "bin" / "system-probe"
    (install / "sp.yaml").write_text(WP_ON)
    (install / "wait.sh").write_text("read _line\n")
    proc = subprocess.Popen(
        [str(exe), f"{install}/wait.sh", f"--config={install}/sp.yaml"], env={},
        stdin=subprocess.PIPE,
    )  # fmt: skip
    procs.append(proc)
    _wait_exec(proc)
    assert datadog_agent.verify_process(_agent(proc)).verified
    exe.unlink()
    shutil.copy2("/bin/sleep", exe)  # same path, another file
    check = datadog_agent.verify_process(_agent(proc))
    assert not check.verified and "was replaced since it started" in check.reason


@pytest.mark.parametrize(
    ("image", "verified"),
    [("gcr.io/datadoghq/agent:7.71.0", True), ("registry.example/acme/agent-tools:1.0", False)],
)
def test_an_agent_container_image_proves_an_install_without_a_manifest(
    tmp_path: Path, procs: list[subprocess.Popen], image: str, verified: bool
) -> None:
    """Where no version manifest is found in the process's root, the image of the container it
    runs in (its cgroup -> the runtime's bundle) can prove it is Datadog's; another image not."""
    real = start_verified(tmp_path, procs, WP_ON)
    (tmp_path / "opt" / "datadog-agent" / "version-manifest.json").unlink()
    scene = Scene(tmp_path / "state")
    uid = str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("datadog", "datadog-agent-x", uid, None)
    container = scene.containerd_container(
        sandbox, "datadog", "datadog-agent-x", uid, "system-probe", image
    )
    containers = read_containers(scene.roots)
    with in_container_cgroup(real.pid, container):
        check = datadog_agent.verify_process(_agent(real), containers)
    assert check.verified is verified, check.reason
    if verified:
        assert f"container image {image}" in check.reason
    else:
        assert "no Datadog install" in check.reason


def _agent(proc: subprocess.Popen) -> datadog_agent.AgentProcess:
    (found,) = datadog_agent.find_system_probes(only_pids={proc.pid})
    return found


def test_the_daemon_config_key_is_validated(tmp_path: Path) -> None:
    from tcprio.service.config import ConfigError, load_config

    good = tmp_path / "good.yaml"
    good.write_text("datadog:\n  assume_active: true\n")
    assert load_config(good).assume_datadog is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("datadog:\n  assume_active: 'yes'\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert any("assume_active" in p and "\n" not in p for p in info.value.problems)


def test_the_flag_is_in_the_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "tcprio", "scan", "--help"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert "--assume-datadog" in proc.stdout
