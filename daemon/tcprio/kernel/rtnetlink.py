"""A small, read-only rtnetlink client for the scan's hot path: link, qdisc and filter dumps.

pyroute2 decodes every attribute of every message into objects through an asyncio core: about
5 ms per namespace, most of a node scan. tcprio needs a dozen attributes, so this module asks the
kernel directly over a NETLINK_ROUTE socket and unpacks only those with `struct`. The socket is
created in the calling thread's network namespace and stays bound to it. Writes (the self-test,
the tests, the benchmarks) still go through pyroute2; the tests cross-check both readers and
`tc -j` on the same kernel state.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace

NETLINK_ROUTE = 0
RTM_GETLINK, RTM_NEWLINK = 18, 16
RTM_GETQDISC, RTM_NEWQDISC = 38, 36
RTM_GETTFILTER, RTM_NEWTFILTER = 46, 44
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x2, 0x300, 0x10
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
IFLA_LINK, IFLA_LINK_NETNSID, IFLA_INFO_DATA = 5, 37, 2
IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS = 29, 1 << 3
# IFLA_XDP (include/uapi/linux/if_link.h) and its nested attributes; rtnl_xdp_fill() puts one
# id per mode in use, and IFLA_XDP_PROG_ID too when only one mode is
IFLA_XDP, IFLA_XDP_ATTACHED, IFLA_XDP_PROG_ID = 43, 2, 4
IFLA_XDP_DRV_PROG_ID, IFLA_XDP_SKB_PROG_ID, IFLA_XDP_HW_PROG_ID = 5, 6, 7
XDP_ATTACHED_MODES = {1: "drv", 2: "skb", 3: "hw"}  # XDP_ATTACHED_DRV, _SKB, _HW (4: MULTI)
# in the order a packet meets them: the NIC's, then the driver's or the generic one
XDP_MODE_ATTRS = (("hw", IFLA_XDP_HW_PROG_ID), ("drv", IFLA_XDP_DRV_PROG_ID),
                  ("skb", IFLA_XDP_SKB_PROG_ID))  # fmt: skip
TCA_KIND, TCA_OPTIONS, TCA_CHAIN = 1, 2, 11
TCA_INGRESS_BLOCK, TCA_EGRESS_BLOCK = 13, 14  # a qdisc's shared filter blocks
TCA_BPF_CLASSID, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_TAG, TCA_BPF_ID = 3, 7, 8, 10, 11
TCA_BPF_OPS = 5  # classic BPF: struct sock_filter[] (u16 code, u8 jt, u8 jf, u32 k)
_SOCK_FILTER = struct.Struct("=HBBI")
TCA_BPF_ACT = 1
TCA_U32_LINK, TCA_U32_DIVISOR, TCA_U32_SEL = 3, 4, 5
TC_U32_TERMINAL = 1  # struct tc_u32_sel.flags: a match runs the key's actions
TC_U32_ROOT = 0xFFF00000  # a u32 handle meaning "this instance's root hash table"
TCA_ACT_KIND, TCA_ACT_OPTIONS = 1, 2
TCA_MIRRED_PARMS, TCA_GACT_PARMS, TCA_GACT_PROB = 2, 2, 3
TCA_EGRESS_REDIR, TCA_INGRESS_REDIR = 1, 3  # struct tc_mirred.eaction
TC_ACT_SHOT = 2
NLM_F_ACK = 0x4
RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3  # include/uapi/linux/net_namespace.h

# Per classifier kind: (attribute holding the class id, attribute holding the actions), from
# the kernel's include/uapi/linux/pkt_cls.h.
KIND_ATTRS: dict[str, tuple[int | None, int | None]] = {
    "bpf": (TCA_BPF_CLASSID, TCA_BPF_ACT),
    "u32": (1, 7),
    "flower": (1, 3),
    "matchall": (1, 2),
    "basic": (1, 3),
    "fw": (1, 4),
    "route": (1, 6),
    "cgroup": (None, 1),
}

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_TCMSG = struct.Struct("=BxxxiIII")
_U32 = struct.Struct("=I")
_TC_GEN = struct.Struct("=IIiii")  # index, capab, action (the control verdict), refcnt, bindcnt
_MIRRED_EACTION = struct.Struct("=i")  # after the tc_gen head of struct tc_mirred
_GACT_PROB = struct.Struct("=HHi")  # struct tc_gact_p: ptype, pval, paction
_LINK_ATTRS = frozenset({IFLA_IFNAME, IFLA_LINKINFO, IFLA_XDP})
_PAIR_ATTRS = frozenset({IFLA_LINK, IFLA_LINK_NETNSID})
PAIRED_KINDS = frozenset({"netkit", "veth"})  # links whose other end and kind data tcprio reads
_QDISC_ATTRS = frozenset({TCA_KIND, TCA_INGRESS_BLOCK, TCA_EGRESS_BLOCK})
_FILTER_ATTRS = frozenset({TCA_KIND, TCA_OPTIONS, TCA_CHAIN})
RECV_BUFFER = 1 << 16
MAX_DUMP_RETRIES = 5


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno and strerror set)."""


