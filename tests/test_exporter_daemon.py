"""The real daemon with the exporter flags: `tcprio serve --web.config.file ... --log.format
logfmt`, TLS with a client CA and bcrypt users end to end, the deprecated spellings' one line
each, a client's mistakes as one log line (never a traceback), journald priorities, and a bad
web config file refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcprio.service import logs
from tests.test_daemon import free_port
from tests.test_endpoint import basic
from tests.test_web_config import HASH, PASSWORD, Pki, client_context, pki, request  # noqa: F401
from tests.timing import HANG_GUARD_S, wait_until

QUIET = """\
namespaces:
  include: ["tcpriot-exporter-none-{pid}"]
datadog:
  config_files: []
  scan_processes: false
live_probe: false
"""


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def serve(tmp_path: Path, *flags: str, config: str = "", ready=None) -> Iterator[Served]:
    """`tcprio serve` with `flags` on a free port, until `ready(served)` holds."""
    port = free_port()
    path = tmp_path / "tcprio.yaml"
    path.write_text(QUIET.format(pid=os.getpid()) + config)
    log = tmp_path / "daemon.log"
    argv = [sys.executable, "-m", "tcprio", "serve", "--config", str(path), *flags]
    if "--listen-address" not in flags:
        argv += ["--web.listen-address", f"127.0.0.1:{port}"]
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    served = Served(proc, port, log)

    def up() -> bool:
        assert proc.poll() is None, served.text()
        with contextlib.suppress(OSError):
            return ready(served)
        return False

    try:
        wait_until(up, "the daemon never answered")
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tls_client_ca_and_bcrypt_users_on_the_real_daemon(tmp_path: Path, pki: Pki):  # noqa: F811
    web = tmp_path / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {pki.server[0]}\n  key_file: {pki.server[1]}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca[0]}\n"
        f"basic_auth_users:\n  prom: '{HASH}'\n"
    )
    context = client_context(pki, pki.client)

    def ready(s: Served) -> bool:  # kubelet's probe: a client certificate, no password
        return request(s.port, "/readyz", context=context).status == 200

    flags = ("--web.config.file", str(web), "--log.format", "logfmt", "--log.level", "debug",
             "--web.telemetry-path", "/tcprio")  # fmt: skip
    with serve(tmp_path, *flags, ready=ready) as d:
        reply = request(d.port, "/tcprio", headers=basic("prom", PASSWORD), context=context)
        assert reply.status == 200 and b"tcprio_build_info" in reply.body
        assert request(d.port, "/tcprio", context=context).status == 401
        assert request(d.port, "/", headers=basic("prom", "x"), context=context).status == 401
        with pytest.raises((OSError, ConnectionError)):
            request(d.port, "/healthz", context=client_context(pki, pki.stranger))
        with pytest.raises((OSError, ConnectionError)):
            request(d.port, "/healthz", context=client_context(pki))  # no certificate
        with socket.create_connection(("127.0.0.1", d.port), timeout=HANG_GUARD_S) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP on the TLS port
            with contextlib.suppress(OSError):
                s.recv(1024)

        def logged_errors() -> list[str]:
            return [line for line in d.text().splitlines() if 'msg="client error"' in line]

        wait_until(lambda: len(logged_errors()) >= 3, "the three refused clients logged")
    text = d.text()
    assert "Traceback" not in text
    lines = text.splitlines()
    assert all(line.startswith("ts=") and " level=" in line for line in lines), lines[:3]
    assert any("msg=\"serving metrics\"" in line and "telemetry_path=/tcprio" in line
               and "tls=true" in line for line in lines)  # fmt: skip
    assert "deprecated" not in text


def test_deprecated_spellings_log_one_line_each_and_still_work(tmp_path: Path):
    port = free_port()

    def ready(s: Served) -> bool:
        return request(port, "/readyz").status == 200

    config = "listen_address: '127.0.0.1:1'\nlog_level: info\n"
    with serve(tmp_path, "--listen-address", f"127.0.0.1:{port}", config=config, ready=ready) as d:
        assert request(port, "/metrics").status == 200
        assert request(port, "/").status == 200
    records = [json.loads(line) for line in d.text().splitlines()]
    deprecated = [r["detail"] for r in records if r["msg"] == "deprecated"]
    assert len(deprecated) == 2, deprecated
    assert deprecated[0].endswith("listen_address is deprecated and goes in the next release: "
                                  "use web.listen_address (or --web.listen-address)")  # fmt: skip
    assert deprecated[1] == ("--listen-address is deprecated and goes in the next release: use "
                             "--web.listen-address")  # fmt: skip
    assert all(r["level"] == "warning" for r in records if r["msg"] == "deprecated")


def test_a_bad_web_config_file_stops_the_start_in_one_line(tmp_path: Path):
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  prom: hunter2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tcprio", "serve", "--config", str(tmp_path / "none.yaml"),
         "--web.config.file", str(web)],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 64 and "--config" in proc.stderr  # the --config FILE must exist
    (tmp_path / "none.yaml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "tcprio", "serve", "--config", str(tmp_path / "none.yaml"),
         "--web.config.file", str(web)],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (f"tcprio: {web}: basic_auth_users.prom: the value (7 characters, not "
                           "shown) is not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04..31, 60 "
                           "characters: `htpasswd -nBC 10 USER`)\n")  # fmt: skip
    assert "hunter2" not in proc.stderr


# --- the log's formats ------------------------------------------------------------------------


def logged(log_format: str, level: str = "info", journal: bool = False) -> list[str]:
    """What `Log` writes for a few events, through a real file as stderr."""
    with tempfile.TemporaryFile("w+") as stream:
        info = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"} if journal else {}
        with patched_env(env):
            logger = logs.configure(level, log_format, stream)
        log = logs.Log.__new__(logs.Log)
        log.logger = logger
        log("debug", "hidden below info")
        log("info", "ready", namespaces=3)
        log("warning", "datadog-disappeared", namespace="pod:web/x", detail='a "b"\nFAKE=1')
        log("error", "step failed", error=ValueError("x"), nested={"a": [1, 2]})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("tcprio.http").exception("request failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    logs.configure()  # back to stderr for the other tests
    return lines


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("JOURNAL_STREAM", *values)}
    os.environ.pop("JOURNAL_STREAM", None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_logfmt_is_one_line_per_event_with_the_same_fields():
    lines = logged("logfmt")
    assert len(lines) == 4
    assert lines[0].split(" ", 1)[1] == "level=info msg=ready namespaces=3"
    assert lines[1].endswith('level=warn msg=datadog-disappeared namespace=pod:web/x '
                             'detail="a \\"b\\"\\nFAKE=1"')  # fmt: skip
    assert lines[2].endswith('level=error msg="step failed" error=x nested="{\\"a\\":[1,2]}"')
    assert lines[3].endswith('level=error msg="request failed" error="RuntimeError: boom"')
    assert all(line.startswith("ts=20") and line[26] == "Z" for line in lines)


def test_json_keeps_the_daemons_records():
    records = [json.loads(line) for line in logged("json", "debug")]
    assert [r["msg"] for r in records] == ["hidden below info", "ready", "datadog-disappeared",
                                           "step failed", "request failed"]  # fmt: skip
    assert records[1] == {"ts": records[1]["ts"], "level": "info", "msg": "ready", "namespaces": 3}
    assert records[2]["level"] == "warning" and records[2]["detail"] == 'a "b"\nFAKE=1'


def test_under_systemd_each_line_has_its_journald_priority():
    lines = logged("logfmt", journal=True)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<3>"]
    assert lines[0][3:].startswith("ts=")
    assert logged("json")[0].startswith("{")  # JOURNAL_STREAM names another file: no prefix


def test_journal_stream_of_another_file_is_not_the_journal():
    with patched_env({"JOURNAL_STREAM": "1:1"}):
        assert not logs.under_journal(io.StringIO())
        with tempfile.TemporaryFile("w") as stream:
            assert not logs.under_journal(stream)
