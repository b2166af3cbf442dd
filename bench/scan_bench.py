"""`tcprio --scan` against the shell loops people write today, side by side on one topology.

For each N (default 50, 200, 800) this builds `Topology(N)` (bench/topology.py) and times, in
the same invocation:

- **tcprio scan**: `tcprio --scan --format json --netns <this topology>`, a new process each time,
  analysis and JSON included (median of --repeat runs);
- **tcprio enumeration**: namespace discovery and the tc/tcx inventory alone, in this process
  (what the loops below give, without any analysis);
- **tc loop**: a shell loop of `tc -j filter show dev <if> <ingress|egress>` for every namespace
  and interface (interfaces from `ip -o link show`);
- **bpftool loop**: `ip netns exec <ns> bpftool -j net show` for every namespace.

It prints each time, the ratios against the loops, the scaling ratio time(800) / time(200) (linear
is 4), the cost per namespace, and checks that every method found the same filters. `--profile`
adds a cProfile of the in-process scan at N=200.

    .venv/bin/python bench/scan_bench.py [--sizes 50,200,800] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon"), str(ROOT / "bench")]

from topology import Topology, cleanup_leftovers, sigterm_as_interrupt  # noqa: E402

from tcprio.kernel.namespaces import discover_namespaces  # noqa: E402
from tcprio.scan import enumerate_namespaces  # noqa: E402

TCPRIO = str(ROOT / ".venv" / "bin" / "tcprio")
NO_DATADOG = ["--no-agent-process", "--no-datadog-config"]

TC_LOOP = r"""
for ns in "$@"; do
  for dev in $(ip -n "$ns" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
    for dir in ingress egress; do
      tc -n "$ns" -j filter show dev "$dev" "$dir"
    done
  done
done
"""
BPFTOOL_LOOP = r"""
for ns in "$@"; do
  ip netns exec "$ns" bpftool -j net show
done
"""


def median_time(action: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def run_shell(script: str, names: Sequence[str]) -> str:
    proc = subprocess.run(["bash", "-c", script, "loop", *names], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return proc.stdout


def tcprio_scan(glob: str) -> dict:
    proc = subprocess.run([TCPRIO, "--scan", "--format", "json", "--netns", glob, *NO_DATADOG],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode not in (0, 1, 2):
        raise RuntimeError(f"tcprio --scan failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def enumerate_topology(glob_prefix: str) -> list:
    """Discovery and inventory, with the cyclic GC off as `tcprio --scan` runs them."""
    gc.disable()
    try:
        found = [ns for ns in discover_namespaces() if ns.name.startswith(glob_prefix)]
        inventories, _vanished = enumerate_namespaces(found)
    finally:
        gc.enable()
    return inventories


# --- counting what each method found, to check they agree ----------------------------------------


def _is_filter(entry: dict) -> bool:
    """A bare entry per priority is the classifier instance, and a u32 "ht divisor" entry its
    hash table: neither is a filter."""
    options = entry.get("options")
    return options is not None and "ht_divisor" not in options


def filters_in_tc_output(text: str) -> int:
    """tc -j prints one JSON array per call."""
    decoder, count, at = json.JSONDecoder(), 0, 0
    text = text.strip()
    while at < len(text):
        entries, at = decoder.raw_decode(text, at)
        while at < len(text) and text[at].isspace():
            at += 1
        count += sum(1 for e in entries if _is_filter(e))
    return count


def filters_in_bpftool_output(text: str) -> int:
    decoder, count, at = json.JSONDecoder(), 0, 0
    text = text.strip()
    while at < len(text):
        doc, at = decoder.raw_decode(text, at)
        while at < len(text) and text[at].isspace():
            at += 1
        for entry in doc:
            count += len(entry.get("tc", []))
    return count


def classifiers_in_scan(doc: dict) -> Iterator[dict]:
    """Every classifier of a scan's JSON document."""
    for ns in doc["namespaces"]:
        for interface in ns["interfaces"]:
            for hook in interface["hooks"]:
                yield from hook["classifiers"]


def filters_in_scan(doc: dict) -> tuple[int, int]:
    tcx = sum(c["hook"] == "tcx" for c in classifiers_in_scan(doc))
    return sum(1 for _ in classifiers_in_scan(doc)) - tcx, tcx


def filters_in_inventories(inventories: list) -> int:
    return sum(len(h.filters) for inv in inventories for i in inv.interfaces for h in i.hooks)


# --- one size ------------------------------------------------------------------------------------


@dataclass
class Row:
    n: int
    namespaces: int
    filters: int
    tcx: int
    scan_s: float
    enum_s: float
    tc_s: float
    bpftool_s: float
    pod_ns_us: float  # median cost of reading one pod namespace
    agree: list[str] = field(default_factory=list)


def per_pod_namespace_us(topo: Topology) -> float:
    from tcprio.kernel.tc_inventory import read_namespace

    pods = [ns for ns in discover_namespaces() if ns.name in set(topo.pods)]
    costs = []
    for ns in pods:
        started = time.perf_counter()
        read_namespace(ns)
        costs.append(time.perf_counter() - started)
    return statistics.median(costs) * 1e6


def measure(n: int, seed: int, repeat: int, tcx_share: float) -> Row:
    with Topology(n, seed, tcx_share) as topo:
        names, glob = topo.namespaces, topo.include_glob
        baseline_repeat = 1 if n >= 800 else repeat  # the loops take seconds each
        scan_s, doc = median_time(lambda: tcprio_scan(glob), repeat)
        enum_s, inventories = median_time(lambda: enumerate_topology(topo.tag + "-"), repeat)
        tc_s, tc_out = median_time(lambda: run_shell(TC_LOOP, names), baseline_repeat)
        bpftool_s, bt_out = median_time(lambda: run_shell(BPFTOOL_LOOP, names), baseline_repeat)
        pod_us = per_pod_namespace_us(topo)
    scan_filters, scan_tcx = filters_in_scan(doc)  # type: ignore[arg-type]
    counts = {
        "tcprio scan": scan_filters,
        "tcprio enumeration": filters_in_inventories(inventories),  # type: ignore[arg-type]
        "tc loop": filters_in_tc_output(tc_out),  # type: ignore[arg-type]
        "bpftool loop (cls_bpf only)": filters_in_bpftool_output(bt_out),  # type: ignore[arg-type]
    }
    return Row(n, len(names), scan_filters, scan_tcx, scan_s, enum_s, tc_s, bpftool_s, pod_us,
               [f"{k} {v}" for k, v in counts.items()])  # fmt: skip


# --- printing ------------------------------------------------------------------------------------


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'N':>5} {'netns':>6} {'filters':>8} {'tcx':>5} | {'scan s':>7} {'enum s':>7} "
          f"{'tc loop s':>10} {'bpftool s':>10} | {'tc/scan':>8} {'tc/enum':>8} "
          f"{'bpftool/scan':>13} {'pod netns':>10}")  # fmt: skip
    for r in rows:
        print(f"{r.n:>5} {r.namespaces:>6} {r.filters:>8} {r.tcx:>5} | {r.scan_s:>7.3f} "
              f"{r.enum_s:>7.3f} {r.tc_s:>10.3f} {r.bpftool_s:>10.3f} | "
              f"{r.tc_s / r.scan_s:>7.1f}x {r.tc_s / r.enum_s:>7.1f}x "
              f"{r.bpftool_s / r.scan_s:>12.1f}x {r.pod_ns_us:>8.0f}us")  # fmt: skip
    for r in rows:
        print(f"  N={r.n}: filters found: {', '.join(r.agree)}")


