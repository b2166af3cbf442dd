"""The self-test's throw-away scene: the only tcprio code that creates anything in the kernel.

Everything lives in two network namespaces of its own, `tcprio-selftest-<pid>-node` and
`tcprio-selftest-<pid>-pod`, joined by one veth pair: clsact qdiscs, cls_bpf filters running
copies of the classifiers of bpf/classifiers.c (compiled with BCC), and a tcx link. Deleting the
two namespaces removes all of it; `remove_leftovers` does that for runs that were killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import entered_path
from tcprio.model import ETH_P_ALL, Direction, HookKind

CLASSIFIERS_C = Path(__file__).resolve().parents[3] / "bpf" / "classifiers.c"
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "tcprio-selftest-"
_NETNS_NAME = re.compile(rf"^{re.escape(NETNS_PREFIX)}(\d+)-(node|pod)$")

NODE_IF, POD_IF = "st-node", "st-pod"
NODE_MAC, POD_MAC = "02:74:63:70:00:01", "02:74:63:70:00:02"
# TEST-NET-2 style benchmarking range (RFC 2544), only ever inside the self-test's namespaces.
NODE_ADDR, POD_ADDR = "198.18.0.1", "198.18.0.2"
DISCARD_PORT = 9

CLSACT_PARENT = {Direction.INGRESS: 0xFFFFFFF2, Direction.EGRESS: 0xFFFFFFF3}
COMMAND_TIMEOUT_S = 10


class SceneError(RuntimeError):
    """A step of building the scene failed; the message says which and why."""


def _run(*argv: str) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SceneError(f"`{' '.join(argv)}`: {exc}") from exc
    if proc.returncode != 0:
        raise SceneError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def namespace_names(pid: int) -> tuple[str, str]:
    return f"{NETNS_PREFIX}{pid}-node", f"{NETNS_PREFIX}{pid}-pod"


def _is_selftest_process(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"self-test" in argv or any(b"selftest" in a for a in argv)


def leftover_namespaces() -> list[tuple[str, int]]:
    """(name, pid) of self-test namespaces whose run is no longer alive."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(NETNS_DIR)):
            match = _NETNS_NAME.match(entry)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid != os.getpid() and not _is_selftest_process(pid):
                found.append((entry, pid))
    return found


def delete_namespace(name: str) -> None:
    """`ip netns del` (it detaches the bind mount, then removes the file: this also clears a
    namespace file left by a run killed half-way through `ip netns add`)."""
    with contextlib.suppress(SceneError):
        _run("ip", "netns", "del", name)


def remove_leftovers() -> list[tuple[str, int]]:
    """Delete the namespaces of killed self-test runs (and with them their filters and links)."""
    leftovers = leftover_namespaces()
    for name, _pid in leftovers:
        delete_namespace(name)
    return leftovers


# --- the programs ----------------------------------------------------------------------------


class CompileError(RuntimeError):
    """BCC failed on bpf/classifiers.c; the message holds the compiler's last lines."""


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """BCC and clang write to file descriptor 2: keep their chatter, show it only on failure."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read(1 << 16).decode(errors="replace").splitlines())


def _last_lines(lines: list[str], count: int = 2) -> str:
    """The compiler's error lines (or its last lines): what a user can act on."""
    meaningful = [line.strip() for line in lines if line.strip()]
    errors = [line for line in meaningful if "error:" in line]
    return " / ".join((errors or meaningful)[-count:]) or "no compiler output"


class ProgramFactory:
    """bpf/classifiers.c compiled once with BCC; `load(name)` gives a fresh copy of a function.

    Each role in the scene gets a program of its own, so that BPF run counters (kept per
    program) speak for one hook only. The copies share the BCC object's maps: keep the factory
    open while they are in use.
    """

    def __init__(self, source: Path = CLASSIFIERS_C) -> None:
        from tcprio.kernel.bcc_support import HeadersMissing, prepare_bcc_environment

        headers = prepare_bcc_environment()
        if not (headers / "include" / "linux").is_dir():
            raise HeadersMissing(f"BCC_KERNEL_SOURCE={headers} holds no kernel headers")
        from bcc import BPF  # late: importing bcc is only worth it when compiling

        failure: Exception | None = None
        with _stderr_captured() as captured:
            try:
                self._bpf = BPF(src_file=str(source).encode())
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise CompileError(f"BCC could not compile {source}: {_last_lines(captured)}")
        self._fds: list[int] = []

    def load(self, function: str) -> int:
        insns = self._bpf.dump_func(function.encode())
        fd = bpf_syscalls.prog_load_raw(
            bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, insns, function[:15]
        )
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._bpf.cleanup()


# --- the scene -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """One classifier the scene attaches, and what the scan must say about it."""

    role: str  # "cni", "mid", "transparent", "observer", "tcx"
    namespace: str
    interface: str
    direction: Direction
    hook: HookKind
    function: str  # in bpf/classifiers.c
    priority: int | None  # clsact only
    expected_values: frozenset[int]
    terminal: bool
    is_datadog: bool = False

    @property
    def place(self) -> str:
        where = f"{self.namespace}/{self.interface} {self.direction}"
        if self.hook is HookKind.TCX:
            return f"tcx {where}"
        return f"clsact {where} priority {self.priority}"


@dataclass
class AttachedClassifier:
    placement: Placement
    prog_id: int
    prog_fd: int


