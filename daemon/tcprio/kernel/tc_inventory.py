"""Read the tc state of one network namespace: clsact / ingress qdiscs, their filters, tcx links,
netkit devices and their chains (`kernel/netkit.py`).

Netlink goes through `rtnetlink` (a socket opened in the namespace, three kinds of dump);
tcx and netkit through `bpf_syscalls`. Everything here is read-only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace

from tcprio.kernel import bpf_syscalls, netkit, rtnetlink
from tcprio.kernel.namespaces import NamespaceGone, entered, open_namespace
from tcprio.kernel.rtnetlink import FilterMessage, NetlinkError, RtnlSocket
from tcprio.model import (
    Direction,
    HookInventory,
    Interface,
    NamespaceInventory,
    NetNamespace,
    TcFilter,
    TcxEntry,
    XdpProgram,
)

TC_H_CLSACT = 0xFFFFFFF1  # also TC_H_INGRESS: the parent of both clsact and ingress qdiscs
PARENT_BY_DIRECTION = {Direction.INGRESS: 0xFFFFFFF2, Direction.EGRESS: 0xFFFFFFF3}
TCA_BPF_FLAG_ACT_DIRECT = 1


class ReadError(Exception):
    """Reading a namespace's tc state failed for a reason other than it vanishing."""


def _is_filter_entry(msg: FilterMessage) -> bool:
    """Dumps also list each classifier instance (handle 0, no options) and u32 hash tables."""
    if msg.options is None:
        return msg.handle != 0
    return not (msg.kind == "u32" and rtnetlink.TCA_U32_DIVISOR in msg.options)


def filter_from_message(msg: FilterMessage, position: int) -> TcFilter | None:
    if not _is_filter_entry(msg):
        return None
    kind = msg.kind or "?"
    options = msg.options or {}
    common = {
        "kind": kind,
        "chain": msg.chain or 0,
        "priority": msg.priority,
        "handle": msg.handle,
        "protocol": msg.protocol,
        "position": position,
        "classid": rtnetlink.classid(options, kind),
        "actions": rtnetlink.action_kinds(options, kind),
        "action_controls": rtnetlink.action_controls(options, kind),
    }
    if kind == "u32" and msg.options is not None:
        link = rtnetlink.as_u32(options.get(rtnetlink.TCA_U32_LINK))
        return TcFilter(**common, u32_terminal=rtnetlink.u32_terminal(options), u32_link=link)
    if kind != "bpf" or msg.options is None:
        return TcFilter(**common)
    flags = rtnetlink.as_u32(options.get(rtnetlink.TCA_BPF_FLAGS)) or 0
    tag = options.get(rtnetlink.TCA_BPF_TAG)
    return TcFilter(
        **common,
        direct_action=bool(flags & TCA_BPF_FLAG_ACT_DIRECT),
        name=rtnetlink.as_str(options.get(rtnetlink.TCA_BPF_NAME)),
        prog_id=rtnetlink.as_u32(options.get(rtnetlink.TCA_BPF_ID)),
        tag=bytes(tag).hex() if tag is not None else None,
        classic_ops=rtnetlink.classic_ops(options.get(rtnetlink.TCA_BPF_OPS)),
    )


def filters_from_messages(messages: Iterable[FilterMessage]) -> tuple[TcFilter, ...]:
    filters: list[TcFilter] = []
    for msg in messages:
        parsed = filter_from_message(msg, len(filters))
        if parsed is not None:
            filters.append(parsed)
    return tuple(filters)


def _hook_qdiscs(rtnl: RtnlSocket) -> dict[int, rtnetlink.Qdisc]:
    """ifindex -> its clsact or ingress qdisc, for every interface that has one of them."""
    return {
        q.ifindex: q
        for q in rtnl.qdiscs()
        if q.parent == TC_H_CLSACT and q.kind in ("clsact", "ingress")
    }


def _block(qdisc: rtnetlink.Qdisc | None, direction: Direction) -> int | None:
    if qdisc is None:
        return None
    return qdisc.ingress_block if direction is Direction.INGRESS else qdisc.egress_block


