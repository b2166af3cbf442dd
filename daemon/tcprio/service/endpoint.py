"""The daemon's HTTP endpoint: /metrics, /healthz (liveness), /readyz (first scan done).

Optional TLS and basic auth. Each connection is served on its own thread with a socket
timeout, so a slow or malformed client cannot hold the endpoint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from tcprio.service.config import BasicAuth, DaemonConfig

CLIENT_TIMEOUT_S = 10.0  # for each read or write on a connection
REQUEST_DEADLINE_S = 30.0  # for a whole request, from waiting for it to the last byte sent
MAX_CONNECTIONS = 128  # served at once; more are closed at once (Prometheus needs one)
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32 * 1024  # all header lines together (a Prometheus scrape sends < 1 KiB)


class Deadlines:
    """Cuts connections whose request is not done in time.

    The socket timeout bounds each read, not a request: a client dripping a byte every few
    seconds would hold its thread forever. One reaper thread shuts such sockets down; the
    blocked read then returns and the connection's thread ends."""

    def __init__(self, tick_s: float = 0.5) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}
        self._tick_s = tick_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._reap, name="tcprio-http-reaper",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def arm(self, connection: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[connection] = time.monotonic() + seconds

    def disarm(self, connection: socket.socket) -> None:
        with self._lock:
            self._due.pop(connection, None)

    def _reap(self) -> None:
        while not self._stopped.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                late = [c for c, due in self._due.items() if due <= now]
                for connection in late:
                    del self._due[connection]
            for connection in late:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type, family: int) -> None:
        self.address_family = family
        self.deadlines = Deadlines()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once, the thread count stays bounded
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.stop()


def _authorized(header: str | None, auth: BasicAuth) -> bool:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":  # auth schemes are case-insensitive (RFC 9110, 11.1)
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    # compare both, always, in constant time: no hint of which part was wrong
    user_ok = hmac.compare_digest(user.encode(), auth.username.encode())
    password_ok = hmac.compare_digest(password.encode(), auth.password.encode())
    return user_ok and password_ok


def make_handler(
    render: Callable[[], bytes],
    is_ready: Callable[[], bool],
    is_healthy: Callable[[], bool],
    auth: BasicAuth | None,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tcprio"
        sys_version = ""
        timeout = CLIENT_TIMEOUT_S
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not worth a log line each

        def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="tcprio"')
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            if len(self.headers) > MAX_HEADERS:
                self._send(431, b"too many headers\n")
                return
            if sum(len(k) + len(v) for k, v in self.headers.items()) > MAX_HEADER_BYTES:
                self._send(431, b"headers too large\n")
                return
            if auth is not None and not _authorized(self.headers.get("Authorization"), auth):
                self._send(401, b"authentication required\n")
                return
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = is_healthy()
                self._send(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
            elif path == "/readyz":
                ok = is_ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"first scan not done\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

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

    return Handler


def _checked_copy(path: Path) -> int:
    """An anonymous in-memory copy of `path`, read under the same rules as the configuration
    (a regular file on disk, size-bounded, never blocking): ssl then opens the copy, so a link
    swapped in after the configuration was checked cannot hand it another file."""
    from tcprio.kernel.files import MAX_FILE_BYTES, read_bytes_checked

    data = read_bytes_checked(path, MAX_FILE_BYTES)
    fd = os.memfd_create("tcprio-tls", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _load_cert_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    fds = [_checked_copy(cert_file), _checked_copy(key_file)]
    try:
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Endpoint:
    """The HTTP server on its own thread; `stop` closes the listening socket."""

    def __init__(
        self,
        config: DaemonConfig,
        render: Callable[[], bytes],
        is_ready: Callable[[], bool],
        is_healthy: Callable[[], bool],
    ) -> None:
        handler = make_handler(render, is_ready, is_healthy, config.basic_auth)
        self._server = _Server((config.listen_host, config.listen_port), handler,
                               _family(config.listen_host))  # fmt: skip
        if config.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            _load_cert_chain(context, config.tls.cert_file, config.tls.key_file)
            # the handshake happens on the connection's own thread, not in accept()
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
