"""The HTTP endpoint on real loopback sockets: routes, basic auth, TLS, bad requests."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tcprio.service.config import BasicAuth, DaemonConfig, TlsConfig
from tcprio.service.endpoint import Endpoint
from tcprio.service.metrics import MetricsRenderer
from tcprio.service.snapshot import Snapshot
from tests.timing import HANG_GUARD_S

SNAPSHOT = replace(Snapshot.empty("test-kernel"), ready=True)


@pytest.fixture
def serve() -> Iterator:
    started: list[Endpoint] = []

    def start(config: DaemonConfig, ready: bool = True, healthy: bool = True) -> Endpoint:
        endpoint = Endpoint(
            replace(config, listen_host="127.0.0.1", listen_port=0),
            MetricsRenderer(lambda: SNAPSHOT),
            lambda: ready,
            lambda: healthy,
        )
        endpoint.start()
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        endpoint.stop()


def get(url: str, headers: dict[str, str] | None = None, context=None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD_S, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_routes(serve):
    port = serve(DaemonConfig()).port
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and 'tcprio_build_info{kernel="test-kernel"' in body
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
    assert get(f"http://127.0.0.1:{port}/other")[0] == 404


def test_not_ready_and_stalled_say_503(serve):
    port = serve(DaemonConfig(), ready=False, healthy=False).port
    assert get(f"http://127.0.0.1:{port}/readyz") == (503, "first scan not done\n")
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth_lets_no_request_without_the_right_credentials_through(serve):
    port = serve(DaemonConfig(basic_auth=BasicAuth("prom", "s3cret"))).port
    url = f"http://127.0.0.1:{port}"
    for headers in (
        {},
        basic("prom", "wrong"),
        basic("other", "s3cret"),
        {"Authorization": "Basic !!notbase64"},
        {"Authorization": "Bearer s3cret"},
        {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()},
    ):
        for path in ("/metrics", "/", "/other"):
            status, body = get(url + path, headers)
            assert status == 401, (headers, path)
            assert "tcprio_" not in body
        # the probes tell nothing and a kubelet has no credentials: they answer anyway
        assert get(url + "/healthz", headers) == (200, "ok\n")
        assert get(url + "/readyz", headers) == (200, "ready\n")
    status, body = get(url + "/metrics", basic("prom", "s3cret"))
    assert status == 200 and "tcprio_build_info" in body


@pytest.fixture
def certificate(tmp_path: Path) -> TlsConfig:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return TlsConfig(cert, key)


def test_tls_serves_metrics_and_refuses_plain_http(serve, certificate: TlsConfig):
    port = serve(DaemonConfig(tls=certificate)).port
    context = ssl.create_default_context(cafile=str(certificate.cert_file))
    status, body = get(f"https://127.0.0.1:{port}/metrics", context=context)
    assert status == 200 and "tcprio_build_info" in body
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        get(f"http://127.0.0.1:{port}/metrics")


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_requests_and_oversized_headers_are_refused(serve):
    port = serve(DaemonConfig(basic_auth=BasicAuth("prom", "s3cret"))).port
    garbage = raw_request(port, b"GARBAGE\r\n\r\n")
    assert b"400" in garbage and b"tcprio_" not in garbage
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
    assert raw_request(port, huge).split(b" ")[1] in (b"400", b"431")
    many = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n"
    reply = raw_request(port, many)
    assert reply.split(b" ")[1] in (b"400", b"431") and b"tcprio_" not in reply
    # and the endpoint still serves afterwards
    assert get(f"http://127.0.0.1:{port}/metrics", basic("prom", "s3cret"))[0] == 200
