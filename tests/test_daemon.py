"""The daemon against the real kernel: changes show in /metrics, counters count, series go away.

The daemon runs as a subprocess on loopback, watching only this test process's namespaces
(its config includes `tcpriot-d*<pid>-*` names only), while the test adds, replaces and
deletes classifiers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcprio.model import Direction
from tests.bpf_programs import ClassifierPrograms, attach_filter, requires_tcx, tcx_attached
from tests.kernel import TestNetns, add_clsact, netns, veth, veth_in_one
from tests.test_containers import Scene, in_container_cgroup, process_named
from tests.test_run_counters import send_udp
from tests.timing import HANG_GUARD_S, POLL_S, wait_until

E, IN = Direction.EGRESS, Direction.INGRESS
# Starvation is reported from MIN_WINDOW_S (5 s) of run counters: 10x the ~5.5 s it takes.
STARVATION_GUARD_S = 60.0
SETTLE_S = 0.5  # fds and threads count as settled when two readings this far apart agree

CONFIG = """
web:
  listen_address: "127.0.0.1:{port}"
proc_sweep_interval_seconds: 0.5
tcx_poll_interval_seconds: 0.2
debounce_seconds: 0.02
resync_interval_seconds: {resync}
namespaces:
  include: ["tcpriot-d*{pid}-*"]
datadog:
  config_files: []
  scan_processes: false
live_probe: {live_probe}
log_level: {log_level}
metrics:
  full_inventory: {full_inventory}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Samples = dict[tuple[str, frozenset], float]


@dataclass
class RunningDaemon:
    proc: subprocess.Popen
    port: int
    config: Path
    stderr: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=HANG_GUARD_S) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def wait_for(self, what: str, check: Callable[[Samples], bool]) -> Samples:
        """The first /metrics where `check` holds: every change must show there (well under a
        second here), within the hang guard."""

        def shown() -> Samples | None:
            samples = self.metrics()
            return samples if check(samples) else None

        return wait_until(shown, f"not in /metrics: {what}")

    def log(self) -> str:
        return self.stderr.read_text()


def find(samples: Samples, name: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, ls), v in samples.items() if n == name and want <= ls]


def write_config(
    path: Path, port: int, live_probe: str = "false", log_level: str = "info", resync: int = 30,
    extra: str = "", full_inventory: bool = True,
):  # fmt: skip
    """Most daemon tests read the per-classifier inventory (`metrics.full_inventory`); the
    bounded default has tests of its own (tests/test_bounded_metrics.py, the alerts')."""
    # only this test process's namespaces: another run on the machine must not leak in
    text = CONFIG.format(
        port=port, live_probe=live_probe, log_level=log_level, pid=os.getpid(), resync=resync,
        full_inventory=str(full_inventory).lower(),
    )
    path.write_text(text + extra)


@contextlib.contextmanager
def daemon(
    tmp_path: Path,
    resync: int = 30,
    while_waiting: Callable[[RunningDaemon], None] | None = None,
    env: dict[str, str] | None = None,
    ready_guard_s: float = HANG_GUARD_S,
    extra_config: str = "",
    live_probe: str = "false",
    full_inventory: bool = True,
) -> Iterator[RunningDaemon]:
    """A daemon on this test's namespaces, once ready; `while_waiting` runs at each check
    until then; `env` is added to its environment; `extra_config` to its configuration."""
    port = free_port()
    config = tmp_path / "tcprio.yaml"
    write_config(config, port, live_probe=live_probe, resync=resync, extra=extra_config,
                 full_inventory=full_inventory)
    stderr = tmp_path / "daemon.log"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tcprio", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    running = RunningDaemon(proc, port, config, stderr)

    def ready() -> bool:
        if while_waiting is not None:
            with contextlib.suppress(OSError):
                while_waiting(running)
        with contextlib.suppress(OSError):
            if running.get("/readyz")[0] == 200:
                return True
        assert proc.poll() is None, running.log()
        return False

    try:
        wait_until(ready, "the daemon never became ready", ready_guard_s)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def running(tmp_path, classifier_programs) -> Iterator[RunningDaemon]:
    with daemon(tmp_path) as d:
        yield d