U32_HTID_MASK = 0xFFF00000


def _u32_reachable(messages: list[FilterMessage], root: int) -> set[int]:
    """The hash tables (htid) a u32 instance's root reaches through the `link`s of its keys."""
    tables, pending = set(), [root & U32_HTID_MASK]
    while pending:
        table = pending.pop()
        if table in tables:
            continue
        tables.add(table)
        for msg in messages:
            link = rtnetlink.as_u32((msg.options or {}).get(rtnetlink.TCA_U32_LINK))
            if link and msg.handle & U32_HTID_MASK == table:
                pending.append(link & U32_HTID_MASK)
    return tables


def _own_u32_entries(
    rtnl: RtnlSocket, ifindex: int, parent: int, messages: list[FilterMessage]
) -> list[FilterMessage]:
    """The dump without the u32 keys another instance owns.

    u32 hash tables belong to the qdisc (or the shared block), not to one instance: the dump of
    each u32 instance lists every table at its priority, the other direction's and other
    chains' included. A key is the instance's own when its root table reaches the key's."""
    groups: dict[tuple[int, int], list[FilterMessage]] = {}
    for msg in messages:
        if msg.kind == "u32" and msg.options is not None:
            groups.setdefault((msg.chain or 0, msg.info), []).append(msg)
    foreign: set[int] = set()
    for (chain, info), group in groups.items():
        root = rtnl.u32_root(ifindex, parent, chain, info)
        if root is None:
            continue  # the instance went meanwhile: keep what the dump showed
        tables = _u32_reachable(group, root)
        foreign.update(id(m) for m in group if m.handle & U32_HTID_MASK not in tables)
    return [m for m in messages if id(m) not in foreign]


def _read_tcx(ifindex: int, direction: Direction) -> tuple[tuple[TcxEntry, ...], str | None]:
    try:
        return bpf_syscalls.tcx_query(ifindex, direction), None
    except bpf_syscalls.TcxUnsupported:
        return (), None
    except bpf_syscalls.BpfError as exc:
        if exc.errno == errno.ENODEV:
            return (), None
        return (), f"tcx query failed: {exc}"


TCM_IFINDEX_MAGIC_BLOCK = 0xFFFFFFFF  # tcm_ifindex naming a shared block (its index in parent)


def _read_filters(
    rtnl: RtnlSocket, ifindex: int, direction: Direction, block: int | None
) -> tuple[TcFilter, ...]:
    parent = PARENT_BY_DIRECTION[direction]
    messages = rtnl.filters(ifindex, parent)
    if any(m.kind == "u32" for m in messages):
        # A shared block answers requests other than dumps by its index only.
        target = (TCM_IFINDEX_MAGIC_BLOCK, block) if block else (ifindex, parent)
        messages = _own_u32_entries(rtnl, *target, messages)
    return filters_from_messages(messages)


def _read_hook(
    rtnl: RtnlSocket,
    ifindex: int,
    qdisc: str | None,
    direction: Direction,
    block: int | None = None,
) -> HookInventory:
    hook_qdisc = qdisc if (qdisc == "clsact" or direction is Direction.INGRESS) else None
    tcx, error = _read_tcx(ifindex, direction)
    filters: tuple[TcFilter, ...] = ()
    if hook_qdisc is not None:
        try:
            filters = _read_filters(rtnl, ifindex, direction, block)
        except NetlinkError as exc:
            if exc.errno != errno.ENODEV:
                error = f"filter dump failed: {exc}"
    return HookInventory(
        direction=direction,
        qdisc=hook_qdisc,
        filters=filters,
        tcx=tcx,
        error=error,
        block=block if hook_qdisc is not None else None,
    )


def _with_peer(interface: Interface, link: rtnetlink.Link) -> Interface:
    """A veth with its other end (a pod's, seen from the host)."""
    if link.kind != "veth":
        return interface
    return replace(
        interface, peer_ifindex=link.peer_ifindex or None, peer_netnsid=link.peer_netnsid
    )