class DumpInterrupted(NetlinkError):
    """The kernel's state changed during a dump too many times in a row."""


def _align(length: int) -> int:
    return (length + 3) & ~3


def parse_attrs(
    data: bytes | memoryview, offset: int = 0, wanted: frozenset[int] | None = None
) -> dict[int, memoryview]:
    """Netlink attributes from `offset` on: type -> payload (the first of each type).

    With `wanted`, only those types are kept and the walk stops once all are found (a link
    message carries some fifty attributes; tcprio reads two)."""
    view = memoryview(data)
    end = len(view)
    attrs: dict[int, memoryview] = {}
    while offset + 4 <= end:
        length, kind = _NLATTR.unpack_from(view, offset)
        if length < 4 or offset + length > end:
            break  # truncated: keep what was whole
        kind &= NLA_TYPE_MASK
        if (wanted is None or kind in wanted) and kind not in attrs:
            attrs[kind] = view[offset + 4 : offset + length]
            if wanted is not None and len(attrs) == len(wanted):
                break
        offset += (length + 3) & ~3
    return attrs


def attr_list(data: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """All attributes in order (for nested lists such as actions, whose type is an index)."""
    view = memoryview(data)
    found = []
    offset = 0
    while offset + _NLATTR.size <= len(view):
        length, kind = _NLATTR.unpack_from(view, offset)
        if length < _NLATTR.size or offset + length > len(view):
            break
        found.append((kind & NLA_TYPE_MASK, view[offset + _NLATTR.size : offset + length]))
        offset += _align(length)
    return found


def _signed(value: int) -> int:
    """tcm_ifindex is a signed int: TCM_IFINDEX_MAGIC_BLOCK (0xFFFFFFFF) goes out as -1."""
    return value - (1 << 32) if value >= 1 << 31 else value


def as_str(payload: memoryview | None) -> str | None:
    if payload is None:
        return None
    return bytes(payload).split(b"\0", 1)[0].decode(errors="replace")


def as_u32(payload: memoryview | None) -> int | None:
    if payload is None or len(payload) < 4:
        return None
    return _U32.unpack_from(payload)[0]


@dataclass(frozen=True)
class Link:
    ifindex: int
    name: str
    kind: str | None
    # Only for PAIRED_KINDS: the other end's ifindex (IFLA_LINK), its namespace's id as this one
    # numbers it (IFLA_LINK_NETNSID, absent when both ends share the namespace), and the kind's
    # IFLA_INFO_DATA attributes (type -> payload).
    peer_ifindex: int | None = None
    peer_netnsid: int | None = None
    info_data: dict[int, bytes] | None = None
    xdp: tuple[tuple[str, int], ...] = ()  # (mode, program id) of each XDP program, in run order


@dataclass(frozen=True)
class Qdisc:
    ifindex: int
    handle: int
    parent: int
    kind: str | None
    ingress_block: int | None = None  # shared blocks (`ingress_block N egress_block M`)
    egress_block: int | None = None


@dataclass(frozen=True)
class FilterMessage:
    """One RTM_NEWTFILTER message, with the attributes tcprio reads already unpacked."""

    ifindex: int
    handle: int
    parent: int
    info: int  # priority << 16 | protocol (network order)
    kind: str | None
    chain: int | None
    options: dict[int, memoryview] | None

    @property
    def priority(self) -> int:
        return self.info >> 16

    @property
    def protocol(self) -> int:
        return socket.ntohs(self.info & 0xFFFF)


def xdp_programs(payload: memoryview | None) -> tuple[tuple[str, int], ...]:
    """(mode, program id) of the XDP programs an IFLA_XDP attribute names, in run order."""
    if payload is None:
        return ()
    attrs = parse_attrs(payload)
    found = tuple(
        (mode, prog_id)
        for mode, attr in XDP_MODE_ATTRS
        if (prog_id := as_u32(attrs.get(attr)))
    )
    if found:
        return found
    attached = attrs.get(IFLA_XDP_ATTACHED)
    mode = XDP_ATTACHED_MODES.get(attached[0]) if attached is not None and len(attached) else None
    prog_id = as_u32(attrs.get(IFLA_XDP_PROG_ID))
    return ((mode, prog_id),) if mode is not None and prog_id else ()


def _paired_link(
    body: memoryview, ifindex: int, name: str, kind: str | None, data: memoryview | None
) -> Link:
    pair = parse_attrs(body, _IFINFOMSG.size, _PAIR_ATTRS)
    netnsid = pair.get(IFLA_LINK_NETNSID)
    return Link(
        ifindex,
        name,
        kind,
        peer_ifindex=as_u32(pair.get(IFLA_LINK)),
        peer_netnsid=struct.unpack_from("=i", netnsid)[0] if netnsid is not None else None,
        info_data={k: bytes(v) for k, v in parse_attrs(data).items()} if data is not None else {},
    )


class RtnlSocket:
    """A NETLINK_ROUTE socket in the calling thread's current network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, msg_type: int, body: bytes, flags: int = NLM_F_DUMP) -> int:
        self._seq += 1
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, self._seq, 0
        )
        self._sock.send(header + body)
        return self._seq

    def _replies(self, seq: int) -> Iterator[tuple[int, int, memoryview]]:
        """(type, flags, body) of each reply to request `seq`, until NLMSG_DONE."""
        while True:
            data = memoryview(self._sock.recv(RECV_BUFFER))
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise NetlinkError(errno.EBADMSG, "truncated netlink message")
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += _align(length)
                if msg_seq != seq:
                    continue  # an answer to an older request
                if msg_type == NLMSG_DONE:
                    if flags & NLM_F_DUMP_INTR:
                        raise DumpInterrupted(errno.EAGAIN, "dump interrupted")
                    return
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code == 0:
                        return
                    raise NetlinkError(code, os.strerror(code))
                yield msg_type, flags, body

    def dump(self, msg_type: int, body: bytes) -> list[tuple[int, memoryview]]:
        """Every message of a dump; retried when the kernel says the state changed meanwhile."""
        for _ in range(MAX_DUMP_RETRIES):
            seq = self._send(msg_type, body)
            try:
                return [(t, b) for t, _flags, b in self._replies(seq)]
            except DumpInterrupted:
                continue
        raise DumpInterrupted(errno.EAGAIN, f"dump of type {msg_type} kept changing")

    # --- the three dumps tcprio needs ------------------------------------------------------

    def links(self) -> list[Link]:
        ext_mask = _NLATTR.pack(8, IFLA_EXT_MASK) + _U32.pack(RTEXT_FILTER_SKIP_STATS)
        request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + ext_mask
        found = []
        for msg_type, body in self.dump(RTM_GETLINK, request):
            if msg_type != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
                continue
            _family, _type, ifindex, _flags, _change = _IFINFOMSG.unpack_from(body)
            attrs = parse_attrs(body, _IFINFOMSG.size, _LINK_ATTRS)
            info = parse_attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
            kind = as_str(info.get(IFLA_INFO_KIND))
            name = as_str(attrs.get(IFLA_IFNAME)) or f"if{ifindex}"
            if kind in PAIRED_KINDS:
                link = _paired_link(body, ifindex, name, kind, info.get(IFLA_INFO_DATA))
            else:
                link = Link(ifindex, name, kind)
            xdp = xdp_programs(attrs.get(IFLA_XDP))
            found.append(replace(link, xdp=xdp) if xdp else link)
        return found

    def qdiscs(self) -> list[Qdisc]:
        request = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        found = []
        for msg_type, body in self.dump(RTM_GETQDISC, request):
            if msg_type != RTM_NEWQDISC or len(body) < _TCMSG.size:
                continue
            _family, ifindex, handle, parent, _info = _TCMSG.unpack_from(body)
            attrs = parse_attrs(body, _TCMSG.size, _QDISC_ATTRS)
            found.append(
                Qdisc(
                    ifindex,
                    handle,
                    parent,
                    as_str(attrs.get(TCA_KIND)),
                    as_u32(attrs.get(TCA_INGRESS_BLOCK)) or None,
                    as_u32(attrs.get(TCA_EGRESS_BLOCK)) or None,
                )
            )
        return found

    def u32_root(self, ifindex: int, parent: int, chain: int, info: int) -> int | None:
        """The handle of the root hash table of one u32 instance (chain, priority and protocol
        as in `info`), or None when the kernel has no such instance.

        A u32 dump lists every hash table of the qdisc (both directions, every chain) at the
        instance's priority: only what its root reaches is the instance's own."""
        kind = b"u32\0"
        body = (
            _TCMSG.pack(socket.AF_UNSPEC, _signed(ifindex), TC_U32_ROOT, parent, info)
            + _NLATTR.pack(_NLATTR.size + len(kind), TCA_KIND)
            + kind
            + _NLATTR.pack(8, TCA_CHAIN)
            + _U32.pack(chain)
        )
        seq = self._send(RTM_GETTFILTER, body, NLM_F_ACK)
        root = None
        try:
            for msg_type, _flags, reply in self._replies(seq):  # the filter, then the ack
                if msg_type == RTM_NEWTFILTER and len(reply) >= _TCMSG.size:
                    root = _TCMSG.unpack_from(reply)[2]
        except NetlinkError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
                return None
            raise
        return root

    def nsid_of(self, fd: int) -> int | None:
        """The id this socket's namespace gives the namespace `fd` opens (what its links'
        IFLA_LINK_NETNSID say), None when it gave it none. RTM_GETNSID never assigns one."""
        body = struct.pack("=Bxxx", socket.AF_UNSPEC) + _NLATTR.pack(8, NETNSA_FD) + _U32.pack(fd)
        seq = self._send(RTM_GETNSID, body, NLM_F_ACK)
        nsid = None
        for msg_type, _flags, reply in self._replies(seq):  # the id, then the ack
            if msg_type == RTM_NEWNSID and len(reply) >= 4:
                value = parse_attrs(reply, 4).get(NETNSA_NSID)
                if value is not None and len(value) >= 4:
                    nsid = struct.unpack_from("=i", value)[0]
        return nsid if nsid is not None and nsid >= 0 else None

    def filters(self, ifindex: int, parent: int) -> list[FilterMessage]:
        """The filters of one hook, in the kernel's dump order (every chain)."""
        request = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
        found = []
        for msg_type, body in self.dump(RTM_GETTFILTER, request):
            if msg_type != RTM_NEWTFILTER or len(body) < _TCMSG.size:
                continue
            _family, index, handle, msg_parent, info = _TCMSG.unpack_from(body)
            attrs = parse_attrs(body, _TCMSG.size, _FILTER_ATTRS)
            options = attrs.get(TCA_OPTIONS)
            found.append(
                FilterMessage(
                    ifindex=index,
                    handle=handle,
                    parent=msg_parent,
                    info=info,
                    kind=as_str(attrs.get(TCA_KIND)),
                    chain=as_u32(attrs.get(TCA_CHAIN)),
                    options=parse_attrs(options) if options is not None else None,
                )
            )
        return found


