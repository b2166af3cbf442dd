"""Exporter conventions on real sockets: the web config file (TLS with a client CA made here by
`openssl`, bcrypt users), /healthz without credentials, gzip and OpenMetrics negotiation, the
landing page, the telemetry path, response headers; the file's mistakes as one line each."""

from __future__ import annotations

import gzip
import http.client
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from tcprio.service import web_config
from tcprio.service.config import ConfigError, DaemonConfig, Overrides, load_config, with_overrides
from tcprio.service.web_config import WebConfigError, load_web_config
from tests import test_endpoint_load
from tests.test_endpoint import basic
from tests.timing import HANG_GUARD_S

serve = test_endpoint_load.serve  # the shared fixture: an Endpoint on a loopback port
PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()  # cost 4: quick tests


# --- certificates, made with openssl -----------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert, key


def make_signed(folder: Path, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))  # fmt: skip
    extensions = folder / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    san = "subjectAltName=IP:127.0.0.1\n" if server else ""
    extensions.write_text(f"{san}extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "2", "-out", str(cert),
            "-extfile", str(extensions))  # fmt: skip
    return cert, key


@dataclass
class Pki:
    folder: Path
    ca: tuple[Path, Path]
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # a client certificate another CA signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    return Pki(
        folder, ca, make_signed(folder, "server", ca, server=True),
        make_signed(folder, "client", ca, server=False),
        make_signed(folder, "stranger", other_ca, server=False),
    )  # fmt: skip


def write_web_config(folder: Path, text: str, name: str = "web.yml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tls_section(pki: Pki, client_auth: str | None = None, ca: bool = True) -> str:
    text = (f"tls_server_config:\n  cert_file: {pki.server[0]}\n"
            f"  key_file: {pki.server[1]}\n")  # fmt: skip
    if client_auth:
        text += f"  client_auth_type: {client_auth}\n"
    if client_auth and ca:
        text += f"  client_ca_file: {pki.ca[0]}\n"
    return text


# --- serving ----------------------------------------------------------------------------------


def with_web(path: Path) -> DaemonConfig:
    return with_overrides(DaemonConfig(), Overrides(web_config_file=str(path)))


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca[0]))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def request(
    port: int, path: str = "/metrics", headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:  # fmt: skip
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=HANG_GUARD_S,
                                           context=context)  # fmt: skip
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


REFUSED = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, OSError)


def test_tls_with_a_required_client_certificate(serve, pki: Pki, capfd):
    port = serve(
        with_web(write_web_config(pki.folder, tls_section(pki, "RequireAndVerifyClientCert")))
    )
    good = request(port, context=client_context(pki, pki.client))
    assert good.status == 200 and b"tcprio_build_info" in good.body
    with pytest.raises(REFUSED):  # no certificate
        request(port, context=client_context(pki))
    with pytest.raises(REFUSED):  # a certificate another CA signed
        request(port, context=client_context(pki, pki.stranger))
    with pytest.raises(REFUSED):  # plain HTTP on the TLS port
        request(port)
    assert request(port, "/healthz", context=client_context(pki, pki.client)).status == 200
    assert "Traceback" not in capfd.readouterr().err  # each refusal: a debug line at most


def test_a_client_certificate_if_given_must_verify(serve, pki: Pki):
    path = write_web_config(pki.folder, tls_section(pki, "VerifyClientCertIfGiven"))
    port = serve(with_web(path))
    assert request(port, context=client_context(pki)).status == 200  # none given
    assert request(port, context=client_context(pki, pki.client)).status == 200
    with pytest.raises(REFUSED):
        request(port, context=client_context(pki, pki.stranger))