def print_scaling(rows: Sequence[Row]) -> None:
    by_n = {r.n: r for r in rows}
    if 200 in by_n and 800 in by_n:
        a, b = by_n[200], by_n[800]
        print(f"scaling time(800)/time(200), linear = 4: scan {b.scan_s / a.scan_s:.2f}, "
              f"enumeration {b.enum_s / a.enum_s:.2f}, tc loop {b.tc_s / a.tc_s:.2f}, "
              f"bpftool loop {b.bpftool_s / a.bpftool_s:.2f}")  # fmt: skip


def profile_scan(n: int, seed: int, tcx_share: float, top: int = 18) -> None:
    from tcprio.datadog import resolve_settings
    from tcprio.report import scan_json
    from tcprio.scan import run_scan

    with Topology(n, seed, tcx_share) as topo:
        prefix = topo.tag + "-"
        settings = resolve_settings(files=[], environ={}, scan_processes=False)

        def scan_once() -> str:
            scan = run_scan(
                discover=lambda: [ns for ns in discover_namespaces() if ns.name.startswith(prefix)],
                settings=settings,
            )
            return json.dumps(scan_json(scan))

        scan_once()  # kallsyms and imports out of the way, as in the daemon's steady state
        profiler = cProfile.Profile()
        profiler.runcall(scan_once)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print(f"\nprofile of one in-process scan at N={n} (second run), top {top} by own time:")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return (f"{os.cpu_count()} CPUs ({model}), kernel {os.uname().release}, Python "
            f"{sys.version.split()[0]}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,200,800", help="pod counts (default 50,200,800)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (median)")
    parser.add_argument("--tcx-share", type=float, default=0.25)
    parser.add_argument("--profile", action="store_true", help="also profile the scan at N=200")
    args = parser.parse_args(argv)
    sigterm_as_interrupt()
    cleanup_leftovers()
    print(f"machine: {machine()}", flush=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        rows.append(measure(n, args.seed, args.repeat, args.tcx_share))
        print(f"  N={n} done", flush=True)
    print()
    print_table(rows)
    print_scaling(rows)
    if args.profile:
        profile_scan(200, args.seed, args.tcx_share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
