"""Churn stress: the daemon under thousands of namespace / link / qdisc / filter / tcx changes,
scraped by many concurrent clients, then checked against a fresh `tcprio --scan`.

    .venv/bin/python bench/churn_stress.py [--seconds 180] [--scrapers 50] [--workers 2]
                                           [--seed 1] [--json FILE]

What it does (as root, everything inside network namespaces it creates, `tcprios-<pid>-*`):

1. starts `python -m tcprio --config FILE` on 127.0.0.1, watching only this run's namespaces
   (short sweep / tcx poll / debounce intervals, a full resync every `--resync` seconds);
2. warm-up (one namespace with a veth, filters and a tcx link, created and deleted, and a few
   scrapes), then takes the baseline of the daemon's open fds, threads and VmRSS;
3. for `--seconds`: `--workers` churn processes (seeded) continuously create and delete
   namespaces, veth pairs, clsact qdiscs, cls_bpf filters (add / replace / delete at random
   priorities, programs of bpf/classifiers.c), u32 filters and tcx links; meanwhile
   `--scrapers` client threads hit /metrics (and every 5th request /healthz) back to back,
   half on keep-alive connections, half on a new connection per request, recording every
   status, failure and latency; fds / threads / RSS are sampled every second;
4. churn stops, each worker keeps what it has (a random, non-empty final state); once the
   daemon settled, its tcprio_classifier_info, tcprio_conflict and
   tcprio_recommended_classifier_priority series must equal those built from a fresh
   `tcprio --scan --format json` of the same namespaces;
5. everything is torn down; no series of this run's namespaces may remain, fds and threads
   must be back at the baseline exactly, RSS within max(10 MiB, 25%) of it; the daemon's log
   must hold no traceback and no error-level line, and it must stop cleanly on SIGTERM.

Prints a summary and exits 1 when a check failed (2: the run itself could not be set up).
Ctrl-C / SIGTERM / any failure tears everything down; namespaces of an earlier run that was
killed with -9 are deleted at start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT), str(ROOT / "daemon")]

import daemon_process  # noqa: E402
import topology  # noqa: E402
from daemon_process import Daemon, environment_without_systemd, free_port  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402
from topology import NETNS_DIR, PARENT, TC_H_CLSACT, ip_batch, our_namespaces  # noqa: E402

from tcprio.kernel import bpf_syscalls  # noqa: E402
from tcprio.kernel.namespaces import entered_path  # noqa: E402
from tcprio.model import ETH_P_ALL, Direction  # noqa: E402
from tests.bpf_programs import shared_programs  # noqa: E402

PREFIX = "tcprios-"
TCPRIO = ROOT / ".venv" / "bin" / "tcprio"
ETH_P_IP = 0x0800
PR_SET_PDEATHSIG = 1
MIB = 1024 * 1024
BPF_PROGRAMS = (
    "term_ok", "term_shot", "term_redirect", "pass_unspec", "pass_pipe", "pass_42", "by_packet",
    "classifier_egress", "classifier_ingress", "tail_entry", "bpf2bpf_call",
)  # fmt: skip
TCX_PROGRAMS = ("pass_unspec", "pass_42", "term_ok")
BPF_PRIOS = range(1, 31)
U32_PRIOS = range(40, 50)
RSS_SLACK = (10 * MIB, 0.25)  # final RSS <= baseline + max(10 MiB, 25% of the baseline)

CONFIG = """\
web:
  listen_address: "127.0.0.1:{port}"
proc_sweep_interval_seconds: 0.5
tcx_poll_interval_seconds: 0.2
debounce_seconds: 0.02
resync_interval_seconds: {resync}
namespaces:
  include: ["{include}"]
datadog:
  config_files: []
  scan_processes: false
live_probe: false
metrics:
  full_inventory: true  # the per-hook series this bench reads
