"""netkit pairs for the tests: created over raw rtnetlink (Debian 12's iproute2 6.1 has no
`type netkit`), the primary in one test namespace and the peer in another.

netkit (kernel >= 6.7, CONFIG_NETKIT) is not built on every kernel: `netkit_unsupported()`
says why a pair cannot be made here, for the skip reason. Nothing here touches the host's
interfaces: every device lives in namespaces of `tests.kernel.netns`.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct

from tests.kernel import TestNetns, netns

RTM_NEWLINK = 16
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLA_F_NESTED = 0x8000
IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
# include/uapi/linux/if_link.h
IFLA_NETKIT_PEER_INFO, IFLA_NETKIT_POLICY, IFLA_NETKIT_PEER_POLICY, IFLA_NETKIT_MODE = 1, 3, 4, 5
NETKIT_NEXT, NETKIT_PASS, NETKIT_DROP, NETKIT_REDIRECT = -1, 0, 2, 7
NETKIT_L2, NETKIT_L3 = 0, 1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _name(ifname: str) -> bytes:
    return _attr(IFLA_IFNAME, ifname.encode() + b"\0")


def _newlink_body(
    primary_if: str, peer_if: str, peer_ns_fd: int, mode: int, policy: int, peer_policy: int
) -> bytes:
    peer_info = _IFINFOMSG.pack(0, 0, 0, 0, 0) + _name(peer_if) + _u32(IFLA_NET_NS_FD, peer_ns_fd)
    data = (
        _attr(IFLA_NETKIT_PEER_INFO, peer_info)
        + _u32(IFLA_NETKIT_MODE, mode)
        + _u32(IFLA_NETKIT_POLICY, policy)
        + _u32(IFLA_NETKIT_PEER_POLICY, peer_policy)
    )
    linkinfo = _attr(IFLA_INFO_KIND, b"netkit\0") + _attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
    return (
        _IFINFOMSG.pack(0, 0, 0, 0, 0)
        + _name(primary_if)
        + _attr(IFLA_LINKINFO | NLA_F_NESTED, linkinfo)
    )


def _request_with_ack(body: bytes) -> None:
    """Send one RTM_NEWLINK from the calling thread's namespace; OSError with the errno."""
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.bind((0, 0))
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWLINK, flags, 1, 0) + body)
        reply = sock.recv(65536)
    _length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
    if msg_type != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink reply type {msg_type}")
    code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
    if code:
        raise OSError(code, os.strerror(code))


def netkit_pair(
    primary: TestNetns,
    primary_if: str,
    peer: TestNetns,
    peer_if: str,
    mode: int = NETKIT_L3,
    policy: int = NETKIT_PASS,
    peer_policy: int = NETKIT_PASS,
) -> None:
    """A netkit pair: `primary_if` in `primary`, `peer_if` in `peer`, both up."""
    peer_fd = os.open(peer.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with primary.entered():
            _request_with_ack(
                _newlink_body(primary_if, peer_if, peer_fd, mode, policy, peer_policy)
            )
    finally:
        os.close(peer_fd)
    primary.ip("link", "set", primary_if, "up")
    peer.ip("link", "set", peer_if, "up")


@functools.cache
def netkit_unsupported() -> str | None:
    """None when this kernel makes netkit pairs, else why not (the tests' skip reason)."""
    try:
        with netns("nkprobe") as a, netns("nkprobe") as b:
            netkit_pair(a, "nkprobe0", b, "nkprobe1")
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
            return (
                f"this kernel ({os.uname().release}) cannot create a netkit device "
                f"(RTM_NEWLINK kind netkit: {os.strerror(exc.errno)}): CONFIG_NETKIT unset or "
                "kernel < 6.7"
            )
        raise
    return None