def hook_labels(ns: TestNetns, ifname: str, direction: Direction) -> dict[str, str]:
    return {"netns": ns.name, "interface": ifname, "direction": str(direction)}


def test_endpoints_answer(running: RunningDaemon):
    assert running.get("/healthz")[0] == 200
    assert running.get("/readyz") == (200, "ready\n")
    assert running.get("/nope")[0] == 404
    samples = running.metrics()
    assert find(samples, "tcprio_build_info", version="0.1.0") == [1.0]
    assert find(samples, "tcprio_live_probe_available") == [0.0]


def test_classifier_and_conflict_changes_show_within_the_bound(running: RunningDaemon):
    with netns("d-add") as ns:
        veth_in_one(ns, "p0", "p1")
        add_clsact(ns, "p0")
        attach_filter(ns, "p0", E, 10, "classifier_egress", filter_name="classifier/egress_1_2")
        where = hook_labels(ns, "p0", E)
        running.wait_for(
            "the Datadog classifier",
            lambda s: find(s, "tcprio_classifier_info", **where, datadog="true") == [1.0],
        )
        attach_filter(ns, "p0", E, 1, "term_ok")
        samples = running.wait_for(
            "the critical conflict",
            lambda s: find(s, "tcprio_conflict", **where, severity="critical") == [1.0],
        )
        assert find(samples, "tcprio_conflicts", severity="critical") == [1.0]
        assert find(samples, "tcprio_filter_changes_total", **where, priority="1", change="add")
        attach_filter(ns, "p0", E, 5, "term_shot")
        # priority 1 stays critical; 5 is fixable by a priority no filter uses: 4
        running.wait_for(
            "the recommendation",
            lambda s: find(s, "tcprio_recommended_classifier_priority") == [4.0],
        )
        ns.tc("filter", "del", "dev", "p0", "egress", "prio", "1")
        running.wait_for(
            "the critical conflict gone",
            lambda s: (
                find(s, "tcprio_conflicts", severity="critical") == [0.0]
                and find(s, "tcprio_filter_changes_total", **where, priority="1", change="delete")
            ),
        )
    running.wait_for(
        "every series of the deleted namespace gone",
        lambda s: not any(dict(ls).get("netns") == ns.name for (_, ls) in s),
    )


def test_replacement_and_datadog_disappearance_are_counted(running: RunningDaemon):
    with netns("d-churn") as ns:
        veth_in_one(ns, "c0", "c1")
        add_clsact(ns, "c0")
        attach_filter(ns, "c0", E, 1, "classifier_egress", handle=1,
                      filter_name="classifier/egress_1_2")  # fmt: skip
        attach_filter(ns, "c0", E, 3, "pass_unspec", handle=1)
        where = hook_labels(ns, "c0", E)
        running.wait_for(
            "both classifiers", lambda s: len(find(s, "tcprio_classifier_info", **where)) == 2
        )
        # What Cilium <= 1.9 did: replace `prio 1 handle 1`, which held Datadog's classifier.
        attach_filter(ns, "c0", E, 1, "term_ok", handle=1, replace=True)
        samples = running.wait_for(
            "the replacement and the disappearance",
            lambda s: (
                find(s, "tcprio_filter_replacements_total", **where, priority="1") == [1.0]
                and find(s, "tcprio_datadog_classifier_disappearances_total", **where) == [1.0]
            ),
        )
        # Its only classifier is gone and no system-probe runs here, but the daemon saw it
        # attached moments ago: Datadog stays active and the conflict critical.
        assert find(samples, "tcprio_conflict", **where, severity="critical") == [1.0]
        assert find(samples, "tcprio_datadog_network_detection", state="active") == [1.0]
    assert '"msg": "datadog-disappeared"' in running.log()
    assert '"msg": "replace"' in running.log()


