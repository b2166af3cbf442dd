"""The endpoint cannot be starved: slow clients dripping a byte every 5 s (and reconnecting as
soon as they are cut) hold at most their share, and every kubelet-style /healthz probe (a new
connection each, no credentials) still gets its 200.

Before the per-client limits and the triage, 130 such clients held all 128 connection slots and
/healthz failed 106 of 140 probes. The clients come from loopback addresses 127.0.0.x (all of
127/8 is loopback on Linux); loopback counts toward the total only, so the per-client limit is
tested with LOOPBACK_UNLIMITED off, as for any other address. (Not to be confused with
tests/test_starvation.py: Datadog's classifier starved of packets.)
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tcprio.service import endpoint as endpoint_module
from tcprio.service.config import BasicAuth, DaemonConfig
from tests import test_endpoint_load
from tests.timing import HANG_GUARD_S

serve = test_endpoint_load.serve  # the shared fixture: an Endpoint on a loopback port
SLOW_CLIENTS = 130
PROBES = 140
PROBE_EVERY_S = 0.05  # 140 probes over ~7 s: through a drip cycle and the triage's deadlines
DRIP_EVERY_S = 5.0
START = b"GET /metrics HTTP/1.1\r\nHost: tcprio\r\nX-Slow: "


@dataclass
class Drippers:
    """`count` slow clients from `sources` (in turn): each sends the start of a request, then a
    byte every DRIP_EVERY_S; one the server closes connects again at the next tick (0.2 s)."""

    port: int
    sources: list[str]
    count: int = SLOW_CLIENTS
    sockets: list[socket.socket | None] = field(default_factory=list)
    connects: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sockets = [None] * self.count
        for i in range(self.count):
            self._connect(i)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connect(self, i: int) -> None:
        source = self.sources[i % len(self.sources)]
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=HANG_GUARD_S,
                                         source_address=(source, 0))  # fmt: skip
            s.sendall(START)
        except OSError:
            return  # refused or reset at once: tried again at the next tick
        self.sockets[i] = s
        self.connects += 1

    def _closed(self, s: socket.socket) -> bool:
        if not select.select([s], [], [], 0)[0]:
            return False
        try:
            return s.recv(1024, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _run(self) -> None:
        next_drip = time.monotonic() + DRIP_EVERY_S
        while not self.stop.wait(0.2):
            drip = time.monotonic() >= next_drip
            if drip:
                next_drip += DRIP_EVERY_S
            for i, s in enumerate(self.sockets):
                if s is not None and not self._closed(s) and self._drip(s, drip):
                    continue
                if s is not None:
                    s.close()
                self.sockets[i] = None
                self._connect(i)

    @staticmethod
    def _drip(s: socket.socket, now: bool) -> bool:
        try:
            if now:
                s.sendall(b"a")
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=HANG_GUARD_S)
        for s in self.sockets:
            if s is not None:
                s.close()


def get(port: int, path: str, source: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S,
                                      source_address=(source, 0))  # fmt: skip
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


@dataclass
class Probed:
    answered: int
    sent: int
    slowest_s: float

    def __str__(self) -> str:
        return f"{self.answered}/{self.sent} probes answered 200, slowest {self.slowest_s:.3f} s"


def probe(port: int, source: str = "127.0.0.1") -> Probed:
    """PROBES kubelet-style /healthz probes, one connection each, every PROBE_EVERY_S."""
    answered, slowest = 0, 0.0
    for _ in range(PROBES):
        started = time.monotonic()
        answered += get(port, "/healthz", source) == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(PROBE_EVERY_S)
    return Probed(answered, PROBES, slowest)


@contextlib.contextmanager
def drippers(port: int, sources: list[str]) -> Iterator[Drippers]:
    slow = Drippers(port, sources)
    try:
        yield slow
    finally:
        slow.close()


@pytest.mark.parametrize("loopback_unlimited", [True, False], ids=["as-loopback", "as-remote"])
def test_slow_clients_from_one_address_leave_every_probe_its_answer(
    serve, monkeypatch, loopback_unlimited: bool
):
    monkeypatch.setattr(endpoint_module, "LOOPBACK_UNLIMITED", loopback_unlimited)
    port = serve(DaemonConfig(basic_auth=BasicAuth("prom", "s3cret")))  # probes need none
    threads = threading.active_count()
    with drippers(port, ["127.0.0.2"]) as slow:
        result = probe(port)
        print(f"\none address, loopback_unlimited={loopback_unlimited}: {result}; "
              f"{slow.connects} slow connections made")  # fmt: skip
        assert result.answered == PROBES, result
        if not loopback_unlimited:
            # they hold PER_CLIENT threads; another client (Prometheus) is served as usual
            assert threading.active_count() <= threads + endpoint_module.PER_CLIENT + 2
            token = {"Authorization": "Basic cHJvbTpzM2NyZXQ="}
            assert get(port, "/metrics", "127.0.0.3", token) == 200


def test_slow_clients_from_many_addresses_leave_every_probe_its_answer(serve, monkeypatch):
    """26 addresses x 5 slow clients: each under its limit, together past every slot. The
    probes then come through the triage; a complete request from loopback through the reserve."""
    monkeypatch.setattr(endpoint_module, "LOOPBACK_UNLIMITED", False)
    port = serve(DaemonConfig())
    sources = [f"127.0.0.{n}" for n in range(2, 28)]
    with drippers(port, sources) as slow:
        result = probe(port)
        print(f"\n26 addresses: {result}; {slow.connects} slow connections made")
        assert result.answered == PROBES, result
        assert get(port, "/metrics", "127.0.0.1") == 200  # loopback: a reserve thread
        assert get(port, "/readyz", "127.0.0.1") == 200