def test_tls13_only_refuses_a_tls12_client(serve, pki: Pki):
    text = tls_section(pki) + "  min_version: TLS13\n"
    port = serve(with_web(write_web_config(pki.folder, text)))
    assert request(port, context=client_context(pki)).status == 200
    old = client_context(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(REFUSED):
        request(port, context=old)


def test_bcrypt_users_with_tls(serve, pki: Pki):
    text = tls_section(pki) + f"basic_auth_users:\n  prom: '{HASH}'\n  other: '{HASH}'\n"
    port = serve(with_web(write_web_config(pki.folder, text)))
    context = client_context(pki)
    assert request(port, headers=basic("prom", PASSWORD), context=context).status == 200
    assert request(port, headers=basic("other", PASSWORD), context=context).status == 200
    for headers in ({}, basic("prom", "wrong"), basic("nobody", PASSWORD), basic("prom", HASH)):
        reply = request(port, headers=headers, context=context)
        assert reply.status == 401 and b"tcprio_" not in reply.body, headers
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="tcprio"'
    assert request(port, "/", context=context).status == 401
    # the probes need no credentials: a kubelet has none, and they say nothing
    assert request(port, "/healthz", context=context).body == b"ok\n"
    assert request(port, "/readyz", context=context).body == b"ready\n"


def test_successful_bcrypt_checks_are_cached_and_failures_are_not(monkeypatch):
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    auth = web_config.Authenticator({"prom": HASH})
    good, bad = basic("prom", PASSWORD)["Authorization"], basic("prom", "x")["Authorization"]
    assert [auth.check(good) for _ in range(5)] == [True] * 5
    assert len(checks) == 1  # one bcrypt for five scrapes
    assert [auth.check(bad) for _ in range(3)] == [False] * 3
    assert len(checks) == 4  # every failure pays
    assert not auth.check(basic("ghost", PASSWORD)["Authorization"])
    assert len(checks) == 5  # an unknown user costs a check too (no user enumeration)
    assert not auth.check(basic("prom", "p" * 100)["Authorization"])  # over bcrypt's 72 bytes


def test_hash_variants_2a_2b_2y_are_accepted():
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    for prefix in ("$2a$", "$2b$", "$2y$"):
        auth = web_config.Authenticator({"u": prefix + hashed[4:]})
        assert auth.check(basic("u", "pw")["Authorization"]), prefix


# --- negotiation, landing page, paths, headers -------------------------------------------------


def test_openmetrics_and_gzip_are_negotiated_as_prometheus_client_does(serve):
    port = serve(DaemonConfig())
    plain = request(port)
    assert plain.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in plain.body and b"process_cpu_seconds_total" in plain.body
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    om = request(port, headers={"Accept": accept})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.body.endswith(b"# EOF\n") and om.body.count(b"# EOF") == 1
    assert b"tcprio_build_info" in om.body
    zipped = request(port, headers={"Accept": accept, "Accept-Encoding": "br, gzip;q=0.8"})
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.body).endswith(b"# EOF\n")
    assert "Content-Encoding" not in request(port, headers={"Accept-Encoding": "br"}).headers


