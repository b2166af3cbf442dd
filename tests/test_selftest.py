"""`tcprio self-test` against the real kernel: it passes here, it fails with the right message
when the scene is broken on purpose, and it leaves nothing behind (success, failure, SIGINT,
SIGTERM, SIGKILL followed by a new run)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from tcprio.datadog import resolve_settings
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import entered_path
from tcprio.model import ETH_P_ALL, Direction
from tcprio.selftest import live_verdicts
from tcprio.selftest import scene as selftest_scene
from tcprio.selftest.runner import (
    SelfTestOptions,
    SelfTestReport,
    Status,
    expected_recommendation,
    mid_priority,
    plan_scene,
    run_self_test,
)
from tcprio.selftest.scene import NODE_IF, Scene
from tcprio.service.live_probe import probe_support
from tests.bpf_programs import tcx_missing
from tests.kernel import run
from tests.test_daemon import free_port
from tests.timing import HANG_GUARD_S, guard, wait_until

TCPRIO = [sys.executable, "-m", "tcprio"]
SCHEMA = Path(selftest_scene.__file__).resolve().parents[1] / "data" / "selftest-schema-v1.json"
NO_DATADOG = ["--no-datadog-config", "--no-agent-process"]


def selftest_namespaces() -> list[str]:
    return [
        line.split()[0]
        for line in run("ip", "netns", "list").stdout.splitlines()
        if line.startswith(selftest_scene.NETNS_PREFIX)
    ]


def kernel_objects() -> tuple[set[int], set[int]]:
    return set(bpf_syscalls.list_prog_ids()), set(bpf_syscalls.list_link_ids())


def assert_nothing_left(before: tuple[set[int], set[int]]) -> None:
    assert selftest_namespaces() == []
    deadline = time.monotonic() + HANG_GUARD_S  # programs are freed after an RCU grace period
    while True:
        progs, links = kernel_objects()
        new_progs, new_links = progs - before[0], links - before[1]
        if not (new_progs or new_links) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert new_progs == set(), "programs left loaded"
    assert new_links == set(), "links left"


def node_settings():
    return resolve_settings(files=[], environ={}, scan_processes=False)


def step(report: SelfTestReport, name: str):
    return next(s for s in report.steps if s.name == name)


# --- the plan (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "mid", "recommended"),
    [(1, None, None), (2, None, None), (3, 2, None), (4, 3, 2), (10, 9, 8), (65535, 65534, 65533)],
)
def test_mid_priority_and_recommendation(priority, mid, recommended):
    assert mid_priority(priority) == mid
    assert expected_recommendation(priority) == recommended


@pytest.mark.parametrize("priority", [1, 2, 3, 10, 65535])
@pytest.mark.parametrize("with_tcx", [True, False])
def test_plan_covers_every_case_the_priority_allows(priority: int, with_tcx: bool):
    plan = plan_scene("n", "p", priority, with_tcx)
    roles = [p.role for p in plan]
    assert roles.count("observer") == 4
    assert all(p.priority == priority for p in plan if p.role == "observer")
    assert [p.priority for p in plan if p.role == "cni"] == [1]
    assert ("mid" in roles) == (priority >= 3)
    assert ("tcx" in roles) == with_tcx
    for p in plan:
        assert p.terminal == (p.role in ("cni", "mid", "tcx"))
        assert (p.role == "observer") == p.is_datadog
    hooks = {(p.namespace, p.interface, p.direction) for p in plan}
    assert len(hooks) == 4


# --- on this machine -------------------------------------------------------------------------


def test_self_test_passes_on_this_machine_and_leaves_nothing():
    before = kernel_objects()
    proc = subprocess.run(
        [*TCPRIO, "self-test", "--no-daemon-check", "--format", "json", *NO_DATADOG],
        capture_output=True, text=True, timeout=guard(120),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    assert report["schema"] == "tcprio.self-test" and report["ok"] is True
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    skipped = {name for name, status in statuses.items() if status == "skipped"}
    expected = {"conflicts reach the daemon's /metrics"}  # asked for: --no-daemon-check
    if not probe_support().available:  # the development VM: no kprobes, fexit refused
        expected.add(live_verdicts.STEP)
    assert skipped == expected
    assert len(statuses) == 11
    build = next(s for s in report["steps"] if s["name"] == "builds the scene")
    placed = "8 classifiers on 4 hooks" if tcx_missing() else "9 classifiers on 4 hooks"
    assert placed in build["summary"]
    assert report["classifier_priority"] == 10
    assert_nothing_left(before)


def test_text_output_ends_with_the_verdict():
    proc = subprocess.run(
        [*TCPRIO, "self-test", "--no-daemon-check", "--classifier-priority", "5", *NO_DATADOG],
        capture_output=True, text=True, timeout=guard(120),
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1] == "Self test: OK"
    assert any("recommended classifier_priority 3" in line for line in lines)
    live_step = probe_support().available  # else skipped: the development VM
    assert sum(1 for line in lines if line.startswith("[ OK ]")) == 9 + live_step
    assert "Traceback" not in proc.stderr


def test_a_priority_outside_the_tc_range_is_refused_in_one_line():
    proc = subprocess.run(
        [*TCPRIO, "self-test", "--classifier-priority", "70000"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "tcprio self-test: --classifier-priority 70000: a tc priority is 1..65535"
    )
    assert selftest_namespaces() == []


# --- broken on purpose -------------------------------------------------------------------------


def run_broken(break_scene: Callable[[Scene], None], priority: int = 10) -> SelfTestReport:
    from tcprio.selftest.runner import SelfTestHooks

    options = SelfTestOptions(classifier_priority=priority, daemon_check=False, packets=20)
    return run_self_test(options, node_settings(), SelfTestHooks(after_build=break_scene))


def _filter(scene: Scene, role: str, direction: Direction):
    return next(
        c for c in scene.classifiers
        if c.placement.role == role and c.placement.direction is direction
        and c.placement.namespace == scene.node_ns
    )  # fmt: skip


def test_killing_the_observer_fails_discovery_by_name():
    before = kernel_objects()
    seen: dict[str, int] = {}

    def kill_observer(scene: Scene) -> None:
        observer = _filter(scene, "observer", Direction.EGRESS)
        seen["prog_id"] = observer.prog_id
        seen["ns"] = scene.node_ns
        run("tc", "-n", scene.node_ns, "filter", "del", "dev", NODE_IF, "egress", "prio", "10")

    report = run_broken(kill_observer)
    assert not report.ok
    discovery = step(report, "finds every classifier")
    assert discovery.status is Status.FAILED
    assert discovery.problems == (
        f"missing: classifier_egress (program {seen['prog_id']}) at clsact "
        f"{seen['ns']}/st-node egress priority 10",
    )
    # The rest still ran, and the cleanup too.
    assert step(report, "leaves nothing behind").status is Status.OK
    assert_nothing_left(before)


def _move_filter(scene: Scene, direction: Direction, old_prio: int, new_prio: int, fd: int):
    from pyroute2 import IPRoute

    run("tc", "-n", scene.node_ns, "filter", "del", "dev", NODE_IF, str(direction),
        "prio", str(old_prio))  # fmt: skip
    with entered_path(f"/run/netns/{scene.node_ns}"):
        ifindex = socket.if_nametoindex(NODE_IF)
        with IPRoute() as ipr:
            ipr.tc("add-filter", "bpf", ifindex, None, fd=fd, name="moved",
                   parent=selftest_scene.CLSACT_PARENT[direction], classid=1,
                   direct_action=True, prio=new_prio, protocol=ETH_P_ALL)  # fmt: skip


def test_a_blocker_that_lies_about_its_priority_fails_conflicts_and_traffic():
    """The vendor's filter is not where the plan says (priority 15, after Datadog's 10)."""

    def move_mid(scene: Scene) -> None:
        mid = _filter(scene, "mid", Direction.INGRESS)
        _move_filter(scene, Direction.INGRESS, 9, 15, mid.prog_fd)

    report = run_broken(move_mid)
    assert not report.ok
    conflicts = step(report, "raises exactly the expected conflicts")
    assert conflicts.status is Status.FAILED
    assert any(p.startswith("missing error conflict on tcprio-selftest-") and "term_shot" in p
               for p in conflicts.problems)  # fmt: skip
    traffic = step(report, "real traffic through the scene")
    assert traffic.status is Status.FAILED
    assert any("classifier_ingress at clsact" in p and "should be hidden" in p
               for p in traffic.problems)  # fmt: skip
    discovery = step(report, "finds every classifier")
    assert any("missing: term_shot" in p and "priority 9" in p for p in discovery.problems)


def test_a_cni_that_lets_packets_through_fails_verdicts_and_starvation():
    """Swap the CNI's terminal program for a transparent one at the same place."""
    from pyroute2 import IPRoute

    def soften_cni(scene: Scene) -> None:
        transparent = _filter(scene, "transparent", Direction.INGRESS)
        with entered_path(f"/run/netns/{scene.node_ns}"), IPRoute() as ipr:
            ipr.tc("replace-filter", "bpf", socket.if_nametoindex(NODE_IF), 1,
                   fd=transparent.prog_fd, name="softened",
                   parent=selftest_scene.CLSACT_PARENT[Direction.EGRESS], classid=1,
                   direct_action=True, prio=1, protocol=ETH_P_ALL)  # fmt: skip

    report = run_broken(soften_cni)
    assert not report.ok
    failed = {s.name for s in report.steps if s.status is Status.FAILED}
    assert {"finds every classifier", "raises exactly the expected conflicts",
            "real traffic through the scene", "sees the observers starved"} <= failed  # fmt: skip
    starvation = step(report, "sees the observers starved")
    assert any(p.startswith("starvation not seen on tcprio-selftest-") and "st-node/egress" in p
               for p in starvation.problems)  # fmt: skip


