"""The HTTP endpoint against hostile and heavy clients, on real loopback sockets.

Complements tests/test_endpoint.py: malformed request lines, an absurdly long request line,
header count and total size limits, slowloris-style half requests (the endpoint keeps serving
others and drops them after its client timeout), many concurrent scrapers, and basic auth that
lets no request without the right credentials reach the metrics (any method, path, spelling).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from tcprio.service import endpoint as endpoint_module
from tcprio.service.config import BasicAuth, DaemonConfig
from tcprio.service.endpoint import Endpoint
from tcprio.service.metrics import MetricsRenderer
from tcprio.service.snapshot import Snapshot
from tests.timing import HANG_GUARD_S, wait_until

SNAPSHOT = replace(Snapshot.empty("test-kernel"), ready=True)
AUTH = BasicAuth("prom", "s3cret")
TOKEN = base64.b64encode(b"prom:s3cret").decode()
GOOD = f"Authorization: Basic {TOKEN}\r\n".encode()
SCRAPES = 2000  # requests the concurrent scrapers make in all: about 1.8 s here


@pytest.fixture
def serve() -> Iterator:
    """start(config, render=None) -> port: an Endpoint on a free loopback port, stopped after
    the test (tests/test_endpoint_starvation.py and tests/test_web_config.py use it too)."""
    started: list[Endpoint] = []

    def start(config: DaemonConfig, render=None) -> int:
        endpoint = Endpoint(
            replace(config, listen_host="127.0.0.1", listen_port=0),
            render or MetricsRenderer(lambda: SNAPSHOT),
            lambda: True,
            lambda: True,
        )
        endpoint.start()
        started.append(endpoint)
        return endpoint.port

    yield start
    for endpoint in started:
        endpoint.stop()


def raw(port: int, data: bytes, timeout: float = HANG_GUARD_S) -> bytes:
    """Send `data`, half-close, read everything the server sends (a reset ends the reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the server refused before reading it
            pass  # all and closed; its answer may still be there
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def statuses(reply: bytes) -> list[int]:
    """The status code of every HTTP/1.x response in `reply`."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", reply)]


def get(port: int, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def healthz_seconds(port: int, headers: dict[str, str] | None = None) -> float:
    """How long /healthz takes (a few ms here): a request is served promptly, whatever other
    clients do, within the hang guard. 100 clients each held for a 1 s timeout, one after the
    other, would take 100 s."""
    started = time.monotonic()
    assert get(port, "/healthz", headers=headers) == (200, b"ok\n")
    seconds = time.monotonic() - started
    assert seconds < HANG_GUARD_S, f"/healthz took {seconds:.1f} s"
    return seconds


MALFORMED = [  # never a success
    b"GET\r\n\r\n",
    b"\r\n\r\n",
    b"GET /metrics HTTP/9.9\r\n\r\n",
    b"GET /metrics HTTP/1.1 extra\r\n\r\n",
    b"GET /metrics HTTP/x.y\r\n\r\n",
    b"GET /metrics FTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS hello
    b"\x00\xff\xfe\x80 / HTTP/1.1\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"DELETE /metrics HTTP/1.1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
]
ODD = [  # tolerated by the parser: fine without auth, but never metrics without credentials
    b"GET /metrics\r\n\r\n",  # HTTP/0.9
    b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /metrics HTTP/1.1\r\nAuthorization: Basic\r\n " + TOKEN.encode() + b"\r\n\r\n",
]


@pytest.mark.parametrize("auth", [None, AUTH], ids=["open", "basic-auth"])
def test_malformed_requests_are_refused_and_the_endpoint_goes_on(serve, auth):
    port = serve(DaemonConfig(basic_auth=auth))
    for data in MALFORMED:
        reply = raw(port, data)
        assert b"tcprio_" not in reply, data
        assert all(code >= 400 for code in statuses(reply)), (data, reply[:200])
    for data in ODD:
        reply = raw(port, data)
        if auth is not None:
            assert b"tcprio_" not in reply, data
    headers = {"Authorization": f"Basic {TOKEN}"} if auth else {}
    status, body = get(port, headers=headers)
    assert status == 200 and b"tcprio_build_info" in body


def test_bad_request_lines_get_the_right_status(serve):
    port = serve(DaemonConfig())
    # a request line that cannot be read gets the error page without a status line (the
    # server cannot know the client speaks HTTP/1.x)
    assert b"Error code: 505" in raw(port, b"GET /metrics HTTP/9.9\r\n\r\n")
    assert b"Error code: 400" in raw(port, b"GET /metrics HTTP/1.1 extra\r\n\r\n")
    assert statuses(raw(port, b"BREW /metrics HTTP/1.1\r\n\r\n")) == [501]
    assert statuses(raw(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")) == [501]


def test_absurdly_long_request_line_is_refused(serve):
    port = serve(DaemonConfig(basic_auth=AUTH))
    for size in (70_000, 1_000_000):
        reply = raw(port, b"GET /" + b"a" * size + b" HTTP/1.1\r\n" + GOOD + b"\r\n")
        assert statuses(reply) == [414] and b"tcprio_" not in reply
    healthz_seconds(port, headers={"Authorization": f"Basic {TOKEN}"})


def test_header_count_limit(serve):
    port = serve(DaemonConfig(basic_auth=AUTH))

    def request(extra: int) -> bytes:
        lines = b"".join(b"X-%d: y\r\n" % i for i in range(extra))
        return raw(port, b"GET /metrics HTTP/1.1\r\n" + lines + GOOD + b"Connection: close\r\n\r\n")

    ok = request(endpoint_module.MAX_HEADERS - 2)  # with Authorization and Connection: 64
    assert statuses(ok) == [200] and b"tcprio_build_info" in ok
    for extra in (endpoint_module.MAX_HEADERS - 1, 99, 150, 5000):
        reply = request(extra)
        assert statuses(reply) and statuses(reply)[0] in (400, 431), extra
        assert b"tcprio_" not in reply


def test_header_block_size_is_bounded(serve):
    """All headers together hold at most MAX_HEADER_BYTES (a scrape sends under 1 KiB), no
    line over 64 KiB, no more than MAX_HEADERS headers. Just under the bound is served; just
    over it is refused; the endpoint goes on."""
    port = serve(DaemonConfig(basic_auth=AUTH))
    budget = endpoint_module.MAX_HEADER_BYTES
    auth_and_close = len("Authorization") + len(f"Basic {TOKEN}") + len("Connection") + 5
    fits = b"X-big: " + b"a" * (budget - auth_and_close - len("X-big")) + b"\r\n"
    reply = raw(port, b"GET /metrics HTTP/1.1\r\n" + fits + GOOD + b"Connection: close\r\n\r\n")
    assert statuses(reply) == [200]
    too_big = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))  # 40 KB
    reply = raw(port, b"GET /metrics HTTP/1.1\r\n" + too_big + GOOD + b"Connection: close\r\n\r\n")
    assert statuses(reply) == [431] and b"tcprio_" not in reply
    line = 65_000
    count = endpoint_module.MAX_HEADERS - 2  # with Authorization and Connection: 4 MB
    big = b"".join(b"X-%d: %s\r\n" % (i, b"a" * line) for i in range(count))
    reply = raw(port, b"GET /metrics HTTP/1.1\r\n" + big + GOOD + b"Connection: close\r\n\r\n")
    assert statuses(reply) == [431] and b"tcprio_" not in reply
    reply = raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 65_537 + b"\r\n" + GOOD + b"\r\n")
    assert statuses(reply) in ([400], [431]) and b"tcprio_" not in reply
    status, body = get(port, headers={"Authorization": f"Basic {TOKEN}", "User-Agent": "x" * 500})
    assert status == 200 and b"tcprio_build_info" in body


def test_pipelined_requests_each_need_credentials(serve):
    port = serve(DaemonConfig(basic_auth=AUTH))
    reply = raw(port, b"GET /metrics HTTP/1.1\r\n" + GOOD + b"\r\n"
                      b"GET /metrics HTTP/1.1\r\n\r\n"
                      b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert statuses(reply) == [200, 401, 401]
    assert reply.count(b"# HELP tcprio_build_info") == 1


def test_half_open_requests_do_not_hold_the_endpoint(serve, monkeypatch):
    """Slowloris: many clients that send part of a request and stop, one that drips a byte at a
    time. Others are served promptly meanwhile; the silent ones are dropped after the client
    timeout."""
    monkeypatch.setattr(endpoint_module, "CLIENT_TIMEOUT_S", 1.0)
    port = serve(DaemonConfig())
    partials = [b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b"GET /metr", b"G", b""]
    held = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
        s.sendall(partials[i % len(partials)])
        held.append(s)
    dripping = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
    try:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
            dripping.sendall(bytes([byte]))
            if byte == ord("\n"):
                healthz_seconds(port)  # served while all of them hang
        for _ in range(3):
            healthz_seconds(port)
        # the silent ones are closed by the server (no reply: the request never came), after
        # the 1 s client timeout; the hang guard bounds when
        deadline = time.monotonic() + HANG_GUARD_S
        for s in held:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(1024) == b""
        assert get(port)[0] == 200
    finally:
        dripping.close()
        for s in held:
            s.close()


def test_a_dripping_client_is_cut_at_the_request_deadline(serve, monkeypatch):
    """A byte every 0.2 s never trips the per-read timeout; the whole-request deadline does.

    Cut after 1.5 s (the deadline) + up to 0.5 s (the reaper's tick): about 1.8 s here. It drips
    until the hang guard, so no other timeout can cut it first."""
    monkeypatch.setattr(endpoint_module, "REQUEST_DEADLINE_S", 1.5)
    port = serve(DaemonConfig())
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as s:
        cut = False
        endless = itertools.chain(b"GET /metrics HTTP/1.1\r\nX-Slow: ", itertools.repeat(ord("a")))
        for byte in endless:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > HANG_GUARD_S:
                break
        if not cut:
            s.settimeout(1)
            try:
                cut = s.recv(1024) == b""
            except ConnectionResetError:
                cut = True
            except TimeoutError:
                pass
    elapsed = time.monotonic() - started
    assert cut, f"still connected after {elapsed:.1f} s (deadline 1.5 s)"
    assert elapsed < HANG_GUARD_S, f"cut after {elapsed:.1f} s (deadline 1.5 s)"
    healthz_seconds(port)


def test_connections_beyond_the_cap_get_no_thread(serve, monkeypatch):
    """Beyond the cap a connection waits in the triage, without a thread of its own: a probe
    is answered there, anything else (the loopback reserve being off here) gets 503."""
    monkeypatch.setattr(endpoint_module, "MAX_CONNECTIONS", 5)
    monkeypatch.setattr(endpoint_module, "RESERVE_THREADS", 0)
    port = serve(DaemonConfig())
    threads = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) for _ in range(5)]
    try:
        for s in held:
            s.sendall(b"GET /met")  # each holds a slot, waiting for the rest
        # No wait needed: the server accepts connections in order and takes a slot for each
        # before it accepts the next, so the five hold every slot when the sixth comes.
        reply = raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert statuses(reply) == [200] and reply.endswith(b"\r\n\r\nok\n")
        assert b"Connection: close" in reply
        reply = raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert statuses(reply) == [503] and b"tcprio_" not in reply
        assert threading.active_count() <= threads + 5  # no sixth thread
    finally:
        for s in held:
            s.close()

    def serves() -> bool:  # the slots come back as the five go away
        with contextlib.suppress(OSError):
            return get(port, "/healthz") == (200, b"ok\n")
        return False

    wait_until(serves, "the endpoint never served again")


def closed_by_the_server(s: socket.socket) -> bool:
    """Whether the server has closed `s` (without waiting: an open one is not readable)."""
    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def test_threads_stay_bounded_under_a_flood_of_half_requests(serve):
    port = serve(DaemonConfig())
    before = threading.active_count()
    held = []
    try:
        for _ in range(endpoint_module.MAX_CONNECTIONS + 100):
            s = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            held.append(s)
        # the server has taken every connection once it has closed the 100 beyond the cap
        wait_until(
            lambda: sum(map(closed_by_the_server, held)) >= 100, "the 100 beyond the cap closed"
        )
        assert threading.active_count() <= before + endpoint_module.MAX_CONNECTIONS + 2
    finally:
        for s in held:
            s.close()


def test_concurrent_scrapers_never_fail(serve):
    port = serve(DaemonConfig(basic_auth=AUTH))
    headers = {"Authorization": f"Basic {TOKEN}"}
    failures: list[str] = []
    latencies: list[float] = []
    stop = time.monotonic() + HANG_GUARD_S

    def client(keep_alive: bool) -> None:
        conn = None
        while len(latencies) + len(failures) < SCRAPES and time.monotonic() < stop:
            started = time.monotonic()
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S)
                conn.request("GET", "/metrics", headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or not body.endswith(b"\n"):
                    failures.append(f"{response.status} {len(body)}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                conn = None
                continue
            latencies.append(time.monotonic() - started)
            if not keep_alive:
                conn.close()
                conn = None

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * HANG_GUARD_S)  # the guard, then one request's own timeout
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:5]
    assert len(latencies) >= SCRAPES, f"{len(latencies)} scrapes in {HANG_GUARD_S:g} s"
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95)]
    assert p95 < HANG_GUARD_S, f"95th percentile latency {p95:.2f} s"


def test_basic_auth_guards_every_method_path_and_spelling(serve):
    port = serve(DaemonConfig(basic_auth=AUTH))
    bad_headers = [
        {},
        {"Authorization": f"Basic {TOKEN[:-2]}"},  # padding cut: not valid base64
        {"Authorization": f"Basic {TOKEN} extra"},
        {"Authorization": f"Basic {TOKEN}\x00"},
        {"Authorization": "Basic " + base64.b64encode(b"prom:s3cret\x00").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"prom:S3CRET").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"PROM:s3cret").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"prom: s3cret").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:s3cret").decode()},
        {"Authorization": "Basic " + base64.b64encode(b":").decode()},
        {"Authorization": "Basic "},
        {"Authorization": "Basic"},
        {"Authorization": "Digest username=prom"},
        {"Proxy-Authorization": f"Basic {TOKEN}"},
        {"X-Authorization": f"Basic {TOKEN}"},
    ]
    paths = ["/metrics", "/metrics/", "/METRICS", "/metrics?x=1", "//metrics", "/./metrics",
             "/", "http://127.0.0.1/metrics", "/%6detrics", "/healthz/", "/HEALTHZ"]  # fmt: skip
    for method in ("GET", "HEAD"):
        for path in paths:
            for headers in bad_headers:
                status, body = get(port, path, method, headers)
                assert status == 401 and b"tcprio_" not in body, (method, path, headers)
        # the probes (exactly these paths) need no credentials: a kubelet probe has none
        for path in ("/healthz", "/readyz", "/healthz?x=1"):
            status, body = get(port, path, method, {})
            assert status == 200 and b"tcprio_" not in body, (method, path)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, body = get(port, "/metrics", method, {})
        assert status >= 400 and b"tcprio_" not in body
    # the header name is case-insensitive (HTTP says so); the right credentials work
    for name in ("Authorization", "authorization", "AUTHORIZATION"):
        status, body = get(port, "/metrics", "GET", {name: f"Basic {TOKEN}"})
        assert status == 200 and b"tcprio_build_info" in body
    # so is the scheme (RFC 9110, 11.1)
    for scheme in ("basic", "BASIC", "bAsIc"):
        status, body = get(port, "/metrics", "GET", {"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200 and b"tcprio_build_info" in body
    status, body = get(port, "/metrics", "HEAD", {"Authorization": f"Basic {TOKEN}"})
    assert status == 200 and body == b""
