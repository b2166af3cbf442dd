"""The daemon against a realistic node (bench/topology.py): latency, scrape time, memory.

Runs `tcprio --config FILE` as a subprocess on loopback (as tests/test_daemon.py does), watching
only this run's namespaces, and measures:

1. event-to-metric latency: a filter added to / deleted from a random pod's node-side veth until
   the daemon publishes a snapshot that has it (its tcprio_last_analysis_timestamp_seconds,
   read from the first /metrics that shows the change, minus the time of the change); baseline:
   until a plain netlink dump of that hook (pyroute2 get_filters) shows it. Three phases: quiet
   (/metrics every --poll-ms), /metrics scraped back to back, and an unrelated tcx link coming
   and going in a namespace the daemon does not watch;
2. /metrics scrape time at N pods, baseline: the same daemon over an empty topology (N=0);
3. resident memory after the first scan and after 1,000 and 10,000 filter changes (and that
   the daemon counted every change in tcprio_filter_changes_total), idle CPU;
4. the daemon's own analysis duration (tcprio_analysis_duration_seconds).

Targets (from the issue; printed, not asserted): a change visible within 200 ms p95 at 200 pod
namespaces, scrapes under 50 ms, RSS under 80 MB and not growing over 10,000 filter changes.

    .venv/bin/python bench/daemon_bench.py [--pods 200] [--profile /tmp/tcprio.prof]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import daemon_process
from daemon_process import Daemon, environment_without_systemd, free_port
from topology import (
    Topology,
    bpf_syscalls,
    cleanup_leftovers,
    entered,
    shared_programs,
    sigterm_as_interrupt,
)

from tcprio.model import Direction

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
BENCH_PRIO = 30  # the filter the benchmark adds and deletes: after Datadog's, transparent
BENCH_PROGRAM = "pass_unspec"
DIRECTION = "egress"
READY_TIMEOUT_S = 120.0
VISIBLE_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1

CONFIG = """\
web:
  listen_address: "127.0.0.1:{port}"
proc_sweep_interval_seconds: 0.5
tcx_poll_interval_seconds: 0.2
debounce_seconds: 0.02
resync_interval_seconds: 30
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


# --- the daemon under test ----------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """How the daemon is started."""

    watchdog_usec: int = 30_000_000  # what systemd/tcprio.service's WatchdogSec=30s hands it
    profile: Path | None = None  # run it under cProfile, stats written here

    def environment(self) -> dict[str, str]:
        # no NOTIFY_SOCKET: the watchdog pings go nowhere
        extra = {"WATCHDOG_USEC": str(self.watchdog_usec)} if self.watchdog_usec else {}
        return environment_without_systemd(extra)


@contextlib.contextmanager
def running_daemon(include: str, workdir: Path, launch: Launch) -> Iterator[Daemon]:
    port = free_port()
    profiler = ["-m", "cProfile", "-o", str(launch.profile)] if launch.profile else []
    text = CONFIG.format(port=port, include=include)
    with daemon_process.running_daemon(text, port, workdir, launch.environment(), profiler) as d:
        yield d


# --- reading /metrics -----------------------------------------------------------------------------


def gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def labels_of(line: str) -> dict[str, str]:
    return dict(LABEL.findall(line[line.index("{") : line.rindex("}")]))


def interfaces_with_bench_filter(text: str, namespace: str) -> set[str]:
    """The node-side veths on which /metrics shows the benchmark's filter."""
    found = set()
    for line in text.splitlines():
        if line.startswith("tcprio_classifier_info{") and f'priority="{BENCH_PRIO}"' in line:
            labels = labels_of(line)
            if (labels.get("netns"), labels.get("direction"), labels.get("hook")) == (
                namespace, DIRECTION, "clsact"
            ):  # fmt: skip
                found.add(labels["interface"])
    return found


