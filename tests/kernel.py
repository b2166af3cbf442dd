"""Real kernel scenery for the tests: network namespaces, veths, clsact qdiscs.

Every namespace made here has a unique `tcpriot-` name and is deleted when its context ends,
whether the test passed, failed or was interrupted. Nothing here touches the host's interfaces.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tcprio.kernel.namespaces import entered_path

NETNS_PREFIX = "tcpriot-"
_counter = itertools.count()


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unique_name(label: str = "") -> str:
    # Netns names become file names in /run/netns; keep them short, unique per process and call.
    return f"{NETNS_PREFIX}{label}{os.getpid()}-{next(_counter)}"


@dataclass(frozen=True)
class TestNetns:
    name: str

    __test__ = False  # not a pytest test class

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def ip(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *argv)

    def tc(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run("tc", "-n", self.name, *argv)

    def tc_json(self, *argv: str) -> list[dict]:
        out = run("tc", "-n", self.name, "-j", *argv).stdout.strip()
        return json.loads(out) if out else []

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *argv, check=check)

    def ifindex(self, ifname: str) -> int:
        info = json.loads(run("ip", "-n", self.name, "-j", "link", "show", ifname).stdout)
        return int(info[0]["ifindex"])

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """Run the body with this thread inside the namespace (netlink and bpf calls follow)."""
        return entered_path(self.path)


@contextlib.contextmanager
def netns(label: str = "") -> Iterator[TestNetns]:
    ns = TestNetns(unique_name(label))
    run("ip", "netns", "add", ns.name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        run("ip", "netns", "del", ns.name, check=False)


def veth(a: TestNetns, a_if: str, b: TestNetns, b_if: str) -> None:
    """A veth pair between two test namespaces, both ends up."""
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")


def veth_in_one(ns: TestNetns, a_if: str, b_if: str) -> None:
    """A veth pair whose both ends live in the same test namespace."""
    ns.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if)
    ns.ip("link", "set", a_if, "up")
    ns.ip("link", "set", b_if, "up")


def add_clsact(ns: TestNetns, ifname: str) -> None:
    ns.tc("qdisc", "add", "dev", ifname, "clsact")


def leftover_test_namespaces() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)]