@dataclass
class Scene:
    pid: int
    node_ns: str
    pod_ns: str
    classifiers: list[AttachedClassifier] = field(default_factory=list)
    link_fds: list[int] = field(default_factory=list)
    tcx_available: bool = False
    tcx_problem: str = ""
    built_at: float | None = None  # time.monotonic() when every classifier was attached

    def path(self, namespace: str) -> str:
        return str(NETNS_DIR / namespace)

    def by_role(self, role: str) -> list[AttachedClassifier]:
        return [c for c in self.classifiers if c.placement.role == role]


def _ip(namespace: str, *argv: str) -> str:
    return _run("ip", "-n", namespace, *argv)


def create_namespaces(scene: Scene) -> None:
    for name in (scene.node_ns, scene.pod_ns):
        _run("ip", "netns", "add", name)
        _ip(name, "link", "set", "lo", "up")


def create_veth(scene: Scene) -> None:
    _ip(scene.node_ns, "link", "add", NODE_IF, "address", NODE_MAC, "type", "veth",
        "peer", "name", POD_IF, "address", POD_MAC, "netns", scene.pod_ns)  # fmt: skip
    for ns, ifname, addr, peer_addr, peer_mac in (
        (scene.node_ns, NODE_IF, NODE_ADDR, POD_ADDR, POD_MAC),
        (scene.pod_ns, POD_IF, POD_ADDR, NODE_ADDR, NODE_MAC),
    ):
        _ip(ns, "addr", "add", f"{addr}/30", "dev", ifname)
        _ip(ns, "link", "set", ifname, "up")
        # Static neighbours: the traffic must not depend on ARP getting through the classifiers.
        _ip(ns, "neigh", "replace", peer_addr, "lladdr", peer_mac, "dev", ifname,
            "nud", "permanent")  # fmt: skip


def _add_clsact(ipr, ifindex: int) -> None:
    ipr.tc("add", "clsact", ifindex)


def attach_clsact(scene: Scene, placement: Placement, prog_fd: int) -> None:
    from pyroute2 import IPRoute

    with entered_path(scene.path(placement.namespace)):
        ifindex = socket.if_nametoindex(placement.interface)
        with IPRoute() as ipr:  # opened inside: the socket stays in the namespace
            ipr.tc(
                "add-filter",
                "bpf",
                ifindex,
                None,
                fd=prog_fd,
                # Named the way Datadog's ebpf-manager names its filters, <section>_<uid>_<pid>:
                # the programs are loaded without BTF, so the kernel keeps 15 characters of
                # their names, and the filter name is what identifies Datadog's classifier.
                name=f"{placement.function}_{os.getuid()}_{scene.pid}",
                parent=CLSACT_PARENT[placement.direction],
                classid=1,
                direct_action=True,
                prio=placement.priority,
                protocol=ETH_P_ALL,
            )


def add_clsact_qdiscs(scene: Scene) -> None:
    from pyroute2 import IPRoute

    for ns, ifname in ((scene.node_ns, NODE_IF), (scene.pod_ns, POD_IF)):
        with entered_path(scene.path(ns)), IPRoute() as ipr:
            _add_clsact(ipr, socket.if_nametoindex(ifname))


def attach_tcx(scene: Scene, placement: Placement, prog_fd: int) -> int:
    with entered_path(scene.path(placement.namespace)):
        ifindex = socket.if_nametoindex(placement.interface)
        return bpf_syscalls.tcx_attach(prog_fd, ifindex, placement.direction)


def tcx_support(scene: Scene) -> str:
    """"" when tcx hooks exist in this kernel, else why not."""
    try:
        with entered_path(scene.path(scene.pod_ns)):
            bpf_syscalls.tcx_query(socket.if_nametoindex(POD_IF), Direction.INGRESS)
    except bpf_syscalls.TcxUnsupported:
        return "this kernel has no tcx hooks (they came in Linux 6.6)"
    except OSError as exc:
        return f"querying tcx failed: {exc}"
    return ""


def destroy(scene: Scene) -> None:
    for fd in scene.link_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    scene.link_fds.clear()
    for name in (scene.node_ns, scene.pod_ns):
        delete_namespace(name)


# --- traffic ---------------------------------------------------------------------------------


def send_udp(scene: Scene, from_ns: str, to_addr: str, count: int) -> None:
    """`count` UDP datagrams from inside `from_ns` to `to_addr` (the discard port)."""
    with entered_path(scene.path(from_ns)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for n in range(count):
            sock.sendto(f"tcprio self-test {n}".encode(), (to_addr, DISCARD_PORT))


def wait_until_gone(prog_ids: list[int], timeout_s: float = 3.0) -> list[int]:
    """Program ids still loaded after `timeout_s` (the kernel frees programs after an RCU
    grace period, so a just-released program can linger for a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = set(bpf_syscalls.list_prog_ids())
        remaining = [p for p in prog_ids if p in alive]
        if not remaining or time.monotonic() > deadline:
            return remaining
        time.sleep(0.05)


def existing_namespaces(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (NETNS_DIR / n).exists()]


# --- a packet for BPF_PROG_TEST_RUN ------------------------------------------------------------


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame() -> bytes:
    """Ethernet + IPv4 + UDP between the scene's two addresses, as it crosses the veth."""
    payload = b"tcprio self-test"
    udp = struct.pack("!HHHH", 40000, DISCARD_PORT, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(POD_ADDR), socket.inet_aton(NODE_ADDR),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    macs = bytes.fromhex(NODE_MAC.replace(":", "")) + bytes.fromhex(POD_MAC.replace(":", ""))
    return macs + b"\x08\x00" + header + udp
