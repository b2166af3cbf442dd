"""The daemon's cost at rest: CPU per minute with nothing changing, CPU per 1,000 filter changes,
RSS, and the event latency alongside (so a cheaper rest does not buy a slower daemon).

Runs `tcprio --config FILE` as a subprocess (daemon_process.py) with the production defaults
(`tcx_poll_interval_seconds` 1, `proc_sweep_interval_seconds` 10, `debounce_seconds` 0.05,
`resync_interval_seconds` 300: the keys are left out of its configuration), watching only this
run's namespaces (bench/topology.py), twice in one invocation:

1. baseline: over an empty topology (N=0): the fixed cost of the loop, the watchdog and the
   polls with nothing to watch;
2. N pods (`--pods`, default 200): once ready and settled, `--repeat` rest windows of
   `--window` s each (CPU = utime + stime of the daemon's process from /proc/<pid>/stat, not
   wall time, so another guest on the machine does not count), then `--latency` change ->
   snapshot samples, then 1,000 filter changes (add/delete cycles at `--rate` per second) and
   the CPU they cost above the rest rate, then RSS.

Figures are printed with their ratio to the N=0 baseline of the same invocation.

    .venv/bin/python bench/rest_bench.py [--pods 200] [--window 60] [--repeat 3]
                                         [--profile FILE] [--strace SECONDS]

`--baseline-tree DIR` also runs the N-pod phase with the `tcprio` package in DIR (a copy of
`daemon/` before a change), for a before/after in one invocation.
`--profile FILE` runs the N-pod daemon under cProfile (main thread) and prints its top
functions after the run; `--strace SECONDS` counts the N-pod daemon's syscalls (all threads,
`strace -c -f`) over one more rest window of that length.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import daemon_bench
import daemon_process
from daemon_bench import Churn, Latencies, gauge, measure_latency, settle
from daemon_process import Daemon, environment_without_systemd, free_port
from topology import Topology, bpf_syscalls, cleanup_leftovers, sigterm_as_interrupt

READY_TIMEOUT_S = 120.0
# The configuration keeps the older `listen_address` key (deprecated, still read): the
# --baseline-tree daemon may predate `web.listen_address`.
SETTLE_S = 15.0  # after ready: the first polls, sweeps and the first run-stats window
SCHED_CLS = 3  # BPF_PROG_TYPE_SCHED_CLS

CONFIG = """\
listen_address: "127.0.0.1:{port}"
namespaces:
  include: ["{include}"]
datadog:
  config_files: []
  scan_processes: false
live_probe: false
log_level: info
metrics:
  full_inventory: true  # the latency probe reads per-hook filter counters
