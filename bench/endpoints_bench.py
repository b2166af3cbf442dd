"""A node of CNI-shaped endpoints: the scan of 50 endpoints against the scan of one.

Each endpoint is a pod namespace whose veth carries, on the node side, its own copy of the
programs of bpf/endpoint.c (tests/endpoint_programs.py: 23 programs a copy, tail calls through
the endpoint's own prog array, stages of up to 2,000 instructions, copies differing only in
constants) as `bpf_lxc.o:[from-container]` / `[to-container]` filters at priority 1, and a
Datadog-like classifier at priority 10 (bench/topology.py, without tcx).

For N=1 and N=50 (`--sizes`), in the same invocation, it times:

- **cli**: `tcprio --scan --format json --netns <this node>`, a new process each time (median of
  --repeat runs): what a user waits for;
- **in-process**: discovery, inventory and analysis (`enumerate_namespaces` + `analyse_node` with
  a fresh program cache), without Python's start-up;
- **in-process, no sharing**: the same with every program graph analysed on its own (the
  analysis before programs differing only in constants shared one analysis).

It prints the times, the ratios N=50 / N=1 (the target: within 3x), how the verdicts were
obtained (concrete, generic, shared), and checks that every endpoint's two classifiers are
classified terminal and named Cilium.

    .venv/bin/python bench/endpoints_bench.py [--sizes 1,50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon"), str(ROOT / "bench")]

from scan_bench import classifiers_in_scan  # noqa: E402
from topology import (  # noqa: E402
    FIRST_NODE_IFINDEX,
    Pod,
    Topology,
    cleanup_leftovers,
    sigterm_as_interrupt,
)

from tcprio.analysis.verdicts.sharing import SharingStats  # noqa: E402
from tcprio.datadog import resolve_settings  # noqa: E402
from tcprio.kernel.namespaces import discover_namespaces  # noqa: E402
from tcprio.scan import ProgramCache, analyse_node, enumerate_namespaces  # noqa: E402
from tests.endpoint_programs import Endpoint, EndpointTemplate  # noqa: E402

TCPRIO = str(ROOT / ".venv" / "bin" / "tcprio")
NO_DATADOG_FILE = "/nonexistent/system-probe.yaml"
NO_DATADOG = ["--no-agent-process", "--no-datadog-config"]


def median_time(action: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def cli_scan(glob: str) -> dict:
    proc = subprocess.run([TCPRIO, "--scan", "--format", "json", "--netns", glob, *NO_DATADOG],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode not in (0, 1, 2):
        raise RuntimeError(f"tcprio --scan failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def in_process_scan(prefix: str, share: bool) -> SharingStats:
    """Discovery, inventory and analysis of this node's namespaces, with the GC off as
    `tcprio --scan` runs them; a fresh program cache each time."""
    gc.disable()
    try:
        found = [ns for ns in discover_namespaces() if ns.name.startswith(prefix)]
        inventories, _vanished = enumerate_namespaces(found)
        settings = resolve_settings([Path(NO_DATADOG_FILE)], scan_processes=False)
        cache = ProgramCache(share=share)
        analyse_node(inventories, settings, cache)
    finally:
        gc.enable()
    return cache.shared.stats


def classified_endpoints(doc: dict) -> tuple[int, int]:
    """(CNI classifiers, of which terminal and named Cilium) in a scan's JSON."""
    cni = terminal = 0
    for classifier in classifiers_in_scan(doc):
        if (classifier["filter_name"] or "").startswith("bpf_lxc.o:"):
            cni += 1
            named = classifier["vendor"] == "Cilium"
            terminal += classifier["verdict_class"] == "terminal" and named
    return cni, terminal


@dataclass
class Row:
    endpoints: int
    programs: int
    build_s: float
    cli_s: float
    in_process_s: float
    no_sharing_s: float
    stats: SharingStats
    cni_classifiers: int
    terminal: int


def measure(template: EndpointTemplate, n: int, repeat: int) -> Row:
    started = time.perf_counter()
    endpoints: list[Endpoint] = []
    try:
        for i in range(n):
            endpoints.append(template.load_endpoint(i, FIRST_NODE_IFINDEX + i))

        def fds(pod: Pod) -> tuple[int, int]:
            e = endpoints[pod.index]
            return e.fd("from_container"), e.fd("to_container")

        with Topology(n, seed=7, tcx_share=0.0, cni_fds=fds) as topo:
            build_s = time.perf_counter() - started
            prefix = topo.include_glob.rstrip("*")
            cli_s, doc = median_time(lambda: cli_scan(topo.include_glob), repeat)
            in_s, stats = median_time(lambda: in_process_scan(prefix, True), repeat)
            no_s, _ = median_time(lambda: in_process_scan(prefix, False), repeat)
    finally:
        for e in endpoints:
            e.close()
    cni, terminal = classified_endpoints(doc)  # type: ignore[arg-type]
    programs = n * len(template.bytecode)
    return Row(n, programs, build_s, cli_s, in_s, no_s, stats, cni, terminal)  # type: ignore[arg-type]


def print_rows(rows: Sequence[Row]) -> None:
    print("| endpoints | programs | build s | cli scan s | in-process s | in-process, "
          "no sharing s | verdicts: analysed / generic / shared | CNI classifiers terminal |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        s = r.stats
        print(f"| {r.endpoints} | {r.programs:,} | {r.build_s:.1f} | {r.cli_s:.3f} | "
              f"{r.in_process_s:.3f} | {r.no_sharing_s:.3f} | {s.analysed} / {s.generic} / "
              f"{s.shared} | {r.terminal} of {r.cni_classifiers} |")  # fmt: skip
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        no_sharing = large.no_sharing_s / small.no_sharing_s
        print(f"\nratios N={large.endpoints} / N={small.endpoints}: "
              f"cli {large.cli_s / small.cli_s:.2f}x, "
              f"in-process {large.in_process_s / small.in_process_s:.2f}x, "
              f"in-process without sharing {no_sharing:.2f}x")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,50", help="endpoint counts (default 1,50)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (median)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    sigterm_as_interrupt()
    cleanup_leftovers()
    with EndpointTemplate() as template:
        counts = template.instruction_counts()
        print(f"endpoint programs: {len(counts)} a copy, {sum(counts.values()):,} instructions, "
              f"largest {max(counts.values()):,}")  # fmt: skip
        rows = [measure(template, n, args.repeat) for n in sizes]
    print_rows(rows)
    failed = [r for r in rows if not r.terminal == r.cni_classifiers == 2 * r.endpoints]
    if failed:
        print(f"\nNOT every endpoint was classified terminal: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