def test_landing_page_and_a_custom_telemetry_path(serve):
    config = with_overrides(DaemonConfig(), Overrides(telemetry_path="/tcprio/metrics"))
    port = serve(config)
    page = request(port, "/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    text = page.body.decode()
    for link in ('href="tcprio/metrics"', 'href="healthz"', 'href="readyz"'):
        assert link in text
    from tcprio import __version__

    assert f"Version {__version__}" in text
    assert request(port, "/tcprio/metrics").status == 200
    missing = request(port, "/metrics")
    assert missing.status == 404 and b"/tcprio/metrics" in missing.body


def test_response_headers_from_the_web_config(serve, tmp_path: Path):
    text = ("http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            "    Strict-Transport-Security: max-age=31536000\n")  # fmt: skip
    port = serve(with_web(write_web_config(tmp_path, text)))
    for path in ("/metrics", "/healthz", "/nowhere"):
        headers = request(port, path).headers
        assert headers["X-Frame-Options"] == "deny", path
        assert headers["Strict-Transport-Security"] == "max-age=31536000", path


def test_an_empty_web_config_file_is_plain_http_without_auth(serve, tmp_path: Path):
    port = serve(with_web(write_web_config(tmp_path, "")))
    assert request(port).status == 200


# --- the file's mistakes: one line each ------------------------------------------------------


def problems_of(folder: Path, text: str) -> list[str]:
    path = write_web_config(folder, text)
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    for line in caught.value.problems:
        assert "\n" not in line and line.startswith(f"{path}: "), line
    return caught.value.problems


def test_a_wrong_bcrypt_hash_is_one_line_naming_the_file_and_the_key(tmp_path: Path):
    (line,) = problems_of(tmp_path, "basic_auth_users:\n  prom: plaintext-secret\n")
    assert "basic_auth_users.prom: the value (16 characters, not shown) is not a bcrypt" in line
    assert "plaintext-secret" not in line  # a password put there by mistake is never logged
    (line,) = problems_of(tmp_path, f"basic_auth_users:\n  prom: '{HASH[:-1]}'\n")
    assert "basic_auth_users.prom:" in line and HASH[:-1] not in line


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("  client_auth_type: Sometimes\n", "client_auth_type: 'Sometimes' is not one of"),
        ("  client_auth_type: RequireAnyClientCert\n", "'RequireAnyClientCert' is not supported"),
        ("  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
        ("  min_version: TLS10\n", "min_version: TLS10 is not supported: TLS12 or TLS13"),
        ("  max_version: SSL3\n", "max_version: 'SSL3' is not TLS12 or TLS13"),
        ("  min_version: TLS13\n  max_version: TLS12\n", "min_version TLS13 is above"),
        ("  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "'TLS_RSA_WITH_RC4_128_SHA' is not sup"),
        ("  curve_preferences: [X25519]\n", "curve_preferences: is not supported"),
        ("  cert: inline\n", "tls_server_config.cert: is not supported: give the certificate"),
        (
            "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: /nonexistent/ca.crt\n",
            "'/nonexistent/ca.crt' is not a readable file",
        ),
        ("  prefer_server_cipher_suites: maybe\n", "'maybe' is not true or false"),
        ("  colour: blue\n", "tls_server_config.colour: unknown key"),
    ],
)
def test_tls_mistakes_are_one_line_each(pki: Pki, tmp_path: Path, section: str, expected: str):
    found = problems_of(tmp_path, tls_section(pki) + section)
    assert len(found) == 1 and expected in found[0], found


def test_a_key_that_does_not_match_the_certificate_is_one_line(pki: Pki, tmp_path: Path):
    text = f"tls_server_config:\n  cert_file: {pki.server[0]}\n  key_file: {pki.client[1]}\n"
    (line,) = problems_of(tmp_path, text)
    assert "tls_server_config:" in line and "not a PEM certificate with its private key" in line


def test_other_mistakes(tmp_path: Path, pki: Pki):
    assert problems_of(tmp_path, "tls_server_config: [1]\n")[0].endswith(
        "tls_server_config: [1] is not a mapping"
    )
    (line,) = problems_of(tmp_path, "http_server_config:\n  headers:\n    X-Powered-By: me\n")
    assert "http_server_config.headers: 'X-Powered-By' is not one of" in line
    (line,) = problems_of(tmp_path, "http_server_config:\n  headers:\n    X-Frame-Options: x\n")
    assert "'x' is not one of deny, sameorigin" in line
    (line,) = problems_of(tmp_path, "basic_auth_users:\n  'a:b': x\n")
    assert "'a:b' is not a user name" in line
    assert "unknown key" in problems_of(tmp_path, "tls_config: {}\n")[0]
    assert "set again at line 2" in problems_of(tmp_path, "basic_auth_users: {}\n"
                                                          "basic_auth_users: {}\n")[0]  # fmt: skip
    text = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
    relative = write_web_config(pki.folder, text, "relative.yml")
    assert load_web_config(relative).tls.cert_file == pki.folder / "server.crt"  # its folder's


def test_the_daemon_configuration_names_the_web_config_and_refuses_mixing(tmp_path: Path):
    web = write_web_config(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n")
    daemon_yaml = tmp_path / "tcprio.yaml"
    daemon_yaml.write_text(f"web:\n  config_file: {web}\n  telemetry_path: /m\n"
                           "log_format: logfmt\n")  # fmt: skip
    config = load_config(daemon_yaml)
    assert config.web is not None and config.web.basic_auth_users[0][0] == "prom"
    assert (config.telemetry_path, config.log_format, config.deprecations) == ("/m", "logfmt", ())
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    daemon_yaml.write_text(
        f"web:\n  config_file: {web}\nbasic_auth:\n  username: u\n  password_file: {password}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(daemon_yaml)
    assert caught.value.problems == [
        f"{daemon_yaml}: basic_auth: cannot go with web.config_file: move it into the web config "
        "file's basic_auth_users"
    ]
    bad = write_web_config(tmp_path, "basic_auth_users:\n  prom: nope\n", "bad.yml")
    daemon_yaml.write_text(f"web:\n  config_file: {bad}\n  telemetry_path: /healthz\n")
    with pytest.raises(ConfigError) as caught:
        load_config(daemon_yaml)
    found = caught.value
    assert len(found.problems) == 2
    assert found.problems[0].startswith(f"{bad}: basic_auth_users.prom: the value")
    assert found.problems[1] == (f"{daemon_yaml}: web.telemetry_path: '/healthz' is not a path "
                                 "like /metrics (not /, /healthz or /readyz)")  # fmt: skip


def test_deprecated_keys_and_flag_each_say_so_once(tmp_path: Path, pki: Pki):
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    daemon_yaml = tmp_path / "tcprio.yaml"
    daemon_yaml.write_text(
        f"listen_address: '127.0.0.1:9999'\ntls:\n  cert_file: {pki.server[0]}\n"
        f"  key_file: {pki.server[1]}\nbasic_auth:\n  username: u\n  password_file: {password}\n"
    )
    config = with_overrides(load_config(daemon_yaml), "127.0.0.1:1234")
    assert [line.split(" is deprecated")[0] for line in config.deprecations] == [
        f"{daemon_yaml}: listen_address", f"{daemon_yaml}: tls", f"{daemon_yaml}: basic_auth",
        "--listen-address",
    ]  # fmt: skip
    assert config.listen_port == 1234 and config.serves_tls
    with pytest.raises(ConfigError, match=r"--web\.config\.file: cannot go with"):
        with_overrides(config, Overrides(web_config_file=str(tmp_path / "x.yml")))
    with pytest.raises(ConfigError, match=r"give --web\.listen-address only"):
        with_overrides(config, Overrides(listen_address="127.0.0.1:1", legacy_listen_address="x"))


def test_legacy_tls_and_plain_password_still_serve(serve, pki: Pki, tmp_path: Path):
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    daemon_yaml = tmp_path / "tcprio.yaml"
    daemon_yaml.write_text(
        f"tls:\n  cert_file: {pki.server[0]}\n  key_file: {pki.server[1]}\n"
        f"basic_auth:\n  username: u\n  password_file: {password}\n"
    )
    port = serve(load_config(daemon_yaml))
    context = client_context(pki)
    assert request(port, headers=basic("u", "s3cret"), context=context).status == 200
    assert request(port, headers=basic("u", "nope"), context=context).status == 401
    assert request(port, "/healthz", context=context).status == 200


def test_a_tls_handshake_left_half_done_does_not_hold_the_endpoint(serve, pki: Pki):
    port = serve(with_web(write_web_config(pki.folder, tls_section(pki))))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) for _ in range(20)]
    try:
        for s in idle[:10]:
            s.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, then nothing
        assert request(port, "/healthz", context=client_context(pki)).status == 200
    finally:
        for s in idle:
            s.close()


def test_beyond_the_thread_limit_tls_probes_and_loopback_scrapes_are_still_served(
    serve, pki: Pki, monkeypatch
):
    """The triage does the TLS handshake itself (non-blocking), answers the probe, and hands a
    loopback scrape, with the head it read, to a reserve thread."""
    from tcprio.service import endpoint as endpoint_module

    monkeypatch.setattr(endpoint_module, "MAX_CONNECTIONS", 2)
    text = tls_section(pki, "RequireAndVerifyClientCert") + f"basic_auth_users:\n  p: '{HASH}'\n"
    port = serve(with_web(write_web_config(pki.folder, text)))
    held = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) for _ in range(2)]
    try:
        context = client_context(pki, pki.client)
        assert request(port, "/healthz", context=context).body == b"ok\n"
        reply = request(port, "/metrics", headers=basic("p", PASSWORD), context=context)
        assert reply.status == 200 and b"tcprio_build_info" in reply.body
        assert reply.headers["Connection"] == "close"  # a reserve thread serves one request
        assert request(port, "/metrics", context=context).status == 401
        with pytest.raises(REFUSED):
            request(port, "/healthz", context=client_context(pki, pki.stranger))
    finally:
        for s in held:
            s.close()