log_level: info
"""

SHOWN = ("tcprio_classifier_info", "tcprio_conflict", "tcprio_recommended_classifier_priority")


# --- namespaces of this run and of killed runs -------------------------------------------------


def cleanup_leftovers() -> list[str]:
    """Delete the namespaces of earlier stress runs whose process is gone (killed with -9...)."""
    return topology.cleanup_leftovers(PREFIX)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


# --- churn: one worker process ------------------------------------------------------------------


@dataclass
class Veth:
    name: str
    ifindex: int
    clsact: bool = False
    bpf: dict[tuple[str, int], str] = field(default_factory=dict)  # (direction, prio) -> prog
    u32: dict[tuple[str, int], str] = field(default_factory=dict)  # (direction, prio) -> key
    tcx: list[tuple[str, str, int]] = field(default_factory=list)  # (direction, prog, link fd)


@dataclass
class Ns:
    name: str
    ipr: IPRoute
    veths: dict[str, Veth] = field(default_factory=dict)
    next_veth: int = 0


class Churner:
    """Random changes inside this worker's own namespaces (`<tag>-w<k>-<n>`), seeded."""

    def __init__(self, tag: str, worker: int, seed: int, min_ns: int, max_ns: int) -> None:
        self.tag, self.worker = tag, worker
        self.rng = random.Random(seed * 1000 + worker)
        self.min_ns, self.max_ns = min_ns, max_ns
        self.programs = shared_programs()
        self.pool: dict[str, Ns] = {}
        self.next_ns = 0
        self.changes: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # the kernel said no (bookkeeping off): counted
        self.refusal_samples: list[str] = []

    # namespaces

    def ns_add(self) -> None:
        name = f"{self.tag}-w{self.worker}-{self.next_ns}"
        self.next_ns += 1
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self.changes["netns add"] += 1
        with entered_path(NETNS_DIR / name):
            ipr = IPRoute()
        ipr.link("set", index=1, state="up")
        ns = Ns(name, ipr)
        self.pool[name] = ns
        self.veth_add(ns)

    def ns_del(self, ns: Ns) -> None:
        ns.ipr.close()  # it pins the namespace
        subprocess.run(["ip", "netns", "del", ns.name], check=True, capture_output=True)
        del self.pool[ns.name]
        self.changes["netns del"] += 1
        for veth in ns.veths.values():  # the namespace's cleanup detaches them
            self._close_links(veth)

    def _close_links(self, veth: Veth) -> None:
        for _, _, fd in veth.tcx:
            os.close(fd)
        veth.tcx.clear()

    # links and qdiscs

    def veth_add(self, ns: Ns) -> None:
        a, b = f"va{ns.next_veth}", f"vb{ns.next_veth}"
        ns.next_veth += 1
        ns.ipr.link("add", ifname=a, kind="veth", peer=b)
        self.changes["veth add"] += 1
        for name in (a, b):
            idx = ns.ipr.link_lookup(ifname=name)[0]
            ns.ipr.link("set", index=idx, state="up")
            ns.veths[name] = Veth(name, idx)
            if self.rng.random() < 0.8:
                self.qdisc_add(ns, ns.veths[name])

    def veth_del(self, ns: Ns, veth: Veth) -> None:
        peer = ("vb" if veth.name.startswith("va") else "va") + veth.name[2:]
        ns.ipr.link("del", index=veth.ifindex)
        self.changes["veth del"] += 1
        for name in (veth.name, peer):
            gone = ns.veths.pop(name, None)
            if gone is not None:
                self._close_links(gone)

    def qdisc_add(self, ns: Ns, veth: Veth) -> None:
        ns.ipr.tc("add", "clsact", veth.ifindex)
        veth.clsact = True
        self.changes["qdisc add"] += 1

    def qdisc_del(self, ns: Ns, veth: Veth) -> None:
        ns.ipr.tc("del", "clsact", veth.ifindex, parent=TC_H_CLSACT)
        veth.clsact = False
        veth.bpf.clear()
        veth.u32.clear()
        self.changes["qdisc del"] += 1

    # filters

    def bpf_set(self, ns: Ns, veth: Veth, replace_one: bool = False) -> None:
        if replace_one and veth.bpf:
            direction, prio = self.rng.choice(sorted(veth.bpf))
        else:
            direction = self.rng.choice(("ingress", "egress"))
            prio = self.rng.choice(BPF_PRIOS)
        program = self.rng.choice(BPF_PROGRAMS)
        replace = (direction, prio) in veth.bpf
        ns.ipr.tc(
            "replace-filter" if replace else "add-filter", "bpf", veth.ifindex, 1,
            fd=self.programs.fd(program), name=program, parent=PARENT[direction], classid=1,
            direct_action=True, prio=prio, protocol=ETH_P_ALL,
        )  # fmt: skip
        veth.bpf[(direction, prio)] = program
        self.changes["cls_bpf replace" if replace else "cls_bpf add"] += 1

    def bpf_del(self, ns: Ns, veth: Veth) -> None:
        direction, prio = self.rng.choice(sorted(veth.bpf))
        ns.ipr.tc("del-filter", "bpf", veth.ifindex, 1, parent=PARENT[direction], prio=prio,
                  protocol=ETH_P_ALL)  # fmt: skip
        del veth.bpf[(direction, prio)]
        self.changes["cls_bpf del"] += 1

    def u32_add(self, ns: Ns, veth: Veth) -> None:
        free = [(d, p) for d in ("ingress", "egress") for p in U32_PRIOS if (d, p) not in veth.u32]
        direction, prio = self.rng.choice(free)
        key = f"0x{self.rng.getrandbits(32):08x}/0xffffffff+12"
        ns.ipr.tc("add-filter", "u32", veth.ifindex, parent=PARENT[direction], prio=prio,
                  protocol=ETH_P_IP, target=0x10001, keys=[key])  # fmt: skip
        veth.u32[(direction, prio)] = key
        self.changes["u32 add"] += 1

    def u32_del(self, ns: Ns, veth: Veth) -> None:
        direction, prio = self.rng.choice(sorted(veth.u32))
        # pyroute2 wants the match to build the request; no handle: the whole priority goes
        ns.ipr.tc("del-filter", "u32", veth.ifindex, parent=PARENT[direction], prio=prio,
                  protocol=ETH_P_IP, target=0x10001,
                  keys=[veth.u32[(direction, prio)]])  # fmt: skip
        del veth.u32[(direction, prio)]
        self.changes["u32 del"] += 1

    def tcx_attach(self, ns: Ns, veth: Veth) -> None:
        direction = self.rng.choice(list(Direction))
        taken = {p for d, p, _ in veth.tcx if d == direction}  # once per hook (else EEXIST)
        free = [p for p in TCX_PROGRAMS if p not in taken]
        if not free:
            return self.tcx_close(veth)
        program = self.rng.choice(free)
        with entered_path(NETNS_DIR / ns.name):
            fd = bpf_syscalls.tcx_attach(self.programs.fd(program), veth.ifindex, direction)
        veth.tcx.append((str(direction), program, fd))
        self.changes["tcx attach"] += 1

    def tcx_close(self, veth: Veth) -> None:
        _, _, fd = veth.tcx.pop(self.rng.randrange(len(veth.tcx)))
        os.close(fd)
        self.changes["tcx close"] += 1

    # one random change

    def step(self) -> None:
        r = self.rng.random()
        if not self.pool or (len(self.pool) < self.max_ns and r < 0.03):
            return self.ns_add()
        ns = self.pool[self.rng.choice(sorted(self.pool))]
        if len(self.pool) > self.min_ns and r < 0.06:
            return self.ns_del(ns)
        if not ns.veths or (len(ns.veths) < 6 and r < 0.10):
            return self.veth_add(ns)
        veth = ns.veths[self.rng.choice(sorted(ns.veths))]
        if r < 0.13:
            return self.veth_del(ns, veth)
        if not veth.clsact:
            return self.qdisc_add(ns, veth)
        if r < 0.15:
            return self.qdisc_del(ns, veth)
        coin = self.rng.random() < 0.5
        if r < 0.22:
            if veth.tcx and (coin or len(veth.tcx) >= 4):
                return self.tcx_close(veth)
            return self.tcx_attach(ns, veth)
        if r < 0.32:
            if veth.u32 and (coin or len(veth.u32) >= 4):
                return self.u32_del(ns, veth)
            return self.u32_add(ns, veth)
        if r < 0.40:
            return self.bpf_set(ns, veth, replace_one=True)
        if veth.bpf and (coin or len(veth.bpf) >= 8):
            return self.bpf_del(ns, veth)
        return self.bpf_set(ns, veth)

    def run(self, stop: threading.Event | mp.synchronize.Event, rate: float, done=None) -> None:
        """Changes until `stop`, `rate` per second at most (0: as fast as the kernel takes them).

        `done`, a shared integer, follows the number of changes made so far."""
        started, n = time.monotonic(), 0
        while not stop.is_set():
            if done is not None:
                done.value = sum(self.changes.values())
            n += 1
            if rate and (delay := started + n / rate - time.monotonic()) > 0:
                time.sleep(delay)
            try:
                self.step()
            except (OSError, subprocess.CalledProcessError) as exc:
                kind = type(exc).__name__ + (f" errno {exc.errno}" if isinstance(exc, OSError)
                                             else "")  # fmt: skip
                self.refused[kind] += 1
                if len(self.refusal_samples) < 5:
                    self.refusal_samples.append(repr(exc)[:200])
                self._resync_bookkeeping()

    def _resync_bookkeeping(self) -> None:
        """After a refused change: forget the namespaces we can no longer trust (rare)."""
        for name in [n for n in self.pool if not (NETNS_DIR / n).exists()]:
            ns = self.pool.pop(name)
            ns.ipr.close()

    def final_state(self) -> dict[str, int]:
        veths = [v for ns in self.pool.values() for v in ns.veths.values()]
        return {
            "namespaces": len(self.pool),
            "veth ends": len(veths),
            "cls_bpf": sum(len(v.bpf) for v in veths),
            "u32": sum(len(v.u32) for v in veths),
            "tcx links": sum(len(v.tcx) for v in veths),
        }

    def teardown(self) -> None:
        for ns in list(self.pool.values()):
            ns.ipr.close()
        ip_batch([f"netns del {n}" for n in self.pool], check=False)
        for ns in self.pool.values():
            for veth in ns.veths.values():
                self._close_links(veth)
        self.pool.clear()


