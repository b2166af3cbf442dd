"""A realistic, seeded node for benchmarks: N pod namespaces wired to one node namespace.

Every pod namespace gets a veth pair to the node namespace (both created by this module, never
the host's). Each end has a clsact qdisc and the filters a real node carries:

- node side (`lxc...`), ingress and egress: a CNI-like terminal classifier at priority 1
  (`term_ok` or `term_redirect`, filter name `bpf_lxc.o:[...]`), then a Datadog-like
  transparent classifier at priority 10 (`classifier_egress` / `classifier_ingress`, filter
  name `classifier/<direction>_<uid>_<pid>`);
- pod side (`eth0`), egress: two u32 filters at priorities 20 and 21 (classid 1:1, no action:
  this kernel has no act_gact);
- on a seeded share of the pods (25% by default): a transparent tcx program (`pass_unspec`)
  on the node side's ingress and egress.

Speed: one `ip -batch` process creates (and one deletes) every namespace; links, qdiscs and
filters go through pyroute2 sockets created inside each namespace (this thread setns-es in,
opens the socket, comes back). A single socket in the node namespace does all the node-side
work, including creating the veths with their peer directly in the pod namespace.

Usage as a library::

    with Topology(200, seed=1) as topo:
        topo.node        # the node namespace's name
        topo.pods        # the pod namespaces' names
        topo.add_filter(17, "egress", 30, "pass_unspec")

and from the command line: `python bench/topology.py --pods 200 --hold` (Ctrl-C tears down),
or `python bench/topology.py` alone to time build and teardown at N=50, 200 and 800.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from pyroute2 import IPRoute  # noqa: E402

from tcprio.kernel import bpf_syscalls  # noqa: E402
from tcprio.kernel.namespaces import entered_path  # noqa: E402
from tcprio.model import ETH_P_ALL, Direction  # noqa: E402
from tests.bpf_programs import ClassifierPrograms, shared_programs  # noqa: E402

PREFIX = "tcpriob-"
NETNS_DIR = Path("/run/netns")
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
TC_H_CLSACT = 0xFFFFFFF1
ETH_P_IP = 0x0800
CNI_PRIO, DATADOG_PRIO, U32_PRIOS = 1, 10, (20, 21)
FIRST_NODE_IFINDEX = 1000  # node-side veths get fixed ifindexes: no lookup needed
CNI_PROGRAMS = ("term_ok", "term_redirect")
TCX_PROGRAM = "pass_unspec"

_runs = 0  # topologies made by this process: part of the names, so that each run is unique


# --- the plan: everything decided by the seed, before touching the kernel --------------------


@dataclass(frozen=True)
class Pod:
    index: int
    netns: str
    node_if: str  # the veth end in the node namespace
    node_ifindex: int
    cni_program: str  # terminal, priority 1 on the node side
    datadog_uid: int
    datadog_pid: int
    tcx: bool  # a tcx program on the node side too
    pod_if: str = "eth0"

    def datadog_filter_name(self, direction: str) -> str:
        return f"classifier/{direction}_{self.datadog_uid}_{self.datadog_pid}"


def plan_pods(n: int, seed: int, tag: str, tcx_share: float = 0.25) -> list[Pod]:
    rng = random.Random(seed)
    pods = []
    for i in range(n):
        pods.append(
            Pod(
                index=i,
                netns=f"{tag}-p{i:04d}",
                node_if=f"lxc{rng.getrandbits(48):012x}",
                node_ifindex=FIRST_NODE_IFINDEX + i,
                cni_program=rng.choice(CNI_PROGRAMS),
                datadog_uid=rng.randrange(10**9),
                datadog_pid=rng.randrange(1000, 4_000_000),
                tcx=rng.random() < tcx_share,
            )
        )
    return pods


# --- namespaces -------------------------------------------------------------------------------


def ip_batch(lines: Sequence[str], check: bool = True) -> None:
    """One `ip` process for many commands (`-force`: go on after a failing line)."""
    if not lines:
        return
    proc = subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {proc.stderr.strip()[:500]}")


def our_namespaces(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def delete_namespaces(names: Sequence[str]) -> None:
    # the node namespace first (when there is one): its veths, and their pod ends, go with it
    ordered = sorted(names, key=lambda n: not n.endswith("-node"))
    ip_batch([f"netns del {name}" for name in ordered], check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces `<prefix><pid>-...` of earlier runs whose process is gone (killed
    with -9...)."""
    stale = []
    for name in our_namespaces(prefix):
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or not pid_alive(int(pid_text)):
            stale.append(name)
    delete_namespaces(stale)
    return stale


def entered(netns: str) -> contextlib.AbstractContextManager[None]:
    """This thread inside `netns` for the body (netlink sockets made there stay bound to it)."""
    return entered_path(NETNS_DIR / netns)


def socket_in(netns: str) -> IPRoute:
    with entered(netns):
        return IPRoute()