"""


@contextlib.contextmanager
def running_daemon(
    include: str, workdir: Path, profile: Path | None, tree: Path | None = None
) -> Iterator[Daemon]:
    """The daemon of this repository, or the `tcprio` package found in `tree`."""
    port = free_port()
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    extra = {"WATCHDOG_USEC": "30000000"}  # what WatchdogSec=30s hands it
    if tree is not None:
        extra["PYTHONPATH"] = str(tree)
    env = environment_without_systemd(extra)
    text = CONFIG.format(port=port, include=include)
    with daemon_process.running_daemon(text, port, workdir, env, profiler) as daemon:
        yield daemon


@dataclass
class Neighbours:
    """What others did on the host during a window (the daemon reacts to it by design):
    classifier programs loaded anywhere, named namespaces created or deleted anywhere."""

    programs: int = 0
    namespaces: int = 0

    def __str__(self) -> str:
        return f"host activity: {self.programs} classifiers loaded, {self.namespaces} netns changes"


def _named() -> set[str]:
    with contextlib.suppress(OSError):
        return set(os.listdir("/run/netns"))
    return set()


def watch_neighbours(seconds: float, step: float = 0.25) -> Neighbours:
    """Sleep `seconds`, counting what others do on the host meanwhile."""
    seen = Neighbours()
    newest = max(bpf_syscalls.list_prog_ids(), default=0)
    names = _named()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(step, left))
        new = bpf_syscalls.prog_ids_after(newest)
        newest = new[-1] if new else newest
        for prog_id in new:
            with contextlib.suppress(OSError):
                seen.programs += bpf_syscalls.prog_type(prog_id) == SCHED_CLS
        now = _named()
        seen.namespaces += len(now ^ names)
        names = now
    return seen


def rest_cpu(daemon: Daemon, seconds: float) -> tuple[float, Neighbours]:
    """CPU seconds per minute the daemon used over `seconds` with nothing changing here."""
    before, started = daemon.cpu_seconds(), time.monotonic()
    neighbours = watch_neighbours(seconds)
    used, elapsed = daemon.cpu_seconds() - before, time.monotonic() - started
    return used / elapsed * 60, neighbours


def strace_counts(pid: int, seconds: float) -> str:
    """`strace -c -f` attached to the daemon for `seconds`: its syscall summary."""
    argv = ["strace", "-c", "-f", "-p", str(pid)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    proc.terminate()
    return proc.communicate(timeout=30)[1]


@dataclass
class Run:
    pods: int
    tree: Path | None = None  # the daemon's code, when not this repository's
    rest: list[float] = field(default_factory=list)  # CPU s per minute, one per window
    quiet: list[float] = field(default_factory=list)  # those of windows the host was quiet
    rss: int = 0
    rss_after_changes: int = 0
    changes: int = 0
    change_cpu: float = 0.0  # CPU s for `changes` changes, above the rest rate
    change_seconds: float = 0.0
    latency: Latencies | None = None
    strace: str = ""


def measure_changes(daemon: Daemon, topo: Topology, churn: Churn, count: int, rate: float,
                    rest_per_min: float) -> tuple[float, float]:  # fmt: skip
    """CPU seconds `count` filter changes cost the daemon above its rest rate, and how long
    until it showed the last one."""
    before, started = daemon.cpu_seconds(), time.monotonic()
    churn.run(count, rate)
    settle(daemon, topo, churn)
    elapsed = time.monotonic() - started
    used = daemon.cpu_seconds() - before
    return max(0.0, used - rest_per_min / 60 * elapsed), elapsed


def bench(pods: int, args: argparse.Namespace, workdir: Path, profile: bool,
          tree: Path | None = None) -> Run:  # fmt: skip
    run = Run(pods, tree)
    with (
        Topology(pods, args.seed) as topo,
        running_daemon(topo.include_glob, workdir, args.profile if profile else None,
                       tree) as daemon,  # fmt: skip
    ):
        ready = daemon.wait_ready(READY_TIMEOUT_S)
        text = daemon.metrics()
        print(f"N={pods}{f' ({tree})' if tree else ''}: ready in {ready:.1f} s, "
              f"{gauge(text, 'tcprio_namespaces_watched'):.0f} namespaces, "
              f"{gauge(text, 'tcprio_interfaces_watched'):.0f} interfaces", flush=True)  # fmt: skip
        time.sleep(SETTLE_S)
        for i in range(args.repeat):
            cpu, neighbours = rest_cpu(daemon, args.window)
            run.rest.append(cpu)
            if not (neighbours.programs or neighbours.namespaces):
                run.quiet.append(cpu)
            print(f"  rest window {i + 1}/{args.repeat}: {cpu:.3f} CPU s/min ({neighbours})",
                  flush=True)  # fmt: skip
        run.rss = daemon.status("VmRSS")
        if args.strace and profile:
            run.strace = strace_counts(daemon.proc.pid, args.strace)
        if pods:
            churn = Churn(topo, args.seed)
            run.latency = measure_latency(daemon, topo, churn, args.latency, 0.05)
            run.changes = args.changes
            run.change_cpu, run.change_seconds = measure_changes(
                daemon, topo, churn, args.changes, args.rate, statistics.median(run.rest)
            )
            run.rss_after_changes = daemon.status("VmRSS")
    return run


def spread(values: Sequence[float]) -> str:
    return f"median {statistics.median(values):.3f}, min {min(values):.3f}, max {max(values):.3f}"


def label(run: Run) -> str:
    return f"N={run.pods}" + (f" ({run.tree})" if run.tree else "")


def describe(run: Run, base: float, mib: int = 2**20) -> list[str]:
    rest = statistics.median(run.rest)
    lines = [f"{label(run)}: rest CPU {spread(run.rest)} s/min = {rest / 60 * 100:.3f}% of a "
             f"core ({rest / base if base else float('inf'):.1f}x N=0); RSS "
             f"{run.rss / mib:.1f} MiB at rest"]  # fmt: skip
    if run.quiet:
        lines.append(f"  windows with a quiet host ({len(run.quiet)}): {spread(run.quiet)} s/min")
    if run.changes:
        per_1000 = run.change_cpu / run.changes * 1000
        lines.append(f"  {run.changes} filter changes at the given rate: {per_1000:.2f} CPU s "
                     f"per 1,000 above rest ({run.change_seconds:.1f} s until the last showed), "
                     f"RSS {run.rss_after_changes / mib:.1f} MiB after them")  # fmt: skip
    if run.latency and run.latency.snapshot_ms:
        lat = run.latency.snapshot_ms
        lines.append(f"  change -> snapshot published, {len(lat)} samples: p50 "
                     f"{daemon_bench.percentile(lat, 50):.0f} ms, p95 "
                     f"{daemon_bench.percentile(lat, 95):.0f} ms, max {max(lat):.0f} ms, "
                     f"timeouts {run.latency.timeouts}")  # fmt: skip
    return lines


def report(base: Run, runs: Sequence[Run], args: argparse.Namespace) -> None:
    b = statistics.median(base.rest)
    print(f"\nmachine: {daemon_bench.machine()}")
    print(f"rest windows of {args.window:.0f} s (x{args.repeat} at N={args.pods}); CPU = utime "
          f"+ stime of the daemon's process; {args.rate:.0f} changes/s")  # fmt: skip
    for run in (base, *runs):
        print("\n".join(describe(run, b)))
    full = runs[0]
    f = statistics.median(full.rest)
    print(f"target at N={full.pods}: <= 0.060 CPU s/min (0.1% of a core): "
          f"{'met' if f <= 0.06 else 'NOT met'} ({f:.3f})")  # fmt: skip
    if len(runs) > 1:
        old = statistics.median(runs[1].rest)
        print(f"rest CPU of this tree / {runs[1].tree}: {f / old:.2f}" if old else "")
    if full.strace:
        print(f"\nsyscalls over {args.strace:.0f} s at rest (strace -c -f):\n{full.strace}")


def print_profile(path: Path, top: int = 30) -> None:
    import pstats

    print(f"\ncProfile of the daemon's main thread ({path}), by internal time:")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per rest window")
    parser.add_argument("--repeat", type=int, default=3, help="rest windows at N pods")
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="filter changes per second")
    parser.add_argument("--latency", type=int, default=30, help="change -> snapshot samples")
    parser.add_argument("--profile", type=Path, help="cProfile the N-pod daemon into FILE")
    parser.add_argument("--strace", type=float, default=0.0,
                        help="count the N-pod daemon's syscalls over this many seconds")
    parser.add_argument("--shared-netns-folder", action="store_true",
                        help="use the host's /run/netns (the daemon then also reacts to the "
                        "namespaces others create and delete)")
    parser.add_argument("--baseline-tree", type=Path,
                        help="also run, at N pods, the tcprio package found in this folder "
                        "(e.g. a copy of daemon/ before a change): PYTHONPATH=FOLDER")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, BPF)")
    return args


CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


def private_netns_folder() -> None:
    """This process (and so the topology's `ip netns` and the daemon) in a mount namespace of
    its own with an empty /run/netns: the namespaces other programs on the host create and
    delete there send the daemon no folder event. Must run before any thread starts."""
    libc = ctypes.CDLL(None, use_errno=True)
    steps = (
        lambda: libc.unshare(CLONE_NEWNS),
        lambda: libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None),
        lambda: libc.mount(b"tmpfs", b"/run/netns", b"tmpfs", 0, b"mode=755"),
    )
    os.makedirs("/run/netns", exist_ok=True)
    for step in steps:
        if step() != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"private /run/netns: {os.strerror(err)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.shared_netns_folder:
        private_netns_folder()
    sigterm_as_interrupt()
    cleanup_leftovers()
    with tempfile.TemporaryDirectory(prefix=f"tcpriob-{os.getpid()}-") as tmp:
        workdir = Path(tmp)
        base = bench(0, argparse.Namespace(**{**vars(args), "repeat": 1}), workdir, False)
        runs = [bench(args.pods, args, workdir, True)]
        if args.baseline_tree:
            runs.append(bench(args.pods, args, workdir, False, args.baseline_tree))
        report(base, runs, args)
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted: daemon stopped, namespaces removed", file=sys.stderr)
        raise SystemExit(130) from None