# --- signals -----------------------------------------------------------------------------------


@contextlib.contextmanager
def selftest_process(*extra: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [*TCPRIO, "self-test", "--no-daemon-check", *NO_DATADOG, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for name in selftest_namespaces():  # whatever happened, the machine stays clean
            selftest_scene.delete_namespace(name)


def wait_for_scene(proc: subprocess.Popen, timeout_s: float = guard(60.0)) -> list[str]:
    deadline = time.monotonic() + timeout_s
    mine = f"{selftest_scene.NETNS_PREFIX}{proc.pid}-"
    while time.monotonic() < deadline:
        found = [n for n in selftest_namespaces() if n.startswith(mine)]
        if len(found) == 2:
            return found
        assert proc.poll() is None, "the self-test ended before its scene was up"
        time.sleep(0.002)
    raise AssertionError("the scene never appeared")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_cleans_up(signum: int):
    before = kernel_objects()
    with selftest_process() as proc:
        wait_for_scene(proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=guard(60))
        assert proc.returncode == 130, out + err
        assert "Traceback" not in err
        assert out.strip().splitlines()[-1] == (
            "Self test: FAILED (interrupted; the scene was removed)"
        )
    assert_nothing_left(before)


def test_an_interrupted_run_says_so_in_json():
    with selftest_process("--format", "json") as proc:
        wait_for_scene(proc)
        proc.send_signal(signal.SIGINT)
        out, _err = proc.communicate(timeout=guard(60))
    report = json.loads(out)
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    assert report["interrupted"] is True and report["ok"] is False
    assert report["classifier_priority"] == 10
    names = [s["name"] for s in report["steps"]]
    assert names[:2] == ["leftovers of earlier runs", "compiles the classifiers"]
    assert names[-1] == "leaves nothing behind"
    assert report["steps"][-1]["status"] == "ok"
    assert proc.returncode == 130


def test_a_killed_run_is_cleaned_up_by_the_next_one():
    before = kernel_objects()
    with selftest_process() as killed:
        leftovers = wait_for_scene(killed)
        killed.kill()
        killed.wait()
        assert sorted(selftest_namespaces()) == sorted(leftovers)  # SIGKILL: no cleanup
        proc = subprocess.run(
            [*TCPRIO, "self-test", "--no-daemon-check", *NO_DATADOG],
            capture_output=True, text=True, timeout=guard(120),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (
            f"[ OK ] leftovers of earlier runs: removed 2 namespaces of killed runs "
            f"(pid {killed.pid})" in proc.stdout
        )
    assert_nothing_left(before)


# --- end to end with a running daemon ------------------------------------------------------------


DAEMON_CONFIG = """
web:
  listen_address: "127.0.0.1:{port}"
proc_sweep_interval_seconds: 300   # only events: the self-test's namespaces must be seen at once
resync_interval_seconds: 300
namespaces:
  include: [{include}]
datadog:
  config_files: []
  scan_processes: false
live_probe: false
"""


@contextlib.contextmanager
def daemon(tmp_path: Path, include: str) -> Iterator[int]:
    port = free_port()
    config = tmp_path / "tcprio.yaml"
    config.write_text(DAEMON_CONFIG.format(port=port, include=include))
    log = (tmp_path / "daemon.log").open("w")  # read it when a test fails
    proc = subprocess.Popen([*TCPRIO, "--config", str(config)], stdout=log, stderr=log)
    try:
        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return True
            return False

        wait_until(listening, "the daemon never listened")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=guard(30))
        log.close()


def test_conflicts_reach_a_running_daemon_found_on_the_node(tmp_path: Path):
    with daemon(tmp_path, '"tcprio-selftest-*"') as port:
        proc = subprocess.run([*TCPRIO, "self-test", *NO_DATADOG],
                              capture_output=True, text=True, timeout=guard(120))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "reach the daemon" in x)
    assert line.startswith("[ OK ]")
    conflicts = 2 if tcx_missing() else 3  # the tcx terminal is the third
    assert f"exported all {conflicts} conflicts at http://127.0.0.1:{port}/metrics" in line
    seconds = float(line.split("seen ")[1].split(" s ")[0])
    # Named namespaces are picked up from events, not the 300 s sweep (about 0.2 s here).
    assert seconds < HANG_GUARD_S, seconds


def test_a_daemon_that_excludes_the_scene_is_reported_not_failed(tmp_path: Path):
    with daemon(tmp_path, '"pod:*"'):
        proc = subprocess.run([*TCPRIO, "self-test", "--format", "json", *NO_DATADOG],
                              capture_output=True, text=True, timeout=guard(120))  # fmt: skip
    report = json.loads(proc.stdout)
    daemon_step = next(s for s in report["steps"] if "daemon" in s["name"])
    assert daemon_step["status"] == "skipped"
    assert "namespaces.include ['pod:*'] leaves out tcprio-selftest-" in daemon_step["summary"]
    assert proc.returncode == 0


def test_a_daemon_that_does_not_answer_fails_the_propagation_step():
    port = free_port()  # nothing listens there
    options = SelfTestOptions(
        metrics_url=f"http://127.0.0.1:{port}/metrics", daemon_timeout_s=1.0, packets=10
    )
    report = run_self_test(options, node_settings())
    daemon_step = step(report, "conflicts reach the daemon's /metrics")
    assert daemon_step.status is Status.FAILED
    assert any("Connection refused" in p for p in daemon_step.problems)
    assert not report.ok


def test_run_without_bcc_headers_says_what_it_means(tmp_path: Path):
    """A BCC_KERNEL_SOURCE without headers: the step names it and what it means."""
    env = {**os.environ, "BCC_KERNEL_SOURCE": str(tmp_path / "no-headers-here")}
    proc = subprocess.run([*TCPRIO, "self-test", "--no-daemon-check", *NO_DATADOG],
                          capture_output=True, text=True, timeout=guard(120), env=env)  # fmt: skip
    assert proc.returncode == 1
    line = next(x for x in proc.stdout.splitlines() if "compiles the classifiers" in x)
    assert line.startswith("[FAIL]")
    assert f"BCC_KERNEL_SOURCE={tmp_path / 'no-headers-here'} holds no kernel headers" in line
    assert "`tcprio --scan` and the daemon do not need them" in line
    assert proc.stdout.strip().splitlines()[-1] == "Self test: FAILED"
    assert selftest_namespaces() == []


def test_a_compiler_failure_shows_the_compilers_error(tmp_path: Path):
    (tmp_path / "include" / "linux").mkdir(parents=True)  # looks like headers, holds none
    env = {**os.environ, "BCC_KERNEL_SOURCE": str(tmp_path)}
    proc = subprocess.run([*TCPRIO, "self-test", "--no-daemon-check", *NO_DATADOG],
                          capture_output=True, text=True, timeout=guard(120), env=env)  # fmt: skip
    assert proc.returncode == 1
    line = next(x for x in proc.stdout.splitlines() if "compiles the classifiers" in x)
    assert "BCC could not compile" in line and "error:" in line
    assert "Traceback" not in proc.stderr


def test_ctrl_c_pressed_again_and_again_does_not_cut_the_cleanup_short():
    before = kernel_objects()
    with selftest_process() as proc:
        wait_for_scene(proc)
        for _ in range(20):
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGINT)
            time.sleep(0.005)
        out, err = proc.communicate(timeout=guard(60))
        # A SIGINT that lands after the report, while Python shuts down (its handlers back to
        # the default), ends the process with that signal: the work was done by then.
        assert proc.returncode in (130, -signal.SIGINT), out + err
        assert out.strip().splitlines()[-1] == (
            "Self test: FAILED (interrupted; the scene was removed)"
        )
        assert "Traceback" not in err
    assert_nothing_left(before)


def test_a_stop_signal_landing_in_a_finalizer_is_raised_just_after_it():
    """A SIGTERM that arrives while a subprocess.Popen is being collected must not print
    "Exception ignored in ... Traceback" and be lost: it is raised again outside."""
    from tcprio.selftest.cli import Interrupted, _StopOnce

    stop = _StopOnce()
    previous = signal.getsignal(signal.SIGALRM)
    raised_in_finalizer: list[BaseException] = []

    class Collected:
        def __del__(self) -> None:
            try:
                stop(signal.SIGTERM, sys._getframe())
            except BaseException as exc:  # what Python would print and drop
                raised_in_finalizer.append(exc)

    try:
        with pytest.raises(Interrupted):
            Collected()  # collected at once: the signal "lands" in its __del__
            time.sleep(guard(5))  # SIGALRM re-raises it here, within DEFER_S
        assert raised_in_finalizer == []
        assert stop.received == "SIGTERM"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
