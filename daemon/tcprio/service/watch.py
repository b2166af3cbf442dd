"""Kernel event sources for the daemon: tc and link notifications, netns folders, process exits.

Every source is a file descriptor the daemon's loop waits on. A netlink socket opened inside a
namespace keeps that namespace alive, so the daemon must close it as soon as nothing else
holds the namespace: named namespaces are watched with inotify, the others through a pidfd on
a process living in them, with the periodic /proc sweep as a backstop.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tcprio.kernel.namespaces import entered
from tcprio.model import NetNamespace

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_TC = 0x8
RCVBUF = 4 << 20

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER = 44, 45
RTM_NEWCHAIN, RTM_DELCHAIN = 100, 101
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REPLACE = 0x100

_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BBHiIII")
_IFINFOMSG = struct.Struct("=BBHiII")

EVENT_KINDS = {
    RTM_NEWTFILTER: "filter-add",
    RTM_DELTFILTER: "filter-delete",
    RTM_NEWQDISC: "qdisc-add",
    RTM_DELQDISC: "qdisc-delete",
    RTM_NEWCHAIN: "chain-add",
    RTM_DELCHAIN: "chain-delete",
    RTM_NEWLINK: "link-add",
    RTM_DELLINK: "link-delete",
}


@dataclass(frozen=True)
class TcEvent:
    """One notification: what changed, on which interface, hook and priority."""

    kind: str  # a value of EVENT_KINDS, or "overrun" when the kernel dropped notifications
    ifindex: int = 0
    parent: int = 0
    priority: int = 0
    handle: int = 0
    replace: bool = False
    at: float = 0.0  # wall clock when the daemon read it (0: not stamped)


def _tc_event(kind: str, flags: int, body: bytes) -> TcEvent:
    if len(body) < _TCMSG.size:
        return TcEvent(kind)
    _family, _pad1, _pad2, ifindex, handle, parent, info = _TCMSG.unpack_from(body)
    return TcEvent(
        kind,
        ifindex=ifindex,
        parent=parent,
        priority=info >> 16,
        handle=handle,
        replace=bool(flags & NLM_F_REPLACE),
    )


def _link_event(kind: str, body: bytes) -> TcEvent:
    if len(body) < _IFINFOMSG.size:
        return TcEvent(kind)
    return TcEvent(kind, ifindex=_IFINFOMSG.unpack_from(body)[3])


def parse_events(data: bytes) -> list[TcEvent]:
    """Decode a buffer of rtnetlink notifications; unknown message types are skipped."""
    events: list[TcEvent] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        kind = EVENT_KINDS.get(msg_type)
        if kind is not None and kind.startswith("link"):
            events.append(_link_event(kind, body))
        elif kind is not None:
            events.append(_tc_event(kind, flags, body))
        offset += (length + 3) & ~3
    return events


class NamespaceWatch:
    """A netlink socket inside one namespace, subscribed to link and tc notifications."""

    def __init__(self, ns: NetNamespace) -> None:
        self.namespace = ns
        with entered(ns):  # the socket stays bound to the namespace it was created in
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )  # fmt: skip
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, RTMGRP_LINK | RTMGRP_TC))
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[TcEvent]:
        """Every pending notification; an "overrun" event when the kernel had to drop some."""
        events: list[TcEvent] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    events.append(TcEvent("overrun"))
                    continue
                raise
            now = time.time()  # the event's time as tcprio knows it: within the loop's latency
            events.extend(dataclasses.replace(e, at=now) for e in parse_events(data))

    def close(self) -> None:
        self._sock.close()


# --- inotify on the named-namespace folders ---------------------------------------------------

IN_CREATE = 0x100
IN_DELETE = 0x200
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_DELETE_SELF = 0x400
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_INOTIFY_EVENT = struct.Struct("=iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsFolderWatch:
    """inotify on /run/netns and friends: a named namespace appears or goes at once."""

    def __init__(self, folders: Iterable[Path]) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fd = fd
        self._folders = list(folders)
        self.watched: list[Path] = []
        self.refresh()

    def refresh(self) -> None:
        """Watch the folders that exist now (/run/netns only appears with the first name)."""
        mask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
        for folder in dict.fromkeys(Path(os.path.realpath(f)) for f in self._folders):
            if folder in self.watched:
                continue
            if _libc.inotify_add_watch(self._fd, str(folder).encode(), mask) >= 0:
                self.watched.append(folder)

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> int:
        """How many events were pending (their details do not matter: we re-discover)."""
        count = 0
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return count
            offset = 0
            while offset + _INOTIFY_EVENT.size <= len(data):
                _wd, _mask, _cookie, name_len = _INOTIFY_EVENT.unpack_from(data, offset)
                offset += _INOTIFY_EVENT.size + name_len
                count += 1

    def close(self) -> None:
        os.close(self._fd)


class ProcessExitWatch:
    """A pidfd that becomes readable when the process exits (Linux 5.3+)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)
