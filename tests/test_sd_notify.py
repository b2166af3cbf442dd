"""sd_notify client against real AF_UNIX datagram sockets: a path and an abstract name."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tcprio.service import sd_notify
from tests.timing import HANG_GUARD_S


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> str:
        data = self.sock.recv(4096)
        return data.decode()

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.setblocking(True)


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(HANG_GUARD_S)
    return sock


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: sun_path holds 107 bytes, pytest's tmp_path may be longer."""
    folder = Path("/tmp") / f"tcprio-sdn-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


@pytest.fixture
def path_listener(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = str(short_dir / "notify")
    with _bound(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield Listener(sock, path)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"tcprio-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Listener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    found: Listener = request.getfixturevalue(f"{request.param}_listener")
    return found


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (sd_notify.ready, "READY=1"),
        (sd_notify.stopping, "STOPPING=1"),
        (sd_notify.watchdog_ping, "WATCHDOG=1"),
        (lambda: sd_notify.status("scanning 12 namespaces"), "STATUS=scanning 12 namespaces"),
        (lambda: sd_notify.status("two\nlines"), "STATUS=two lines"),
        (lambda: sd_notify.notify("READY=1\nSTATUS=up"), "READY=1\nSTATUS=up"),
    ],
    ids=["ready", "stopping", "watchdog", "status", "status-newline", "raw"],
)
def test_exact_message(listener: Listener, send: Callable[[], bool], expected: str) -> None:
    assert send() is True
    assert listener.receive() == expected
    listener.assert_empty()


def test_reloading_carries_monotonic_usec(listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd_notify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = listener.receive().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_reload_sequence(listener: Listener) -> None:
    """What Type=notify-reload expects on SIGHUP: RELOADING=1 (+ timestamp), then READY=1."""
    assert sd_notify.reloading()
    assert sd_notify.ready()
    assert listener.receive().startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert listener.receive() == "READY=1"


def test_each_call_is_one_datagram(listener: Listener) -> None:
    for _ in range(3):
        assert sd_notify.watchdog_ping()
    assert [listener.receive() for _ in range(3)] == ["WATCHDOG=1"] * 3
    listener.assert_empty()


def test_explicit_environment(path_listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify.notify("READY=1") is False
    assert sd_notify.notify("READY=1", {"NOTIFY_SOCKET": path_listener.env_value}) is True
    assert path_listener.receive() == "READY=1"


def test_socket_address_forms() -> None:
    assert sd_notify.socket_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == (
        "/run/systemd/notify"
    )
    assert sd_notify.socket_address({"NOTIFY_SOCKET": "@abc"}) == "\0abc"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert sd_notify.socket_address({"NOTIFY_SOCKET": unusable}) is None
    assert sd_notify.socket_address({}) is None


@pytest.mark.parametrize(
    "send",
    [
        sd_notify.ready,
        sd_notify.stopping,
        sd_notify.reloading,
        sd_notify.watchdog_ping,
        lambda: sd_notify.status("x"),
    ],
    ids=["ready", "stopping", "reloading", "watchdog", "status"],
)
def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch, send: Callable[[], bool]) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert send() is False


def test_empty_or_unusable_socket_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("", "@", "not/absolute"):
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        assert sd_notify.ready() is False


def test_nobody_listening(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that is gone (systemd restarted, stale variable) is False, not an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "absent"))
    assert sd_notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@tcprio-absent-{uuid.uuid4().hex}")
    assert sd_notify.ready() is False
    # A path that exists but is a closed socket: ECONNREFUSED.
    path = str(short_dir / "closed")
    _bound(path).close()
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify.ready() is False


def test_empty_state_is_not_sent(listener: Listener) -> None:
    assert sd_notify.notify("") is False
    listener.assert_empty()


# --- watchdog ---------------------------------------------------------------------------------


def test_watchdog_absent() -> None:
    assert sd_notify.watchdog_timeout({}) is None
    assert sd_notify.watchdog_interval({}) is None


def test_watchdog_without_pid() -> None:
    env = {"WATCHDOG_USEC": "30000000"}
    assert sd_notify.watchdog_timeout(env) == 30.0
    assert sd_notify.watchdog_interval(env) == 15.0


def test_watchdog_for_this_process() -> None:
    env = {"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}
    assert sd_notify.watchdog_timeout(env) == 1.5
    assert sd_notify.watchdog_interval(env) == 0.75


def test_watchdog_pid_mismatch() -> None:
    """Variables inherited from a watched parent: the watchdog is not ours to ping."""
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sd_notify.watchdog_timeout(env) is None
    assert sd_notify.watchdog_interval(env) is None


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "30s"},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"},
        {"WATCHDOG_PID": str(os.getpid())},
    ],
    ids=["zero", "negative", "unit-suffix", "empty", "pid-not-a-number", "pid-only"],
)
def test_watchdog_malformed(env: dict[str, str]) -> None:
    assert sd_notify.watchdog_interval(env) is None


def test_watchdog_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1" if os.getpid() != 1 else "2")
    assert sd_notify.watchdog_interval() is None