def bench_filter_changes(text: str, namespace: str) -> float:
    """The daemon's count of the benchmark's adds and deletes (tcprio_filter_changes_total)."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("tcprio_filter_changes_total{") and f'netns="{namespace}"' in line
                and f'priority="{BENCH_PRIO}"' in line):  # fmt: skip
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- measurements ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def wait_until(
    check: Callable[[], bool], timeout: float = VISIBLE_TIMEOUT_S, interval: float = 0.0
) -> float | None:
    """Seconds until `check()` held, polled every `interval` s (0: back to back); None on
    timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        if interval:
            time.sleep(interval)
    return None


@dataclass
class Latencies:
    poll_ms: float  # how often /metrics was scraped while waiting (0: back to back)
    metrics_ms: list[float] = field(default_factory=list)  # change -> seen in a scrape
    snapshot_ms: list[float] = field(default_factory=list)  # change -> snapshot published
    netlink_ms: list[float] = field(default_factory=list)  # change -> seen in a netlink dump
    analysis_ms: list[float] = field(default_factory=list)  # the daemon's analysis duration
    timeouts: int = 0


class Churn:
    """Adds and deletes the benchmark filter on random pods' node-side veths."""

    def __init__(self, topo: Topology, seed: int) -> None:
        self.topo = topo
        self.rng = random.Random(seed)
        self.with_filter: set[int] = set()
        self.changes = 0

    def one(self) -> tuple[int, bool]:
        """One change: delete where a pod has the filter (half the time), else add one."""
        cap = max(1, min(20, self.topo.n // 2))  # at most this many pods carry the filter
        if self.with_filter and (self.rng.random() < 0.5 or len(self.with_filter) >= cap):
            pod = self.rng.choice(sorted(self.with_filter))
            self.topo.delete_filter(pod, DIRECTION, BENCH_PRIO)
            self.with_filter.discard(pod)
            added = False
        else:
            pod = self.rng.choice([i for i in range(self.topo.n) if i not in self.with_filter])
            self.topo.add_filter(pod, DIRECTION, BENCH_PRIO, BENCH_PROGRAM)
            self.with_filter.add(pod)
            added = True
        self.changes += 1
        return pod, added

    def run(self, count: int, rate: float) -> None:
        """`count` changes at `rate` per second (0: as fast as netlink takes them)."""
        started = time.monotonic()
        for i in range(count):
            self.one()
            if rate:
                delay = started + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


def sample_latency(
    daemon: Daemon, topo: Topology, churn: Churn, poll_s: float, out: Latencies
) -> None:
    """One change, then: until a netlink dump shows it, then until /metrics shows it (scraped
    every `poll_s`); the daemon's own timestamp says when the snapshot with it was published."""
    wall, started = time.time(), time.monotonic()
    pod, added = churn.one()
    ifname = topo.pods_plan[pod].node_if

    def in_dump() -> bool:
        found = any(f["info"] >> 16 == BENCH_PRIO for f in topo.dump_filters(pod, DIRECTION))
        return found == added

    last_scrape = [""]

    def in_metrics() -> bool:
        last_scrape[0] = daemon.metrics()
        return (ifname in interfaces_with_bench_filter(last_scrape[0], topo.node)) == added

    netlink = wait_until(in_dump)
    if netlink is not None:
        out.netlink_ms.append(netlink * 1000)
    if wait_until(in_metrics, interval=poll_s) is None:
        out.timeouts += 1
        return
    out.metrics_ms.append((time.monotonic() - started) * 1000)
    taken_at = gauge(last_scrape[0], "tcprio_last_analysis_timestamp_seconds")
    if taken_at is not None:
        out.snapshot_ms.append(max(0.0, taken_at - wall) * 1000)
    analysis = gauge(last_scrape[0], "tcprio_analysis_duration_seconds")
    if analysis is not None:
        out.analysis_ms.append(analysis * 1000)


def measure_latency(
    daemon: Daemon, topo: Topology, churn: Churn, count: int, poll_s: float
) -> Latencies:
    out = Latencies(poll_ms=poll_s * 1000)
    for _ in range(count):
        time.sleep(0.05)  # let the daemon go idle: each change starts from a quiet loop
        sample_latency(daemon, topo, churn, poll_s, out)
    return out


@contextlib.contextmanager
def unrelated_link_churn(period: float = 0.5) -> Iterator[None]:
    """A tcx link attached and detached every `period` s on a veth of a namespace the daemon
    does not watch (what a CNI using tcx does whenever a pod starts or stops)."""
    done = threading.Event()

    def churn(other: Topology) -> None:
        fd = shared_programs().fd(BENCH_PROGRAM)
        ifindex = other.pods_plan[0].node_ifindex
        while not done.is_set():
            with entered(other.node):
                link = bpf_syscalls.tcx_attach(fd, ifindex, Direction.INGRESS)
            done.wait(period)
            os.close(link)
            done.wait(period)

    with Topology(1, seed=2, tcx_share=0.0) as other:  # its own names: outside the daemon's glob
        thread = threading.Thread(target=churn, args=(other,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


@dataclass
class Scrapes:
    ms: list[float]
    size: int
    series: int


def measure_scrapes(daemon: Daemon, count: int) -> Scrapes:
    times, text = [], ""
    for _ in range(count):
        started = time.monotonic()
        text = daemon.metrics()
        times.append((time.monotonic() - started) * 1000)
    return Scrapes(times, len(text.encode()), series_count(text))


def settle(daemon: Daemon, topo: Topology, churn: Churn, timeout: float = 120.0) -> float:
    """Wait until /metrics shows the churn's final state; returns the counted changes."""
    expected = {topo.pods_plan[i].node_if for i in churn.with_filter}

    def settled() -> bool:
        return interfaces_with_bench_filter(daemon.metrics(), topo.node) == expected

    def poll() -> bool:
        if settled():
            return True
        time.sleep(0.2)
        return False

    wait_until(poll, timeout)
    time.sleep(1.0)  # one more debounce/flush round for the counters
    return bench_filter_changes(daemon.metrics(), topo.node)


class RssTrace:
    """Prints the daemon's RSS after each phase: where memory comes from."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def mark(self, phase: str) -> None:
        rss = self.daemon.status("VmRSS") / 2**20
        print(f"  RSS after {phase}: {rss:.1f} MiB", flush=True)


@dataclass
class Memory:
    rss: dict[str, int] = field(default_factory=dict)  # label -> bytes
    counted: dict[str, float] = field(default_factory=dict)  # label -> changes the daemon counted
    made: dict[str, int] = field(default_factory=dict)  # label -> changes made
    hwm: int = 0


def measure_memory(
    daemon: Daemon, topo: Topology, churn: Churn, checkpoints: Sequence[int], rate: float
) -> Memory:
    out = Memory()
    for target in checkpoints:
        churn.run(max(0, target - churn.changes), rate)
        label = f"after {target:,} changes"
        out.counted[label] = settle(daemon, topo, churn)
        out.made[label] = churn.changes
        out.rss[label] = daemon.status("VmRSS")
        print(f"  {label}: RSS {out.rss[label] / 2**20:.1f} MiB, daemon counted "
              f"{out.counted[label]:.0f} of {churn.changes}", flush=True)  # fmt: skip
    out.hwm = daemon.status("VmHWM")
    return out


# --- the report ---------------------------------------------------------------------------------

Row = tuple[str, str, str, str, str]
MIB = 2**20


def ms(values: Sequence[float], q: float) -> str:
    return f"{percentile(values, q):.1f}" if values else "-"


def p50_p95_max(values: Sequence[float]) -> str:
    return f"{ms(values, 50)} / {ms(values, 95)} / {ms(values, 100)}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def verdict(target: str, met: bool) -> str:
    return f"{target}: {'met' if met else 'MISSED'}"


def table(rows: Sequence[Row]) -> str:
    head = ("measure", "figure", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join("| " + line + " |" for line in lines)


def family_sizes(text: str, top: int = 5) -> list[tuple[str, int, int]]:
    """(family, bytes, series) of the biggest metric families of a /metrics response."""
    sizes: dict[str, list[int]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            entry = sizes.setdefault(name, [0, 0])
            entry[0] += len(line) + 1
            entry[1] += 1
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1][0])[:top]
    return [(name, size, series) for name, (size, series) in ranked]


@dataclass
class Baseline:
    """The same daemon over an empty topology (N=0)."""

    scrapes: Scrapes
    rss: int
    idle_cpu: float


@dataclass
class Results:
    n: int
    ready_s: float
    first_analysis_ms: float
    rss_initial: int
    latency: Latencies
    contended: Latencies  # the same changes while /metrics is scraped back to back
    link_noise: Latencies  # the same changes while an unrelated tcx link comes and goes
    idle_cpu: float  # share of a core, nothing changing, no scrapes
    scrapes: Scrapes
    memory: Memory
    families: list[tuple[str, int, int]]
    revision: str  # the daemon's code when it started
    empty: Baseline | None = None


def latency_rows(lat: Latencies, label: str) -> list[Row]:
    seen, nl, snap = lat.metrics_ms, lat.netlink_ms, lat.snapshot_ms
    scraped = f"every {lat.poll_ms:.0f} ms" if lat.poll_ms else "back to back"
    if not snap:
        return []
    return [
        (f"{label}: change -> snapshot published p50 / p95 / max, ms (n={len(snap)}, "
         f"timeouts {lat.timeouts})", p50_p95_max(snap),
         f"netlink dump {p50_p95_max(nl)}", ratio(percentile(snap, 95), percentile(nl, 95))
         + " (p95)", verdict("< 200 ms p95", percentile(snap, 95) < 200)),
        (f"{label}: change -> seen by a scrape {scraped}, ms", p50_p95_max(seen), "", "", ""),
        (f"{label}: analysis duration of that flush p50 / p95, ms",
         f"{ms(lat.analysis_ms, 50)} / {ms(lat.analysis_ms, 95)}", "", "", ""),
    ]  # fmt: skip


def scrape_rows(s: Scrapes, e: Scrapes) -> list[Row]:
    p95 = percentile(s.ms, 95)
    return [
        ("/metrics scrape p50 / p95, ms", f"{ms(s.ms, 50)} / {ms(s.ms, 95)}",
         f"N=0: {ms(e.ms, 50)} / {ms(e.ms, 95)}", ratio(p95, percentile(e.ms, 95)) + " (p95)",
         verdict("< 50 ms", p95 < 50)),
        ("/metrics size, bytes / series", f"{s.size:,} / {s.series:,}",
         f"N=0: {e.size:,} / {e.series:,}", ratio(s.size, e.size) + " (bytes)", ""),
    ]  # fmt: skip


def memory_rows(r: Results, empty_rss: int) -> list[Row]:
    first = r.rss_initial
    out: list[Row] = [
        ("RSS after the first scan, MiB", f"{first / MIB:.1f}", f"N=0: {empty_rss / MIB:.1f}",
         ratio(first, empty_rss), verdict("< 80 MB", first < 80e6)),
    ]  # fmt: skip
    checkpoints = list(r.memory.rss.items())
    for label, rss in checkpoints:
        counted, made = r.memory.counted[label], r.memory.made[label]
        growth, since_first = rss / first, rss / checkpoints[0][1]
        out.append((f"RSS {label}, MiB (daemon counted {counted:.0f} of {made} changes)",
                    f"{rss / MIB:.1f}", f"first scan {first / MIB:.1f}; {checkpoints[0][0]} "
                    f"{checkpoints[0][1] / MIB:.1f}", f"{growth:.2f}x; {since_first:.2f}x",
                    verdict("< 80 MB, no growth", rss < 80e6 and since_first < 1.05)))  # fmt: skip
    out.append(("peak RSS (VmHWM), MiB", f"{r.memory.hwm / MIB:.1f}", "", "", ""))
    return out


def rows(r: Results) -> list[Row]:
    empty = r.empty or Baseline(Scrapes([], 0, 0), 0, 0.0)
    return [
        *latency_rows(r.latency, "quiet"),
        *latency_rows(r.contended, "scraped back to back"),
        *latency_rows(r.link_noise, "unrelated tcx link churn"),
        ("analysis duration, first full scan, ms", f"{r.first_analysis_ms:.0f}",
         f"ready after {r.ready_s:.1f} s", "", ""),
        ("idle CPU (5 s, no change, no scrape), % of a core", f"{r.idle_cpu:.0%}",
         f"N=0: {empty.idle_cpu:.0%}", "", ""),
        *scrape_rows(r.scrapes, empty.scrapes),
        *memory_rows(r, empty.rss),
    ]  # fmt: skip


def daemon_revision() -> str:
    """The commit the daemon's code comes from, "+ local changes" when its tree differs (git is
    only read)."""
    def git(*argv: str) -> str:
        argv = ("git", "--no-optional-locks", "-C", str(ROOT), *argv)
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "daemon")
    return commit + (" + local changes" if dirty else "")


def machine(revision: str | None = None) -> str:
    return (f"nproc {os.cpu_count()}, kernel {os.uname().release}, "
            f"python {sys.version.split()[0]}, tcprio {revision or daemon_revision()}")  # fmt: skip


def print_report(r: Results, args: argparse.Namespace, workdir: Path) -> None:
    watchdog = f"WATCHDOG_USEC={args.watchdog_usec}" if args.watchdog_usec else "no watchdog"
    print(f"\nN={r.n} pod namespaces, seed {args.seed}, daemon with {watchdog}; "
          f"{machine(r.revision)}")
    if r.revision != daemon_revision():
        print(f"warning: the daemon's code changed during the run (now {daemon_revision()})")
    print(table(rows(r)))
    print("\nbiggest metric families: " + ", ".join(
        f"{name} {size / 1024:.0f} KiB / {series} series" for name, size, series in r.families
    ))  # fmt: skip
    errors = [
        line for log in sorted(workdir.glob("daemon-*.log"))
        for line in log.read_text().splitlines()
        if '"level": "error"' in line or "Traceback" in line
    ]  # fmt: skip
    if errors:
        print(f"\ndaemon errors: {len(errors)}; first: {errors[0][:300]}")


def print_profile(path: Path, top: int = 25) -> None:
    import pstats

    print(f"\ncProfile of the daemon's main thread ({path}), by cumulative time:")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top)


# --- the run ------------------------------------------------------------------------------------


def bench_populated(args: argparse.Namespace, workdir: Path) -> Results:
    revision = daemon_revision()  # what the daemon below imports
    with (
        Topology(args.pods, args.seed) as topo,
        running_daemon(
            topo.include_glob, workdir, Launch(args.watchdog_usec, args.profile)
        ) as daemon,
    ):
        print(f"topology: {args.pods} pods built in {topo.build_seconds:.1f} s", flush=True)
        ready = daemon.wait_ready(READY_TIMEOUT_S)
        text = daemon.metrics()
        first = (gauge(text, "tcprio_analysis_duration_seconds") or 0) * 1000
        rss0 = daemon.status("VmRSS")
        time.sleep(2.0)  # the first scan's aftermath (tcx poll, sweep) settles
        idle = daemon.idle_cpu()
        print(f"daemon ready in {ready:.1f} s; watching "
              f"{gauge(text, 'tcprio_namespaces_watched'):.0f} namespaces, "
              f"{gauge(text, 'tcprio_interfaces_watched'):.0f} interfaces", flush=True)
        churn = Churn(topo, args.seed)
        print(f"latency: {args.changes} changes, /metrics every {args.poll_ms:.0f} ms; "
              f"{args.contended} with /metrics scraped back to back; {args.link_noise} while an "
              "unrelated tcx link comes and goes ...", flush=True)  # fmt: skip
        trace = RssTrace(daemon)
        poll = args.poll_ms / 1000
        latency = measure_latency(daemon, topo, churn, args.changes, poll)
        trace.mark(f"{args.changes} quiet changes")
        contended = measure_latency(daemon, topo, churn, args.contended, 0.0)
        trace.mark(f"{args.contended} changes scraped back to back")
        with unrelated_link_churn():
            link_noise = measure_latency(daemon, topo, churn, args.link_noise, poll)
        trace.mark(f"{args.link_noise} changes with tcx link churn")
        print(f"scrapes: {args.scrapes} ...", flush=True)
        time.sleep(1.0)
        scrapes = measure_scrapes(daemon, args.scrapes)
        families = family_sizes(daemon.metrics())
        trace.mark(f"{args.scrapes} scrapes")
        print(f"memory: churn to {args.checkpoints[-1]:,} changes at {args.rate or 'max'}/s ...",
              flush=True)  # fmt: skip
        memory = measure_memory(daemon, topo, churn, args.checkpoints, args.rate)
    return Results(args.pods, ready, first, rss0, latency, contended, link_noise, idle, scrapes,
                   memory, families, revision)  # fmt: skip


def bench_empty(args: argparse.Namespace, workdir: Path) -> Baseline:
    launch = Launch(args.watchdog_usec)
    with Topology(0, args.seed) as topo, running_daemon(topo.include_glob, workdir, launch) as d:
        d.wait_ready(READY_TIMEOUT_S)
        idle = d.idle_cpu()
        return Baseline(measure_scrapes(d, args.scrapes), d.status("VmRSS"), idle)


def remove_stale_workdirs() -> None:
    """The config and log folders of earlier runs killed with -9 (named after their pid)."""
    for folder in Path(tempfile.gettempdir()).glob("tcpriob-*-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--changes", type=int, default=100, help="latency samples")
    parser.add_argument("--poll-ms", type=float, default=500.0,
                        help="scrape interval while waiting for a change to show")
    parser.add_argument("--contended", type=int, default=20,
                        help="latency samples with /metrics scraped back to back")
    parser.add_argument("--link-noise", type=int, default=20,
                        help="latency samples while an unrelated tcx link comes and goes")
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--checkpoints", type=lambda t: sorted(int(x) for x in t.split(",")),
                        default=[1000, 10_000], metavar="N,N,...",
                        help="measure RSS after this many filter changes in all "
                        "(default 1000,10000)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="filter changes per second during the churn (0: no pause)")
    parser.add_argument("--watchdog-usec", type=int, default=30_000_000,
                        help="WATCHDOG_USEC for the daemon, as systemd/tcprio.service sets it "
                        "(WatchdogSec=30s); 0: none, as in the tests or a container")
    parser.add_argument("--profile", type=Path,
                        help="run the populated daemon under cProfile, write the stats here "
                        "(RSS figures are then the profiler's too)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, BPF)")
    return args  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    cleanup_leftovers()
    remove_stale_workdirs()
    with tempfile.TemporaryDirectory(prefix=f"tcpriob-{os.getpid()}-") as tmp:
        workdir = Path(tmp)
        print(f"machine: {machine()}", flush=True)
        empty = bench_empty(args, workdir)
        results = bench_populated(args, workdir)
        results.empty = empty
        print_report(results, args, workdir)
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted: daemon stopped, namespaces removed", file=sys.stderr)
        raise SystemExit(130) from None