def worker_main(tag: str, worker: int, seed: int, min_ns: int, max_ns: int, rate: float, stop,
                teardown, results, done) -> None:  # fmt: skip
    """A churn process: changes until `stop`, reports, keeps its state until `teardown`."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when it ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    churner = Churner(tag, worker, seed, min_ns, max_ns)
    try:
        for _ in range(min_ns):
            churner.ns_add()
        churner.run(stop, rate, done)
        results.put({
            "worker": worker, "changes": dict(churner.changes), "refused": dict(churner.refused),
            "refusal_samples": churner.refusal_samples, "final": churner.final_state(),
        })  # fmt: skip
        teardown.wait()
    except BaseException as exc:  # reported, then the namespaces go
        where = traceback.extract_tb(exc.__traceback__)[-1]
        results.put({"worker": worker, "error": f"{type(exc).__name__}: {exc} "
                     f"({Path(where.filename).name}:{where.lineno})"})
    finally:
        churner.teardown()


# --- the daemon ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_daemon(include: str, workdir: Path, resync: float) -> Iterator[Daemon]:
    port = free_port()
    text = CONFIG.format(port=port, include=include, resync=resync)
    with daemon_process.running_daemon(text, port, workdir, environment_without_systemd()) as d:
        yield d


# --- scrapers ------------------------------------------------------------------------------------


@dataclass
class ScrapeStats:
    latencies_ms: list[float] = field(default_factory=list)  # every request
    metrics_ms: list[float] = field(default_factory=list)  # /metrics only
    statuses: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    failure_samples: list[str] = field(default_factory=list)
    parsed: int = 0

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.failure_samples) < 10:
            self.failure_samples.append(f"{kind}: {detail[:200]}")


def check_metrics_body(body: bytes, parse: bool) -> str | None:
    """Why this /metrics body is bad, or None."""
    if not body.endswith(b"\n") or b"tcprio_build_info" not in body:
        return "truncated"
    if b"tcprio_classifier_runs_total" not in body:  # the last part of the body
        return "incomplete"
    if parse:
        try:
            families = list(text_string_to_metric_families(body.decode()))
        except Exception as exc:  # the parser raises ValueError and friends
            return f"unparsable: {exc}"
        if not families:
            return "empty"
    return None


def scraper(port: int, index: int, stop: threading.Event, parse_every: int,
            out: ScrapeStats) -> None:  # fmt: skip
    keep_alive = index % 2 == 0
    conn: http.client.HTTPConnection | None = None
    n = scraped = 0
    while not stop.is_set():
        n += 1
        path = "/healthz" if n % 5 == 0 else "/metrics"
        scraped += path == "/metrics"
        started = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            out.latencies_ms.append(elapsed)
            if path == "/metrics":
                out.metrics_ms.append(elapsed)
            out.statuses[f"{path} {response.status}"] += 1
            if response.status != 200:
                out.fail("status", f"{path} {response.status}")
            elif path == "/metrics":
                parse = scraped % parse_every == 0
                problem = check_metrics_body(body, parse)
                out.parsed += parse
                if problem:
                    out.fail(problem.split(":")[0], problem)
            elif body != b"ok\n":
                out.fail("healthz body", repr(body))
        except (OSError, http.client.HTTPException) as exc:
            out.fail("connection", f"{type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
            conn = None
            continue
        if not keep_alive or response.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --- comparing the daemon with a fresh scan -----------------------------------------------------

Series = Counter  # (name, frozenset of labels) -> how many such series


def shown_series(text: str) -> Series:
    """The classifier / conflict / recommendation series of a /metrics body."""
    series: Series = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in SHOWN:
                series[(s.name, frozenset(s.labels.items()), s.value)] += 1
    return series


def _s(value: object) -> str:
    return "" if value is None else str(value)


def classifier_labels(
    ns: str, iface: str, direction: str, c: dict, tags: dict[str, str]
) -> dict[str, str]:
    return {
        "netns": ns, "interface": iface, "direction": direction, "hook": c["hook"],
        "priority": _s(c["priority"]),
        "handle": "" if c["handle"] is None else f"{c['handle']:#x}",
        "kind": c["kind"], "prog_id": _s(c["prog_id"]), "prog_name": c["name"],
        "prog_tag": tags.get(_s(c["prog_id"]), ""),
        "vendor": c["vendor"] or "", "verdict_class": c["verdict_class"],
        "datadog": "true" if c["is_datadog"] else "false",
    }  # fmt: skip


def scan_series(doc: dict) -> Series:
    """The same series, built from a `tcprio --scan --format json` document."""
    series: Series = Counter()
    tags = {pid: p["tag"] for pid, p in doc["programs"].items()}
    for ns in doc["namespaces"]:
        for iface in ns["interfaces"]:
            for hook in iface["hooks"]:
                for c in hook["classifiers"]:
                    labels = classifier_labels(ns["name"], iface["name"], hook["direction"], c,
                                               tags)  # fmt: skip
                    series[("tcprio_classifier_info", frozenset(labels.items()), 1.0)] += 1
    for c in doc["conflicts"]:
        b = c["blocker"]
        labels = {
            "netns": c["namespace"], "interface": c["interface"],
            "direction": c["direction"], "severity": c["severity"], "hook": b["hook"],
            "blocker": b["name"], "blocker_tag": tags.get(_s(b["prog_id"]), ""),
            "blocker_priority": _s(b["priority"]), "blocker_vendor": b["vendor"] or "",
            "datadog_priority": _s(c["datadog_priority"]),
        }  # fmt: skip
        series[("tcprio_conflict", frozenset(labels.items()), 1.0)] += 1
    if doc["recommended_classifier_priority"] is not None:
        value = float(doc["recommended_classifier_priority"])
        series[("tcprio_recommended_classifier_priority", frozenset(), value)] += 1
    return series


def fresh_scan(glob: str) -> dict:
    proc = subprocess.run(
        [str(TCPRIO), "--scan", "--format", "json", "--netns", glob, "--no-agent-process",
         "--no-datadog-config"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if proc.returncode not in (0, 1, 2):
        raise RuntimeError(f"tcprio --scan failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return json.loads(proc.stdout)


def series_of_namespaces(text: str, prefix: str) -> list[str]:
    """Every series line that names one of this run's namespaces."""
    return [line for line in text.splitlines()
            if not line.startswith("#") and f'netns="{prefix}' in line]  # fmt: skip