def action_kinds(options: dict[int, memoryview], kind: str) -> tuple[str, ...]:
    """Kinds of the actions attached to a filter, in order ("mirred", "gact", ...)."""
    act_attr = KIND_ATTRS.get(kind, (None, None))[1]
    actions = options.get(act_attr) if act_attr is not None else None
    if actions is None:
        return ()
    kinds = []
    for _index, action in sorted(attr_list(actions), key=lambda item: item[0]):
        name = as_str(parse_attrs(action).get(TCA_ACT_KIND))
        if name:
            kinds.append(name)
    return tuple(kinds)


def _action_verdicts(kind: str | None, options: dict[int, memoryview]) -> tuple[int, ...]:
    """What one action can return, from its parameters; () when tcprio does not model it.

    mirred returns its control verdict (`pipe`, `continue`, ... in the tc_gen head of struct
    tc_mirred), a redirect TC_ACT_SHOT too when the device is down or gone; gact its control,
    or the one of its random branch (tc_act_mirred.c / act_gact.c). Other actions may drop a
    packet they fail to edit whatever their control says: not modelled."""
    if kind not in ("mirred", "gact"):
        return ()
    parms = options.get(TCA_MIRRED_PARMS if kind == "mirred" else TCA_GACT_PARMS)
    if parms is None or len(parms) < _TC_GEN.size:
        return ()
    control = _TC_GEN.unpack_from(parms)[2]
    found = [control]
    if kind == "mirred" and len(parms) >= _TC_GEN.size + _MIRRED_EACTION.size:
        eaction = _MIRRED_EACTION.unpack_from(parms, _TC_GEN.size)[0]
        if eaction in (TCA_EGRESS_REDIR, TCA_INGRESS_REDIR):
            found.append(TC_ACT_SHOT)
    prob = options.get(TCA_GACT_PROB) if kind == "gact" else None
    if prob is not None and len(prob) >= _GACT_PROB.size:
        found.append(_GACT_PROB.unpack_from(prob)[2])
    return tuple(dict.fromkeys(found))


