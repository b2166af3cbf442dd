"""The daemon's HTTP endpoint: the telemetry path (/metrics), /healthz (liveness), /readyz (first
scan done), and a landing page at /.

TLS, client certificates, basic auth (bcrypt users) and response headers come from the web
config file (service/web_config.py), or the deprecated `tls:` / `basic_auth:` keys. /healthz and
/readyz answer without credentials (they reveal nothing: kubelet probes need no secret); the
rest needs them. /metrics is negotiated as prometheus_client does: OpenMetrics when the Accept
header asks for it (`choose_encoder`), gzip when Accept-Encoding allows it (`gzip_accepted`).

Nobody can starve the endpoint:
- each connection is served on its own thread with a socket timeout and a whole-request
  deadline, at most MAX_CONNECTIONS at once and PER_CLIENT from one address (loopback, the
  node's own processes, counts in the total only);
- a connection beyond those limits waits without a thread in the triage (one selector thread
  reads its request head, TLS handshake included, within TRIAGE_DEADLINE_S): a probe
  (/healthz, /readyz) is answered there at once, a complete request from loopback goes to one
  of RESERVE_THREADS, anything else gets 503 and is closed. So slow clients, from one address or
  many, hold at most their slots, and probes still get their answer.
A client's mistake (a bad request line, a failed TLS handshake, a reset) is one debug line.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import io
import ipaddress
import logging
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import choose_encoder, gzip_accepted

from tcprio import __version__
from tcprio.inputs import ConfigReadError
from tcprio.service.config import PROBE_PATHS, DaemonConfig
from tcprio.service.logs import fields
from tcprio.service.web_config import Authenticator, TlsServerConfig, tls_context

CLIENT_TIMEOUT_S = 10.0  # for each read or write on a connection
REQUEST_DEADLINE_S = 30.0  # for a whole request, from waiting for it to the last byte sent
MAX_CONNECTIONS = 128  # served at once on their own threads (Prometheus needs one)
PER_CLIENT = 8  # of those, from one client address other than loopback
LOOPBACK_UNLIMITED = True  # the node's own processes (self-test, a local agent) count in all only
TRIAGE_MAX = 256  # connections beyond those limits, waiting for their request head
TRIAGE_PER_CLIENT = 32  # of those, from one client address
TRIAGE_DEADLINE_S = 3.0  # for the whole request head there (a probe sends it at once)
TRIAGE_HEAD_BYTES = 16 * 1024
RESERVE_THREADS = 4  # complete requests from loopback, beyond the limits
ANSWER_TIMEOUT_S = 1.0  # to send the triage's short answers
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32 * 1024  # all header lines together (a Prometheus scrape sends < 1 KiB)
GZIP_LEVEL = 6  # gzip's default: nearly level 9's size at a fraction of its CPU

_log = logging.getLogger("tcprio.http")
Render = Callable[..., bytes]  # render() or render(openmetrics=True)


@dataclass(frozen=True)
class Site:
    """What the endpoint serves and how it guards it."""

    render: Render
    is_ready: Callable[[], bool]
    is_healthy: Callable[[], bool]
    auth: Authenticator | None = None
    telemetry_path: str = "/metrics"
    headers: tuple[tuple[str, str], ...] = ()

    def probe(self, path: str) -> tuple[int, bytes]:
        """/healthz or /readyz: (status, body)."""
        if path == "/healthz":
            ok = self.is_healthy()
            return (200, b"ok\n") if ok else (503, b"event loop stalled\n")
        ok = self.is_ready()
        return (200, b"ready\n") if ok else (503, b"first scan not done\n")

    def landing_page(self) -> bytes:
        link = html.escape(self.telemetry_path.lstrip("/"))
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>tcprio exporter</title>'
            "</head>\n<body><h1>tcprio exporter</h1>\n"
            "<p>What hides Datadog's network classifier on this node, for Prometheus.</p>\n"
            f'<ul>\n<li><a href="{link}">Metrics</a> ({html.escape(self.telemetry_path)})</li>\n'
            '<li><a href="healthz">Health</a> (/healthz)</li>\n'
            '<li><a href="readyz">Readiness</a> (/readyz)</li>\n</ul>\n'
            f"<p>Version {html.escape(__version__)}</p>\n</body></html>\n"
        ).encode()


def _client_error(client: object, exc: BaseException | None) -> None:
    _log.debug("client error", extra=fields(client=client, error=f"{type(exc).__name__}: {exc}"))


class Deadlines:
    """Cuts connections whose request is not done in time.

    The socket timeout bounds each read, not a request: a client dripping a byte every few
    seconds would hold its thread forever. One reaper thread shuts such sockets down; the
    blocked read then returns and the connection's thread ends."""

    def __init__(self, tick_s: float = 0.5) -> None:
        self._changed = threading.Condition()
        self._due: dict[socket.socket, float] = {}
        self._tick_s = tick_s  # how late a cut may come: deadlines are checked in batches
        self._stopped = False
        self._thread = threading.Thread(target=self._reap, name="tcprio-http-reaper",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def arm(self, connection: socket.socket, seconds: float) -> None:
        with self._changed:
            idle = not self._due
            self._due[connection] = time.monotonic() + seconds
            if idle:
                self._changed.notify()

    def disarm(self, connection: socket.socket) -> None:
        with self._changed:
            self._due.pop(connection, None)

    def _reap(self) -> None:
        """Asleep while no request is under way (a daemon at rest wakes for nothing), else
        every tick until the last deadline is disarmed or cut."""
        while True:
            with self._changed:
                while not self._due and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
                self._changed.wait(self._tick_s)
                now = time.monotonic()
                late = [c for c, due in self._due.items() if due <= now]
                for connection in late:
                    del self._due[connection]
            for connection in late:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join(timeout=5)


class Slots:
    """Connections on their own threads: at most `total`, at most `per_client` per address
    (loopback addresses too unless `loopback_unlimited`)."""

    def __init__(self, total: int, per_client: int, loopback_unlimited: bool = True) -> None:
        self._lock = threading.Lock()
        self._total, self._per_client = total, per_client
        self._loopback_unlimited = loopback_unlimited
        self._used: Counter[str] = Counter()
        self._in_use = 0

    def take(self, client: str) -> bool:
        limited = not (self._loopback_unlimited and is_loopback(client))
        with self._lock:
            if self._in_use >= self._total:
                return False
            if limited and self._used[client] >= self._per_client:
                return False
            self._in_use += 1
            self._used[client] += 1
            return True

    def give(self, client: str) -> None:
        with self._lock:
            self._in_use -= 1
            self._used[client] -= 1
            if self._used[client] <= 0:
                del self._used[client]


def is_loopback(client: str) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def reply_bytes(
    status: int, body: bytes, headers: tuple[tuple[str, str], ...] = (), head_only: bool = False
) -> bytes:
    """A whole `Connection: close` HTTP/1.1 response with a plain-text body."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Server: tcprio",
             "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]  # fmt: skip
    if status == 503:
        lines.append("Retry-After: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def request_line(head: bytes) -> tuple[str, str] | None:
    """(method, path without the query) of a request head; None when it is not HTTP/1.x."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    return parts[0], parts[1].split("?", 1)[0]


def head_complete(head: bytes) -> bool:
    return b"\r\n\r\n" in head or b"\n\n" in head


@dataclass(eq=False)
class _Waiting:
    """A connection in the triage."""

    sock: socket.socket
    address: tuple
    due: float
    handshaking: bool
    head: bytearray = field(default_factory=bytearray)
    events: int = selectors.EVENT_READ  # what the selector waits for

    @property
    def client(self) -> str:
        return str(self.address[0])


class Triage:
    """Connections beyond the thread limits, waiting for their request head on one selector
    thread (no thread each): probes are answered here, loopback requests go to the reserve,
    the rest get 503. A head not complete within TRIAGE_DEADLINE_S is closed."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._incoming: list[_Waiting] = []
        self._waiting: dict[socket.socket, _Waiting] = {}
        self._count = 0
        self._per_client: Counter[str] = Counter()
        self._reserve = threading.BoundedSemaphore(RESERVE_THREADS)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tcprio-http-triage", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, address: tuple) -> None:
        """From the accepting thread: wait here, or be closed at once when the triage is full."""
        client = str(address[0])
        with self._lock:
            room = (not self._stopped and self._count < TRIAGE_MAX
                    and self._per_client[client] < TRIAGE_PER_CLIENT)  # fmt: skip
            if room:
                self._count += 1
                self._per_client[client] += 1
                due = time.monotonic() + TRIAGE_DEADLINE_S
                tls = isinstance(sock, ssl.SSLSocket)
                self._incoming.append(_Waiting(sock, address, due, tls))
        if not room:
            self._server.shutdown_request(sock)
            return
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)

    # --- the triage thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped:
                try:
                    self._once()
                except Exception as exc:  # a bug here must not leave connections unanswered
                    error = f"{type(exc).__name__}: {exc}"
                    _log.error("triage step failed", extra=fields(error=error))
                    time.sleep(0.1)
        finally:
            self._close_all()

    def _once(self) -> None:
        now = time.monotonic()
        due = min((w.due for w in self._waiting.values()), default=None)
        timeout = None if due is None else max(0.0, due - now)  # idle: asleep until an add
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            else:
                self._readable(key.data)
        self._take_incoming()
        self._expire(time.monotonic())

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for waiting in incoming:
            try:
                waiting.sock.setblocking(False)
                self._selector.register(waiting.sock, selectors.EVENT_READ, waiting)
            except (OSError, ValueError):
                self._forget(waiting)
                self._server.shutdown_request(waiting.sock)
                continue
            self._waiting[waiting.sock] = waiting

    def _readable(self, w: _Waiting) -> None:
        try:
            if w.handshaking:
                w.sock.do_handshake()  # type: ignore[attr-defined]
                w.handshaking = False
            while not head_complete(w.head):
                chunk = w.sock.recv(4096)
                if not chunk:
                    self._close(w)
                    return
                w.head += chunk
                if len(w.head) > TRIAGE_HEAD_BYTES:
                    self._answer(w, 431, b"request head too large\n")
                    return
        except (ssl.SSLWantReadError, BlockingIOError):
            self._wait_for(w, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:  # the handshake's answer did not fit the socket buffer
            self._wait_for(w, selectors.EVENT_WRITE)
            return
        except OSError as exc:
            _client_error(w.client, exc)
            self._close(w)
            return
        self._decide(w)

    def _wait_for(self, w: _Waiting, events: int) -> None:
        if w.events != events:
            self._selector.modify(w.sock, events, w)
            w.events = events

    def _decide(self, w: _Waiting) -> None:
        found = request_line(bytes(w.head))
        if found is None:
            self._answer(w, 400, b"bad request\n")
            return
        method, path = found
        site: Site = self._server.site
        if method in ("GET", "HEAD") and path in PROBE_PATHS:
            status, body = site.probe(path)
            self._answer(w, status, body, head_only=method == "HEAD")
        elif is_loopback(w.client) and self._reserve.acquire(blocking=False):
            self._unregister(w)
            self._server.serve_reserved(w.sock, w.address, bytes(w.head), self._reserve.release)
        else:
            self._answer(w, 503, b"busy: too many connections; try again\n")

    def _answer(self, w: _Waiting, status: int, body: bytes, head_only: bool = False) -> None:
        self._unregister(w)
        try:
            w.sock.settimeout(ANSWER_TIMEOUT_S)
            w.sock.sendall(reply_bytes(status, body, self._server.site.headers, head_only))
        except OSError as exc:
            _client_error(w.client, exc)
        finally:
            self._server.shutdown_request(w.sock)

    def _expire(self, now: float) -> None:
        for w in [w for w in self._waiting.values() if w.due <= now]:
            _log.debug("client too slow", extra=fields(client=w.client, head_bytes=len(w.head)))
            self._close(w)

    def _unregister(self, w: _Waiting) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(w.sock)
        self._waiting.pop(w.sock, None)
        self._forget(w)

    def _forget(self, w: _Waiting) -> None:
        with self._lock:
            self._count -= 1
            self._per_client[w.client] -= 1
            if self._per_client[w.client] <= 0:
                del self._per_client[w.client]

    def _close(self, w: _Waiting) -> None:
        self._unregister(w)
        self._server.shutdown_request(w.sock)

    def _close_all(self) -> None:
        for w in list(self._waiting.values()):
            self._close(w)
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for w in incoming:
            self._server.shutdown_request(w.sock)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _Prefixed(io.RawIOBase):
    """A connection's bytes with the ones the triage already read in front."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of connects (probes among them) waits, not dropped

    def __init__(self, address: tuple[str, int], handler: type, family: int, site: Site) -> None:
        self.address_family = family
        self.site = site
        self.deadlines = Deadlines()
        self.slots = Slots(MAX_CONNECTIONS, PER_CLIENT, LOOPBACK_UNLIMITED)
        self._prefixes: dict[socket.socket, bytes] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # for shutdown
        self._stop_requested = self._loop_started = False
        self._loop_done = threading.Event()
        try:
            super().__init__(address, handler)
        except BaseException:
            self._close_wake_pipe()
            raise
        self.triage = Triage(self)

    def _close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop, asleep until a connection or `shutdown` (its own wakes every
        `poll_interval` to look for a shutdown request: twice a second at rest, for nothing)."""
        self._loop_started = True
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop_requested:
                    for key, _ in selector.select():
                        if key.fileobj is self and not self._stop_requested:
                            self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._loop_done.set()

    def shutdown(self) -> None:
        """Stops serve_forever and waits for it to return (call it from another thread)."""
        self._stop_requested = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._loop_started:
            self._loop_done.wait()

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        client = str(client_address[0])
        if not self.slots.take(client):
            self.triage.add(request, client_address)  # no thread: the triage decides
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.give(client)
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.give(str(client_address[0]))

    def serve_reserved(
        self, request: socket.socket, address: tuple, head: bytes, done: Callable[[], None]
    ) -> None:
        """One request, whose head the triage read, on a reserve thread."""
        self._prefixes[request] = head

        def serve() -> None:
            try:
                self.finish_request(request, address)
            except Exception:
                self.handle_error(request, address)
            finally:
                self._prefixes.pop(request, None)
                self.shutdown_request(request)
                done()

        try:
            threading.Thread(target=serve, name="tcprio-http-reserve", daemon=True).start()
        except RuntimeError:  # no thread to be had: the request goes unanswered
            self._prefixes.pop(request, None)
            self.shutdown_request(request)
            done()

    def take_prefix(self, request: socket.socket) -> bytes | None:
        return self._prefixes.get(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """One line, never socketserver's traceback on stderr: a client's TLS or connection
        mistake at debug, anything else (a bug of ours) as an error."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            _client_error(client_address[0], exc)
        else:
            error = f"{type(exc).__name__}: {exc}"
            _log.error("request failed", extra=fields(client=client_address[0], error=error))

    def server_close(self) -> None:
        super().server_close()
        self.triage.stop()
        self.deadlines.stop()
        self._close_wake_pipe()


class Handler(BaseHTTPRequestHandler):
    server_version = "tcprio"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    reserved = False  # a reserve thread's one request

    def setup(self) -> None:
        super().setup()
        prefix = self.server.take_prefix(self.connection)  # type: ignore[attr-defined]
        if prefix is not None:
            self.reserved = True
            self.rfile.close()
            self.rfile = io.BufferedReader(_Prefixed(prefix, self.connection))

    @property
    def site(self) -> Site:
        return self.server.site  # type: ignore[attr-defined]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # scrapes are not worth a log line each

    def log_message(self, format: str, *args: object) -> None:
        # what BaseHTTPRequestHandler says of a bad request or a timeout: one debug line
        _log.debug("bad request", extra=fields(client=self.client_address[0],
                                                detail=format % args))  # fmt: skip

    def handle(self) -> None:
        if self.reserved:
            self.close_connection = True
            self.handle_one_request()
        else:
            super().handle()

    def _send(
        self, status: int, body: bytes, content_type: str = "text/plain",
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*self.site.headers, *extra):
            self.send_header(name, value)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="tcprio"')
        if self.reserved:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _headers_too_big(self) -> bool:
        if len(self.headers) > MAX_HEADERS:
            self._send(431, b"too many headers\n")
            return True
        if sum(len(k) + len(v) for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self._send(431, b"headers too large\n")
            return True
        return False

    def _route(self) -> None:
        if self._headers_too_big():
            return
        site = self.site
        path = self.path.split("?", 1)[0]
        if path in PROBE_PATHS:  # no credentials: a kubelet probe has none, and they tell nothing
            self._send(*site.probe(path))
            return
        if site.auth is not None and not site.auth.check(self.headers.get("Authorization")):
            self._send(401, b"authentication required\n")
        elif path == site.telemetry_path:
            self._metrics()
        elif path == "/":
            self._send(200, site.landing_page(), "text/html; charset=utf-8")
        else:
            where = f"not found: try {site.telemetry_path}, /healthz or /readyz\n"
            self._send(404, where.encode())

    def _metrics(self) -> None:
        """prometheus_client's negotiation: its choice of format, gzip when accepted."""
        _encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        if content_type.startswith("application/openmetrics-text"):
            body = self.site.render(openmetrics=True)
        else:
            body = self.site.render()
        extra = [("Vary", "Accept, Accept-Encoding")]
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            extra.append(("Content-Encoding", "gzip"))
        self._send(200, body, content_type, tuple(extra))

    def handle_one_request(self) -> None:
        deadlines: Deadlines = self.server.deadlines  # type: ignore[attr-defined]
        deadlines.arm(self.connection, REQUEST_DEADLINE_S)
        try:
            super().handle_one_request()
        finally:
            deadlines.disarm(self.connection)

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()


def make_handler() -> type[Handler]:
    """The handler class, with the module's client timeout as it is now (the tests lower it)."""
    return type("Handler", (Handler,), {"timeout": CLIENT_TIMEOUT_S})


def security(config: DaemonConfig) -> tuple[TlsServerConfig | None, Authenticator | None]:
    """TLS and basic auth from the web config file, else from the deprecated keys."""
    if config.web is not None:
        users = dict(config.web.basic_auth_users)
        return config.web.tls, Authenticator(users) if users else None
    tls = None
    if config.tls is not None:
        tls = TlsServerConfig(config.tls.cert_file, config.tls.key_file)
    auth = None
    if config.basic_auth is not None:
        auth = Authenticator(plain=(config.basic_auth.username, config.basic_auth.password))
    return tls, auth


def _context(tls: TlsServerConfig) -> ssl.SSLContext:
    """The TLS context; OSError (the daemon's "cannot listen") when a file no longer does."""
    try:
        return tls_context(tls)
    except ConfigReadError as exc:
        raise OSError(f"TLS files: {exc}") from None


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Endpoint:
    """The HTTP server on its own thread; `stop` closes the listening socket."""

    def __init__(
        self,
        config: DaemonConfig,
        render: Render,
        is_ready: Callable[[], bool],
        is_healthy: Callable[[], bool],
    ) -> None:
        tls, auth = security(config)
        headers = config.web.headers if config.web is not None else ()
        site = Site(render, is_ready, is_healthy, auth, config.telemetry_path, headers)
        context = _context(tls) if tls is not None else None  # before the port is taken
        self._server = _Server((config.listen_host, config.listen_port), make_handler(),
                               _family(config.listen_host), site)  # fmt: skip
        if context is not None:
            # the handshake happens on the connection's own thread (or the triage's), not in
            # accept()
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tcprio-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