def counter_values(text: str, name: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'^{name}{{\w+="([^"]*)"}} (\S+)$', text, re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """The first truthy predicate() within timeout, else the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def warm_up(daemon: Daemon, tag: str) -> None:
    """One namespace with a veth, a qdisc, filters and a tcx link, then gone; a few scrapes.
    What the daemon allocates once (helper cache, program cache, first HTTP threads) is then
    part of the baseline, so the baseline is steady state, not start-up."""
    name = f"{tag}-warmup"
    churner = Churner(tag, 99, 0, 0, 1)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    with entered_path(NETNS_DIR / name):
        ipr = IPRoute()
    ns = Ns(name, ipr)
    try:
        churner.veth_add(ns)
        veth = next(iter(ns.veths.values()))
        if not veth.clsact:
            churner.qdisc_add(ns, veth)
        churner.bpf_set(ns, veth)
        churner.u32_add(ns, veth)
        churner.tcx_attach(ns, veth)
        wait_for(lambda: f'netns="{name}"' in daemon.metrics(), 15)
    finally:
        ipr.close()
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        for v in ns.veths.values():
            churner._close_links(v)
    wait_for(lambda: f'netns="{name}"' not in daemon.metrics(), 15)
    for _ in range(20):
        daemon.get("/metrics")


def settle_resources(daemon: Daemon, baseline: dict[str, int], timeout: float) -> dict[str, int]:
    """Resources once threads and fds are back at the baseline (or the timeout passed)."""
    last = daemon.resources()

    def back() -> bool:
        nonlocal last
        last = daemon.resources()
        return last["fds"] == baseline["fds"] and last["Threads"] == baseline["Threads"]

    wait_for(back, timeout, 0.5)
    return last


def run(args: argparse.Namespace, report: Report) -> None:
    tag = f"{PREFIX}{os.getpid()}"
    glob = f"{tag}-*"
    report.figures["tag"] = tag
    programs = shared_programs()  # compiled once here; the workers inherit the loaded programs
    del programs
    workdir = Path(tempfile.mkdtemp(prefix="tcprio-churn-"))
    ctx = mp.get_context("fork")  # before any thread of ours exists
    stop, teardown, results = ctx.Event(), ctx.Event(), ctx.Queue()
    done = [ctx.Value("q", 0, lock=False) for _ in range(args.workers)]  # changes per worker
    workers: list = []
    started_at = time.monotonic()
    try:
        with running_daemon(glob, workdir, args.resync) as daemon:
            daemon.wait_ready()
            report.figures["ready_s"] = round(time.monotonic() - started_at, 2)
            first = daemon.resources()
            warm_up(daemon, tag)
            time.sleep(1.0)  # the warm-up's connection threads end
            baseline = daemon.resources()
            text = daemon.metrics()
            scans_before = counter_values(text, "tcprio_scans_total")
            report.figures["after_first_scan"] = first
            report.figures["baseline"] = baseline

            # churn and scrapers
            workers = [
                ctx.Process(target=worker_main, name=f"churn-{k}", daemon=True, args=(
                    tag, k, args.seed, args.min_namespaces, args.max_namespaces, args.rate, stop,
                    teardown, results, done[k]))
                for k in range(args.workers)
            ]  # fmt: skip
            for w in workers:
                w.start()
            scrape_stop = threading.Event()
            stats = [ScrapeStats() for _ in range(args.scrapers)]
            scrapers = [
                threading.Thread(target=scraper, args=(daemon.port, i, scrape_stop,
                                                       args.parse_every, stats[i]), daemon=True)
                for i in range(args.scrapers)
            ]  # fmt: skip
            churn_started = time.monotonic()
            for t in scrapers:
                t.start()
            samples = [baseline]
            def enough() -> bool:
                """--seconds passed and, with --until-enough, the work the checks ask for done."""
                elapsed = time.monotonic() - churn_started
                if elapsed < args.seconds:
                    return False
                if not args.until_enough or elapsed >= args.max_seconds:
                    return True
                changes_so_far = sum(d.value for d in done)
                scrapes_so_far = sum(len(s.latencies_ms) for s in stats)
                return changes_so_far >= args.min_changes and scrapes_so_far >= args.min_scrapes

            while not enough():
                time.sleep(1.0)
                if daemon.proc.poll() is not None:
                    break
                samples.append(daemon.resources())
                if any(not w.is_alive() for w in workers):
                    break
            stop.set()
            scrape_stop.set()
            churn_seconds = time.monotonic() - churn_started
            for t in scrapers:
                t.join(timeout=60)
            report.figures["churn_seconds"] = round(churn_seconds, 1)
            worker_results = [results.get(timeout=60) for _ in workers]
            errors = [r["error"] for r in worker_results if "error" in r]
            report.check("churn workers ran to the end", not errors, "; ".join(errors))
            report.check("daemon alive after churn", daemon.proc.poll() is None)
            if daemon.proc.poll() is not None:
                return
            changes: Counter[str] = Counter()
            refused: Counter[str] = Counter()
            final: Counter[str] = Counter()
            refusal_samples: list[str] = []
            for r in worker_results:
                changes.update(r.get("changes", {}))
                refused.update(r.get("refused", {}))
                final.update(r.get("final", {}))
                refusal_samples += r.get("refusal_samples", [])
            report.figures["changes"] = dict(sorted(changes.items()))
            report.figures["changes_total"] = sum(changes.values())
            report.figures["refused"] = dict(refused)
            report.figures["refusal_samples"] = refusal_samples[:5]
            report.figures["final_state"] = dict(final)
            report.check("thousands of changes", sum(changes.values()) >= args.min_changes,
                         f"{sum(changes.values())} (at least {args.min_changes})")

            # scrapes
            all_ms = [ms for s in stats for ms in s.latencies_ms]
            metrics_ms = [ms for s in stats for ms in s.metrics_ms]
            failures: Counter[str] = Counter()
            statuses: Counter[str] = Counter()
            for s in stats:
                failures.update(s.failures)
                statuses.update(s.statuses)
            report.figures["scrapes"] = {
                "requests": len(all_ms), "by_status": dict(statuses),
                "failures": dict(failures), "parsed": sum(s.parsed for s in stats),
                "failure_samples": [x for s in stats for x in s.failure_samples][:10],
                "p50_ms": round(percentile(all_ms, 50), 1),
                "p95_ms": round(percentile(all_ms, 95), 1),
                "p99_ms": round(percentile(all_ms, 99), 1),
                "max_ms": round(max(all_ms, default=float("nan")), 1),
                "per_second": round(len(all_ms) / churn_seconds, 1),
                "metrics_p50_p95_p99_max_ms": [
                    round(percentile(metrics_ms, q), 1) for q in (50, 95, 99, 100)
                ],
            }  # fmt: skip
            report.check("no failed scrape", not failures and all_ms,
                         f"{sum(failures.values())} failures of {len(all_ms)}")
            report.check("every scraper stopped", not any(t.is_alive() for t in scrapers))

            # the final state: the daemon against a fresh scan
            attempts, equal, diff = 0, False, ""
            deadline = time.monotonic() + args.settle_timeout
            time.sleep(1.0)
            while time.monotonic() < deadline:
                attempts += 1
                doc = fresh_scan(glob)
                text = daemon.metrics()
                expected, got = scan_series(doc), shown_series(text)
                doc_again = fresh_scan(glob)  # the state must not have moved meanwhile
                if scan_series(doc_again) != expected:
                    continue
                if got == expected:
                    equal, diff = True, f"at attempt {attempts}"
                    break
                missing, extra = expected - got, got - expected
                diff = (f"{sum(missing.values())} series missing, {sum(extra.values())} extra; "
                        f"e.g. missing {sorted(missing)[:1]} extra {sorted(extra)[:1]}")
                time.sleep(0.5)
            classifiers = sum(n for (name, _, _), n in expected.items()
                              if name == "tcprio_classifier_info")  # fmt: skip
            conflicts = sum(n for (name, _, _), n in expected.items() if name == "tcprio_conflict")
            report.figures["final_compare"] = {
                "attempts": attempts, "classifier_series": classifiers,
                "conflict_series": conflicts,
                "recommended": doc["recommended_classifier_priority"],
                "namespaces": len(doc["namespaces"]),
            }  # fmt: skip
            report.check("final state not empty", classifiers > 0 and conflicts > 0,
                         f"{classifiers} classifiers, {conflicts} conflicts")
            report.check("final /metrics equal a fresh --scan", equal, diff)

            # teardown: every series of our namespaces goes, resources back at the baseline
            teardown.set()
            for w in workers:
                w.join(timeout=60)
            ip_batch([f"netns del {n}" for n in our_namespaces(tag + "-")], check=False)
            left = wait_for(lambda: not series_of_namespaces(daemon.metrics(), tag), 30)
            text = daemon.metrics()
            stale = series_of_namespaces(text, tag)
            report.check("no series left for vanished namespaces", left and not stale,
                         f"{len(stale)} left, e.g. {stale[:2]}")
            final_res = settle_resources(daemon, baseline, args.settle_timeout)
            peak = {k: max(s[k] for s in samples) for k in baseline}
            report.figures["resources"] = {"baseline": baseline, "peak": peak,
                                           "final": final_res}  # fmt: skip
            report.check("fds back at the baseline", final_res["fds"] == baseline["fds"],
                         f"{baseline['fds']} -> peak {peak['fds']} -> {final_res['fds']}")
            report.check("threads back at the baseline",
                         final_res["Threads"] == baseline["Threads"],
                         f"{baseline['Threads']} -> peak {peak['Threads']} -> "
                         f"{final_res['Threads']}")  # fmt: skip
            slack = max(RSS_SLACK[0], RSS_SLACK[1] * baseline["VmRSS"])
            report.check("RSS back near the baseline",
                         final_res["VmRSS"] <= baseline["VmRSS"] + slack,
                         f"{baseline['VmRSS'] / MIB:.1f} -> peak {peak['VmRSS'] / MIB:.1f} -> "
                         f"{final_res['VmRSS'] / MIB:.1f} MiB (allowed +{slack / MIB:.1f})")

            # scans done, errors counted
            scans_after = counter_values(text, "tcprio_scans_total")
            errors_total = counter_values(text, "tcprio_scan_errors_total")
            done = {k: scans_after.get(k, 0) - scans_before.get(k, 0) for k in scans_after}
            report.figures["scans"] = done
            report.figures["scan_errors"] = errors_total
            report.check("full and incremental scans completed during the run",
                         done.get("full", 0) >= max(1, churn_seconds // args.resync - 1)
                         and done.get("incremental", 0) >= 10, str(done))  # fmt: skip
            hard = {k: v for k, v in errors_total.items() if k in ("analyse", "discover") and v}
            report.check("no analysis or discovery error", not hard, str(hard))
            report.check("daemon still answers /healthz", daemon.get("/healthz")[0] == 200)
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                code = daemon.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                code = None
            report.check("daemon stops cleanly on SIGTERM", code == 0, f"exit {code}")
        check_log(daemon.log, report)
    finally:
        stop.set()
        teardown.set()
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
        ip_batch([f"netns del {n}" for n in our_namespaces(tag + "-")], check=False)
        report.figures["duration_s"] = round(time.monotonic() - started_at, 1)
        report.figures["daemon_log"] = str(workdir / "daemon.log")


def check_log(log: Path, report: Report) -> None:
    text = log.read_text()
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    bad: list[str] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        levels[record.get("level", "?")] += 1
        if record.get("level") in ("warning", "error"):
            messages[f"{record['level']}: {record.get('msg')}"] += 1
    report.figures["log"] = {"levels": dict(levels), "warnings_and_errors": dict(messages)}
    report.check("no traceback in the daemon's log", "Traceback" not in text)
    report.check("every log line is a JSON record", not bad, f"{len(bad)}: {bad[:2]}")
    report.check("no error-level line, no failed step",
                 levels.get("error", 0) == 0 and "step failed" not in text,
                 str({k: v for k, v in messages.items() if k.startswith("error")}))
    report.check("the daemon logged its stop", '"msg": "stopped"' in text)


def summary(report: Report) -> str:
    f = report.figures
    lines = []
    s = f.get("scrapes", {})
    res = f.get("resources", {})
    rows = [
        ("duration (churn / whole run), s", f"{f.get('churn_seconds')} / {f.get('duration_s')}"),
        ("changes in all", f"{f.get('changes_total')}"),
        *[(f"  {k}", str(v)) for k, v in f.get("changes", {}).items()],
        ("changes refused by the kernel", str(f.get("refused"))),
        ("final state (compared with --scan)", str(f.get("final_state"))),
        ("final comparison", str(f.get("final_compare"))),
        ("scrapes: requests (per s)", f"{s.get('requests')} ({s.get('per_second')})"),
        ("scrapes: by status", str(s.get("by_status"))),
        ("scrapes: failures", str(s.get("failures"))),
        ("/metrics only: p50 / p95 / p99 / max, ms",
         " / ".join(str(x) for x in s.get("metrics_p50_p95_p99_max_ms", []))),
        ("scrapes: bodies parsed", str(s.get("parsed"))),
        ("scrape latency p50 / p95 / p99 / max, ms",
         f"{s.get('p50_ms')} / {s.get('p95_ms')} / {s.get('p99_ms')} / {s.get('max_ms')}"),
    ]  # fmt: skip
    for key, unit, scale in (("fds", "", 1), ("Threads", "", 1), ("VmRSS", " MiB", MIB)):
        if res:
            b, p, fin = (res[x][key] / scale for x in ("baseline", "peak", "final"))
            rows.append((f"{key} baseline / peak / final{unit}",
                         f"{b:.1f} / {p:.1f} / {fin:.1f}" if scale != 1
                         else f"{b:.0f} / {p:.0f} / {fin:.0f}"))  # fmt: skip
    rows += [
        ("scans done (full / incremental)", str(f.get("scans"))),
        ("scan errors (counter)", str(f.get("scan_errors"))),
        ("daemon log", str(f.get("log"))),
    ]
    width = max(len(r[0]) for r in rows)
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    for name, ok, detail in report.checks:
        lines.append(f"[{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
    lines.append("RESULT: " + ("PASS" if report.ok else "FAIL"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="churn processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-namespaces", type=int, default=3, help="per worker, kept at end")
    parser.add_argument("--max-namespaces", type=int, default=8, help="per worker")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="changes per second per worker at most (0: unlimited)")
    parser.add_argument("--resync", type=float, default=10.0, help="full resync interval, s")
    parser.add_argument("--parse-every", type=int, default=10,
                        help="parse every Nth /metrics body of each scraper with "
                             "prometheus_client (all are checked for truncation)")  # fmt: skip
    parser.add_argument("--min-changes", type=int, default=1000)
    parser.add_argument("--min-scrapes", type=int, default=0, help="checked with --until-enough")
    parser.add_argument("--until-enough", action="store_true",
                        help="after --seconds, go on until --min-changes changes and "
                             "--min-scrapes scrapes are done (a slow machine then runs longer "
                             "rather than failing), at most --max-seconds")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--settle-timeout", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="write the figures and checks here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, BPF)")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    stale = cleanup_leftovers()
    if stale:
        print(f"removed {len(stale)} namespaces left over by earlier runs", flush=True)
    report = Report()
    code = 0
    try:
        run(args, report)
    except KeyboardInterrupt:
        report.check("not interrupted", False, "Ctrl-C / SIGTERM: namespaces removed")
        code = 130
    except Exception as exc:
        report.check("the run itself", False, f"{type(exc).__name__}: {exc}")
        code = 2
    print(summary(report), flush=True)
    if args.json:
        payload = {"ok": report.ok, "figures": report.figures,
                   "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in report.checks]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return code or (0 if report.ok else 1)


if __name__ == "__main__":
    raise SystemExit(main())
