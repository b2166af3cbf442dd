"""A tiny sd_notify(3) client: tell systemd the daemon is ready, reloading, stopping, alive.

No dependency beyond the standard library. Every function is a no-op returning False when the
process does not run under a systemd unit of Type=notify (no $NOTIFY_SOCKET), so the daemon calls
them unconditionally.

Protocol (sd_notify(3)): one datagram of newline-separated VAR=VALUE lines, sent to the
AF_UNIX/SOCK_DGRAM socket named by $NOTIFY_SOCKET: a path, or, when it starts with '@', a name in
the abstract namespace.

Sequence the daemon follows:
- start: ``status("...")`` while setting up, then ``ready()`` once /healthz answers;
- SIGHUP: ``reloading()`` first, reload the config, then ``ready()`` (systemd >= 253's
  Type=notify-reload waits for exactly that pair; with Type=notify it is harmless and shows the
  state in ``systemctl status``);
- SIGTERM: ``stopping()``, then exit;
- while running: ``watchdog_ping()`` every ``watchdog_interval()`` seconds from the main loop, so a
  hung loop stops the pings and systemd restarts the unit.

Abstract-namespace sockets belong to a network namespace: send from a thread that is in the
daemon's own network namespace, never from one that setns()ed into a pod's. systemd's own socket,
/run/systemd/notify, is a path and works from anywhere.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The address $NOTIFY_SOCKET names, in the form socket.sendto() takes; None if unusable.

    '@name' becomes '\\0name' (abstract namespace). Only absolute paths and abstract names are
    accepted: systemd >= 253 may also hand out 'vsock:' addresses, which only VMs receive.
    """
    env = os.environ if environ is None else environ
    value = env.get(NOTIFY_SOCKET, "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (newline-separated VAR=VALUE lines) to systemd.

    True when the datagram was sent; False when not under systemd or when sending failed (the
    daemon must not die because its supervisor is gone).
    """
    address = socket_address(environ)
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def ready() -> bool:
    """READY=1: start-up (or a reload) finished."""
    return notify("READY=1")


def stopping() -> bool:
    """STOPPING=1: shutting down."""
    return notify("STOPPING=1")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock MONOTONIC_USEC= is read against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading() -> bool:
    """RELOADING=1 with MONOTONIC_USEC= (required by systemd >= 253's Type=notify-reload).

    Send ready() once the reload is done.
    """
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")


def status(text: str) -> bool:
    """STATUS=<text>: one line shown by `systemctl status` (newlines would end the field)."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_ping() -> bool:
    """WATCHDOG=1: still alive. Send every watchdog_interval() seconds."""
    return notify("WATCHDOG=1")


def watchdog_timeout(environ: Mapping[str, str] | None = None) -> float | None:
    """The unit's WatchdogSec= in seconds, or None when no watchdog watches this process.

    None also when $WATCHDOG_PID names another process (the variables were inherited from a
    parent that systemd watches, not from systemd for us), or the values are malformed.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get(WATCHDOG_USEC)
    if not usec_text:
        return None
    pid_text = env.get(WATCHDOG_PID)
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two watchdog_ping() calls: half the timeout, as sd_watchdog_enabled(3)
    recommends, so one late ping does not kill the daemon. None when there is no watchdog."""
    timeout = watchdog_timeout(environ)
    return None if timeout is None else timeout / 2