# --- the builders -------------------------------------------------------------------------------


def add_bpf_filter(
    ipr: IPRoute,
    ifindex: int,
    direction: str,
    prio: int,
    fd: int,
    name: str,
    handle: int = 1,
) -> None:
    ipr.tc(
        "add-filter", "bpf", ifindex, handle, fd=fd, name=name, parent=PARENT[direction],
        classid=1, direct_action=True, prio=prio, protocol=ETH_P_ALL,
    )  # fmt: skip


def build_node_side(
    ipr: IPRoute, pod: Pod, programs: ClassifierPrograms, cni_fds: tuple[int, int] | None = None
) -> None:
    """The pod's veth seen from the node: the CNI's filters (`cni_fds`: its own from- and
    to-container programs, else `pod.cni_program` on both) and Datadog's."""
    pod_fd = os.open(NETNS_DIR / pod.netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ipr.link(
            "add", index=pod.node_ifindex, ifname=pod.node_if, kind="veth",
            peer={"ifname": pod.pod_if, "net_ns_fd": pod_fd},
        )  # fmt: skip
    finally:
        os.close(pod_fd)
    ipr.link("set", index=pod.node_ifindex, state="up")
    ipr.tc("add", "clsact", pod.node_ifindex)
    cni_fd = programs.fd(pod.cni_program)
    fds = cni_fds or (cni_fd, cni_fd)
    for direction, section, fd in (("ingress", "from-container", fds[0]),
                                   ("egress", "to-container", fds[1])):  # fmt: skip
        add_bpf_filter(ipr, pod.node_ifindex, direction, CNI_PRIO, fd,
                       f"bpf_lxc.o:[{section}]")  # fmt: skip
        add_bpf_filter(ipr, pod.node_ifindex, direction, DATADOG_PRIO,
                       programs.fd(f"classifier_{direction}"),
                       pod.datadog_filter_name(direction))  # fmt: skip


def build_pod_side(pod: Pod) -> None:
    with entered(pod.netns):
        ifindex = socket.if_nametoindex(pod.pod_if)
        with IPRoute() as ipr:
            ipr.link("set", index=1, state="up")  # lo
            ipr.link("set", index=ifindex, state="up")
            ipr.tc("add", "clsact", ifindex)
            address = 0x0A000000 + pod.index + 2  # 10.0.x.y: the pod's own address
            for prio, offset in zip(U32_PRIOS, (12, 16), strict=True):  # source, destination
                ipr.tc(
                    "add-filter", "u32", ifindex, parent=PARENT["egress"], prio=prio,
                    protocol=ETH_P_IP, target=0x10001,
                    keys=[f"0x{address:08x}/0xffffffff+{offset}"],
                )  # fmt: skip


def wait_detached(link_fds: Sequence[int], timeout: float = 60.0) -> None:
    """Until the kernel detached every tcx link (its device is gone: the link's ifindex is 0)."""
    deadline = time.monotonic() + timeout
    pending = list(link_fds)
    while pending and time.monotonic() < deadline:
        pending = [fd for fd in pending if bpf_syscalls.link_info_from_fd(fd).ifindex]
        if pending:
            time.sleep(0.01)


class PhaseClock:
    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.started


# --- the topology ------------------------------------------------------------------------------


@dataclass
class Topology:
    """`with Topology(n, seed) as topo:` builds the node; leaving the block tears it down."""

    n: int
    seed: int = 1
    tcx_share: float = 0.25
    tag: str = ""
    pods_plan: list[Pod] = field(default_factory=list)
    build_seconds: float = 0.0
    teardown_seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # build time by phase
    # the CNI's own (from-container, to-container) program fds for a pod; None: the shared
    # test programs (`Pod.cni_program`)
    cni_fds: Callable[[Pod], tuple[int, int]] | None = None
    _node_ipr: IPRoute | None = None
    _tcx_links: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        global _runs
        _runs += 1
        self.tag = self.tag or f"{PREFIX}{os.getpid()}-{_runs}"
        self.pods_plan = plan_pods(self.n, self.seed, self.tag, self.tcx_share)

    @property
    def node(self) -> str:
        return f"{self.tag}-node"

    @property
    def pods(self) -> list[str]:
        return [p.netns for p in self.pods_plan]

    @property
    def namespaces(self) -> list[str]:
        return [self.node, *self.pods]

    @property
    def include_glob(self) -> str:
        """A glob matching this topology's namespaces only."""
        return f"{self.tag}-*"

    @property
    def node_ipr(self) -> IPRoute:
        """The pyroute2 socket in the node namespace (use it from one thread at a time)."""
        if self._node_ipr is None:
            raise RuntimeError("the topology is not built")
        return self._node_ipr

    # building and tearing down

    def __enter__(self) -> Topology:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.teardown()

    def build(self) -> None:
        programs = shared_programs()  # compiled once per process, not part of the build time
        clock = PhaseClock()
        ip_batch([f"netns add {name}" for name in self.namespaces])
        clock.lap("netns")
        self._node_ipr = socket_in(self.node)
        self._node_ipr.link("set", index=1, state="up")
        for pod in self.pods_plan:
            fds = self.cni_fds(pod) if self.cni_fds else None
            build_node_side(self._node_ipr, pod, programs, fds)
        clock.lap("node side")
        for pod in self.pods_plan:
            build_pod_side(pod)
        clock.lap("pod side")
        self._attach_tcx(programs)
        clock.lap("tcx")
        self.phases = clock.laps
        self.build_seconds = clock.total()

    def _attach_tcx(self, programs: ClassifierPrograms) -> None:
        with entered(self.node):
            for pod in self.pods_plan:
                if pod.tcx:
                    for direction in Direction:
                        fd = bpf_syscalls.tcx_attach(
                            programs.fd(TCX_PROGRAM), pod.node_ifindex, direction
                        )
                        self._tcx_links.append(fd)

    def teardown(self) -> None:
        """Delete every namespace of this topology; back once the kernel let go of the tcx links.

        Closing a tcx link fd while its device lives costs a synchronize_rcu (~14 ms, under
        rtnl); once the namespace's cleanup has detached the link, closing it is free. So the
        namespaces go first, then we wait for the detachment, then close.
        """
        started = time.monotonic()
        if self._node_ipr is not None:  # it pins the node namespace: close it first
            self._node_ipr.close()
            self._node_ipr = None
        delete_namespaces(our_namespaces(self.tag + "-"))
        wait_detached(self._tcx_links)
        for fd in self._tcx_links:
            os.close(fd)
        self._tcx_links.clear()
        self.teardown_seconds = time.monotonic() - started

    # changes, for the benchmarks

    def add_filter(self, pod: int, direction: str, prio: int, program: str) -> None:
        """A cls_bpf filter (handle 1) on pod `pod`'s node-side veth."""
        p = self.pods_plan[pod]
        fd = shared_programs().fd(program)
        add_bpf_filter(self.node_ipr, p.node_ifindex, direction, prio, fd, program)

    def delete_filter(self, pod: int, direction: str, prio: int) -> None:
        p = self.pods_plan[pod]
        self.node_ipr.tc(
            "del-filter", "bpf", p.node_ifindex, 1, parent=PARENT[direction], prio=prio,
            protocol=ETH_P_ALL,
        )  # fmt: skip

    def dump_filters(self, pod: int, direction: str) -> list:
        """The filters of one node-side hook, straight from netlink."""
        p = self.pods_plan[pod]
        return list(self.node_ipr.get_filters(index=p.node_ifindex, parent=PARENT[direction]))


# --- command line --------------------------------------------------------------------------------


def sigterm_as_interrupt() -> None:
    """SIGTERM, and SIGINT even where the shell started us with it ignored, tear down like
    Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def summary(topo: Topology) -> str:
    filters = topo.n * (4 + len(U32_PRIOS))
    tcx = 2 * sum(p.tcx for p in topo.pods_plan)
    return (f"{topo.n} pods: {len(topo.namespaces)} namespaces, {2 * topo.n} veth ends, "
            f"{filters} filters, {tcx} tcx links")  # fmt: skip


def hold(n: int, seed: int, tcx_share: float) -> None:
    with Topology(n, seed, tcx_share) as topo:
        print(f"built in {topo.build_seconds:.2f} s: {summary(topo)}")
        print(f"node namespace: {topo.node}; pods: {topo.pods[0] if topo.pods else '-'} ...")
        print("holding; Ctrl-C tears down", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    print(f"torn down in {topo.teardown_seconds:.2f} s")


def time_sizes(sizes: Sequence[int], seed: int, tcx_share: float) -> None:
    print(f"{'pods':>6} {'build s':>8} {'teardown s':>11}  build phases (s); what")
    for n in sizes:
        with Topology(n, seed, tcx_share) as topo:
            pass
        phases = ", ".join(f"{name} {s:.2f}" for name, s in topo.phases.items())
        print(f"{n:>6} {topo.build_seconds:>8.2f} {topo.teardown_seconds:>11.2f}  {phases}; "
              f"{summary(topo)}", flush=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, action="append",
                        help="pod namespaces (repeatable; default 50, 200 and 800)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tcx-share", type=float, default=0.25,
                        help="share of the pods with tcx programs (each attach costs ~14 ms)")
    parser.add_argument("--hold", action="store_true", help="build one topology, keep it up")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, BPF)")
    sigterm_as_interrupt()
    stale = cleanup_leftovers()
    if stale:
        print(f"removed {len(stale)} namespaces left over by earlier runs")
    sizes = args.pods or [50, 200, 800]
    if args.hold:
        hold(sizes[0], args.seed, args.tcx_share)
    else:
        time_sizes(sizes, args.seed, args.tcx_share)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted: namespaces removed", file=sys.stderr)
        raise SystemExit(130) from None