@requires_tcx
def test_tcx_links_show_although_they_send_no_netlink_event(running: RunningDaemon):
    with netns("d-tcx") as ns:
        veth_in_one(ns, "t0", "t1")
        where = hook_labels(ns, "t0", IN)
        with tcx_attached(ns, "t0", IN, "term_redirect"):
            running.wait_for(
                "the tcx program",
                lambda s: find(s, "tcprio_classifier_info", **where, hook="tcx") == [1.0],
            )
        running.wait_for(
            "the tcx program gone",
            lambda s: find(s, "tcprio_classifier_info", **where, hook="tcx") == [],
        )


def test_run_counts_move_with_real_traffic(running: RunningDaemon, classifier_programs):
    programs: ClassifierPrograms = classifier_programs
    with netns("d-tx") as tx, netns("d-rx") as rx:
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", "169.254.213.1/30", "dev", "a0")
        rx.ip("addr", "add", "169.254.213.2/30", "dev", "b0")
        add_clsact(tx, "a0")
        attach_filter(tx, "a0", E, 20, "pass_pipe")
        prog_id = str(programs.prog_id("pass_pipe"))
        before = running.wait_for(
            "the program's run counter",
            lambda s: bool(find(s, "tcprio_classifier_runs_total", prog_id=prog_id)),
        )
        start = find(before, "tcprio_classifier_runs_total", prog_id=prog_id)[0]
        assert send_udp(tx, rx, 40) == 40
        running.wait_for(
            "the run counter moving",
            lambda s: find(s, "tcprio_classifier_runs_total", prog_id=prog_id)[0] >= start + 40,
        )


# Compiling the probe with BCC takes ~1 s here and ~40 s in a TCG guest: ten times the latter.
PROBE_READY_GUARD_S = 600.0
# (side, interface, direction, priority, program, the verdict cls_bpf hands on for it)
LIVE_SCENE = (
    ("tx", "a0", E, 1, "pass_42", "TC_ACT_UNSPEC"),
    ("tx", "a0", E, 10, "term_ok", "TC_ACT_OK"),
    ("rx", "b0", IN, 2, "pass_unspec", "TC_ACT_UNSPEC"),
)


def test_live_verdicts_equal_run_counters_on_real_traffic(tmp_path, classifier_programs):
    """Where the probe attaches (distribution kernels; not the development VM), the exported
    tcprio_live_verdicts_total per namespace, interface, priority and verdict equals what the
    BPF run counters and the programs' own counters count for the same traffic."""
    from tcprio.service.live_probe import probe_support
    from tests.test_run_counters import run_count

    support = probe_support()
    if not support.available:
        pytest.skip(support.reason)
    with (
        daemon(tmp_path, live_probe="true", ready_guard_s=PROBE_READY_GUARD_S) as running,
        netns("d-ltx") as tx,
        netns("d-lrx") as rx,
    ):
        sides = {"tx": tx, "rx": rx}
        for ns in sides.values():  # no IPv6 chatter: only the datagrams and their ARP exchange
            ns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            ns.exec("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", "169.254.213.1/30", "dev", "a0")
        rx.ip("addr", "add", "169.254.213.2/30", "dev", "b0")
        add_clsact(tx, "a0")
        add_clsact(rx, "b0")
        for side, ifname, direction, prio, name, _ in LIVE_SCENE:
            attach_filter(sides[side], ifname, direction, prio, name)
        names = [hook[4] for hook in LIVE_SCENE]
        running.wait_for(
            "the scene's classifiers",
            lambda s: len(find(s, "tcprio_classifier_info", netns=tx.name)) == 2,
        )
        runs_before = {name: run_count(classifier_programs, name) for name in names}
        seen_before = {name: classifier_programs.seen(name) for name in names}
        assert send_udp(tx, rx, 40) == 40

        def hook_equal(samples: Samples, hook: tuple) -> bool:
            side, ifname, direction, prio, name, verdict = hook
            where = hook_labels(sides[side], ifname, direction) | {"priority": str(prio)}
            ran = run_count(classifier_programs, name) - runs_before[name]
            seen = classifier_programs.seen(name) - seen_before[name]
            every_verdict = find(samples, "tcprio_live_verdicts_total", **where)
            exported = find(samples, "tcprio_live_verdicts_total", **where, verdict=verdict)
            return ran >= 40 and exported == every_verdict == [ran] == [seen]

        samples = running.wait_for(
            "live verdicts equal to the run counters",
            lambda s: all(hook_equal(s, hook) for hook in LIVE_SCENE),
        )
        mode = str(support.mode)
        assert find(samples, "tcprio_live_probe_available", mode=mode) == [1.0]


