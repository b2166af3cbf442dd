"""How /metrics grows with the pods: series and bytes per scrape at N=50 and N=200 pods, for the
default (bounded) metrics and for `metrics.full_inventory`, as ratios N=200 / N=50 in one
invocation.

Each phase builds bench/topology.py's node (a CNI-like terminal classifier at priority 1 and a
Datadog-like one at 10 on both directions of every pod's node-side veth: two critical
conflicts per pod; tcx programs on a quarter of the pods), runs the daemon on it
(daemon_process.py, watching only that topology's namespaces), waits until it has analysed
every namespace and its conflicts are stable, and counts the samples of one scrape.

    .venv/bin/python bench/series_bench.py [--pods 50 200] [--cap 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import daemon_process
from daemon_process import Daemon, environment_without_systemd, free_port
from prometheus_client.parser import text_string_to_metric_families
from topology import Topology, cleanup_leftovers, sigterm_as_interrupt

READY_TIMEOUT_S = 300.0

CONFIG = """\
web:
  listen_address: "127.0.0.1:{port}"
namespaces:
  include: ["{include}"]
datadog:
  config_files: []
  scan_processes: false
  assume_active: true
live_probe: false
metrics:
  full_inventory: {full}
  max_hook_series: {cap}
"""


@dataclass(frozen=True)
class Scrape:
    series: int
    bytes: int
    by_family: Counter[str]


def scrape(daemon: Daemon) -> Scrape:
    text = daemon.metrics()
    by_family: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        by_family[family.name] += len(family.samples)
    return Scrape(sum(by_family.values()), len(text.encode()), by_family)


def _gauge(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


def _conflicts(text: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "tcprio_conflicts"
    )


def wait_analysed(daemon: Daemon, namespaces: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the daemon watches every namespace and two scrapes a second apart agree on the
    conflicts (the analysis of the last namespaces is in)."""
    deadline = time.monotonic() + timeout_s
    previous = -1.0
    while time.monotonic() < deadline:
        text = daemon.metrics()
        watched = _gauge(text, "tcprio_namespaces_watched")
        conflicts = _conflicts(text)
        if watched == namespaces and conflicts and conflicts == previous:
            return
        previous = conflicts if watched == namespaces else -1.0
        time.sleep(1.0)
    raise TimeoutError(f"the daemon did not analyse {namespaces} namespaces in {timeout_s:.0f} s")


def measure(pods: int, full: bool, cap: int, workdir: Path) -> Scrape:
    with Topology(pods, seed=1) as topo:
        port = free_port()
        config = CONFIG.format(port=port, include=topo.include_glob, full=str(full).lower(),
                               cap=cap)  # fmt: skip
        env = environment_without_systemd()
        with daemon_process.running_daemon(config, port, workdir, env) as daemon:
            daemon.wait_ready(READY_TIMEOUT_S)
            wait_analysed(daemon, len(topo.namespaces))
            return scrape(daemon)


def report(pods: list[int], full: bool, scrapes: dict[int, Scrape]) -> None:
    mode = "full_inventory" if full else "bounded (default)"
    base = scrapes[pods[0]]
    print(f"\n{mode}")
    print(f"  {'pods':>6} {'series':>8} {'bytes':>9} {'series ratio':>13} {'bytes ratio':>12}")
    for n in pods:
        s = scrapes[n]
        print(f"  {n:>6} {s.series:>8} {s.bytes:>9} {s.series / base.series:>12.3f}x "
              f"{s.bytes / base.bytes:>11.3f}x")  # fmt: skip
    top = scrapes[pods[-1]].by_family.most_common(6)
    print(f"  largest families at N={pods[-1]}: " + ", ".join(f"{k} {v}" for k, v in top))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--cap", type=int, default=20, help="metrics.max_hook_series")
    args = parser.parse_args(argv)
    sigterm_as_interrupt()
    cleanup_leftovers()
    with tempfile.TemporaryDirectory(prefix="tcprio-series-") as tmp:
        for full in (False, True):
            scrapes = {n: measure(n, full, args.cap, Path(tmp)) for n in args.pods}
            report(args.pods, full, scrapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