def read_current_namespace(ns: NetNamespace) -> NamespaceInventory:
    """The tc inventory of the namespace the calling thread is in (labelled as `ns`)."""
    with RtnlSocket() as rtnl:
        qdiscs = _hook_qdiscs(rtnl)
        interfaces = []
        for link in rtnl.links():
            qdisc = qdiscs.get(link.ifindex)
            kind = qdisc.kind if qdisc is not None else None
            hooks = tuple(
                _read_hook(rtnl, link.ifindex, kind, direction, _block(qdisc, direction))
                for direction in Direction
            )
            device = netkit.read_device(link) if link.kind == "netkit" else None
            xdp = tuple(XdpProgram(prog_id, mode, n) for n, (mode, prog_id) in enumerate(link.xdp))
            interface = Interface(
                link.ifindex, link.name, hooks, kind=link.kind, netkit=device, xdp=xdp
            )
            interfaces.append(_with_peer(interface, link))
    return NamespaceInventory(namespace=ns, interfaces=tuple(interfaces))


def read_namespace(ns: NetNamespace) -> NamespaceInventory | None:
    """The tc inventory of `ns`, or None when the namespace vanished before or while reading."""
    try:
        with entered(ns):
            return read_current_namespace(ns)
    except NamespaceGone:
        return None
    except OSError as exc:
        if isinstance(exc, NetlinkError) and exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        return NamespaceInventory(namespace=ns, interfaces=(), error=f"{type(exc).__name__}: {exc}")


def peer_namespaces(home: NetNamespace, others: Iterable[NetNamespace]) -> dict[int, NetNamespace]:
    """netnsid -> namespace, as `home` numbers the namespaces (its veths' IFLA_LINK_NETNSID):
    each of `others` is asked by fd (RTM_GETNSID, which assigns nothing). Namespaces gone
    meanwhile, or without an id in `home`, are left out."""
    found: dict[int, NetNamespace] = {}
    try:
        with entered(home), RtnlSocket() as rtnl:
            for ns in others:
                nsid = _nsid(rtnl, ns)
                if nsid is not None:
                    found.setdefault(nsid, ns)
    except (NamespaceGone, OSError):
        return found
    return found


def _nsid(rtnl: RtnlSocket, ns: NetNamespace) -> int | None:
    try:
        fd = open_namespace(ns)
    except (NamespaceGone, OSError):
        return None
    try:
        return rtnl.nsid_of(fd)
    except NetlinkError:
        return None
    finally:
        os.close(fd)


Targets = Mapping[int, set[Direction]]  # ifindex -> the hooks to read again


def _interface_qdisc(interface: Interface) -> str | None:
    """The interface's clsact / ingress qdisc kind, as its ingress hook recorded it."""
    return next((h.qdisc for h in interface.hooks if h.direction is Direction.INGRESS), None)


def _refreshed(rtnl: RtnlSocket, interface: Interface, directions: set[Direction]) -> Interface:
    qdisc = _interface_qdisc(interface)
    hooks = tuple(
        _read_hook(rtnl, interface.ifindex, qdisc, h.direction, h.block)
        if h.direction in directions
        else h
        for h in interface.hooks
    )
    return replace(interface, hooks=hooks)


def refresh_hooks(old: NamespaceInventory, targets: Targets) -> NamespaceInventory | None:
    """`old` with only the hooks in `targets` read again (filter churn on a busy namespace).

    The qdiscs and the interface list are taken from `old`: the caller reads the whole
    namespace again when a link, a qdisc or an unknown interface changed. None when the
    namespace vanished.
    """
    try:
        with entered(old.namespace), RtnlSocket() as rtnl:
            interfaces = tuple(
                _refreshed(rtnl, i, targets[i.ifindex]) if i.ifindex in targets else i
                for i in old.interfaces
            )
    except NamespaceGone:
        return None
    return replace(old, interfaces=interfaces)