def test_starvation_is_reported_from_run_counters_on_real_traffic(running: RunningDaemon):
    with netns("d-stx") as tx, netns("d-srx") as rx:
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", "169.254.213.1/30", "dev", "a0")
        rx.ip("addr", "add", "169.254.213.2/30", "dev", "b0")
        add_clsact(tx, "a0")
        attach_filter(tx, "a0", E, 1, "term_ok")
        attach_filter(tx, "a0", E, 10, "classifier_egress")
        where = hook_labels(tx, "a0", E)
        running.wait_for("the conflict", lambda s: bool(find(s, "tcprio_conflict", **where)))
        deadline = time.monotonic() + STARVATION_GUARD_S
        while not find(running.metrics(), "tcprio_datadog_starved", **where):
            assert time.monotonic() < deadline, "starvation never reported"
            assert send_udp(tx, rx, 10) == 10
            time.sleep(0.3)  # traffic for the run counters between two looks at /metrics


def test_the_daemon_does_not_keep_a_deleted_namespace_alive(running: RunningDaemon):
    """Our netlink socket pins its namespace: it must be closed once the namespace is gone."""
    with netns("d-keep") as keep:
        with netns("d-gone") as gone:
            veth(keep, "k0", gone, "g0")
            running.wait_for(
                "the namespace watched",
                lambda s: find(s, "tcprio_namespaces_watched") == [2.0],
            )
        # the namespace is destroyed only when nothing holds it; then its veth end goes, and
        # the peer in the namespace we keep goes with it
        wait_until(
            lambda: "k0" not in keep.ip("-o", "link", "show").stdout,
            "the deleted namespace is still alive",
        )


def test_namespaces_coming_and_going_leak_no_fd_or_thread(running: RunningDaemon):
    def usage() -> tuple[int, int]:
        pid = running.proc.pid
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))

    def settled() -> tuple[int, int]:
        """fds and threads once the HTTP threads of our own polling have finished: the same
        reading twice, SETTLE_S apart."""
        last = usage()
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            time.sleep(SETTLE_S)
            now = usage()
            if now == last:
                return now
            assert time.monotonic() < deadline, f"fds and threads never settled: {now}"
            last = now

    running.wait_for("an idle start", lambda s: find(s, "tcprio_namespaces_watched") == [0.0])
    before = settled()
    for _ in range(5):
        with netns("d-leak") as ns:
            veth_in_one(ns, "q0", "q1")
            running.wait_for("watched", lambda s: find(s, "tcprio_namespaces_watched") == [1.0])
        running.wait_for("dropped", lambda s: find(s, "tcprio_namespaces_watched") == [0.0])
    # back at the baseline once our own polling's HTTP threads end; a leak never is
    deadline = time.monotonic() + HANG_GUARD_S
    while (after := usage()) != before:
        assert time.monotonic() < deadline, f"(fds, threads) {after}, before the churn {before}"
        time.sleep(POLL_S)


def test_sighup_reloads_good_config_and_keeps_the_last_good_one(running: RunningDaemon):
    write_config(running.config, running.port, log_level="debug")
    running.proc.send_signal(signal.SIGHUP)
    running.wait_for(
        "a successful reload",
        lambda s: find(s, "tcprio_config_reloads_total", result="success") == [1.0],
    )
    running.config.write_text("listen_address: [broken\n")
    running.proc.send_signal(signal.SIGHUP)
    samples = running.wait_for(
        "a failed reload",
        lambda s: find(s, "tcprio_config_reloads_total", result="failure") == [1.0],
    )
    assert find(samples, "tcprio_config_last_reload_successful") == [0.0]
    assert running.get("/readyz")[0] == 200  # still serving with the last good config
    assert "not valid YAML at line" in running.log()