def action_controls(options: dict[int, memoryview], kind: str) -> tuple[tuple[int, ...], ...]:
    """Per action attached to a filter, in order: the verdicts it can return (see
    `_action_verdicts`); aligned with `action_kinds`."""
    act_attr = KIND_ATTRS.get(kind, (None, None))[1]
    actions = options.get(act_attr) if act_attr is not None else None
    if actions is None:
        return ()
    found = []
    for _index, action in sorted(attr_list(actions), key=lambda item: item[0]):
        attrs = parse_attrs(action)
        name = as_str(attrs.get(TCA_ACT_KIND))
        if name:
            act_options = attrs.get(TCA_ACT_OPTIONS)
            parsed = parse_attrs(act_options) if act_options is not None else {}
            found.append(_action_verdicts(name, parsed))
    return tuple(found)


def u32_terminal(options: dict[int, memoryview]) -> bool | None:
    """Whether a u32 key runs its actions on a match (TC_U32_TERMINAL in its selector)."""
    selector = options.get(TCA_U32_SEL)
    if selector is None or len(selector) < 1:
        return None
    return bool(selector[0] & TC_U32_TERMINAL)


def classid(options: dict[int, memoryview], kind: str) -> int | None:
    attr = KIND_ATTRS.get(kind, (None, None))[0]
    return as_u32(options.get(attr)) if attr is not None else None


def classic_ops(value: memoryview | None) -> tuple[tuple[int, int, int, int], ...] | None:
    """The instructions of a classic BPF filter (TCA_BPF_OPS), None when there are none."""
    if value is None or len(value) % _SOCK_FILTER.size:
        return None
    return tuple(_SOCK_FILTER.iter_unpack(value))