def test_sigterm_stops_cleanly(running: RunningDaemon):
    pid = running.proc.pid
    assert len(os.listdir(f"/proc/{pid}/fd")) > 0
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=HANG_GUARD_S) == 0
    assert '"msg": "stopped"' in running.log()
    assert "Traceback" not in running.log()


def test_a_prog_array_slot_filled_later_is_seen_without_a_resync(tmp_path: Path):
    """An empty tail-call slot makes a classifier unknown; filling it sends no netlink event,
    and the daemon still shows the new verdict, from its poll of the prog arrays (the full
    resync is an hour away: the full-scan counter shows none happened)."""
    with ClassifierPrograms() as programs, daemon(tmp_path, resync=3600) as running:
        programs.set_tail_call(0, None)  # its own prog array: the shared one stays intact
        with netns("d-slot") as ns:
            veth_in_one(ns, "s0", "s1")
            add_clsact(ns, "s0")
            attach_filter(ns, "s0", E, 5, "tail_entry", prog_fd=programs.fd("tail_entry"))
            where = hook_labels(ns, "s0", E)
            before = running.wait_for(
                "tail_entry unknown while its slot is empty",
                lambda s: find(s, "tcprio_classifier_info", **where, verdict_class="unknown"),
            )
            programs.set_tail_call(0, "term_shot")
            after = running.wait_for(
                "tail_entry terminal once its slot holds term_shot",
                lambda s: find(s, "tcprio_classifier_info", **where, verdict_class="terminal"),
            )
    full = [find(s, "tcprio_scans_total", kind="full") for s in (before, after)]
    assert full[0] == full[1], full


def test_a_pod_is_named_once_its_sandbox_shows_and_versions_are_exported(
    tmp_path: Path, classifier_programs
):
    """containerd pins a pod's namespace before it writes the sandbox's config.json: the daemon
    first shows the raw `cni-...`-like name, then the pod's, without a resync; a cilium-agent
    process in a container of the image quay.io/cilium/cilium:v1.16.3 gives Cilium's version."""
    scene = Scene(tmp_path / "state")
    extra = (
        f"containers:\n  containerd_bundle_dirs: [{scene.roots.containerd}]\n"
        f"  crio_bundle_dirs: [{scene.roots.crio}]\n"
    )
    pod = f"web-{os.getpid()}"
    with daemon(tmp_path, extra_config=extra) as running, netns("d-pod") as ns:
        veth_in_one(ns, "e0", "e1")
        add_clsact(ns, "e0")
        attach_filter(ns, "e0", E, 1, "term_ok")
        running.wait_for(
            "the raw name", lambda s: find(s, "tcprio_classifier_info", netns=ns.name)
        )
        uid = str(uuid.uuid4())
        sandbox = scene.containerd_sandbox("shop", pod, uid, f"/run/netns/{ns.name}")
        running.wait_for(
            "the pod's name only",
            lambda s: (
                find(s, "tcprio_classifier_info", netns=f"pod:shop/{pod}")
                and not find(s, "tcprio_classifier_info", netns=ns.name)
            ),
        )
        assert '"msg": "namespace renamed"' in running.log()
        container = scene.containerd_container(
            sandbox, "shop", pod, uid, "cilium-agent", "quay.io/cilium/cilium:v1.16.3"
        )
        with process_named("cilium-agent", tmp_path) as pid, in_container_cgroup(pid, container):
            samples = running.wait_for(
                "Cilium's version",
                lambda s: find(s, "tcprio_vendor_version_info", vendor="Cilium", version="1.16.3"),
            )
    (source,) = [dict(ls)["source"] for (n, ls) in samples if n == "tcprio_vendor_version_info"]
    assert source == (
        f"container image quay.io/cilium/cilium:v1.16.3 (containerd bundle {container[:12]})"
    )
