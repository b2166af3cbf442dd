"""The reference reader for the tests: tcprio's earlier tc inventory, through pyroute2.

tcprio's own reader (daemon/tcprio/kernel/rtnetlink.py) unpacks netlink by hand for speed; the tests
read the same kernel state with this pyroute2-based one and compare. Netlink goes through
pyroute2. pyroute2 0.9.7 does not decode a few attributes tcprio needs
(TCA_CHAIN, and cls_bpf's TCA_BPF_ID, TCA_BPF_TAG, TCA_BPF_FLAGS_GEN), so the message classes
below extend its tables. Everything here is read-only.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import rtnl
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf, tcmsg

from tcprio.kernel.namespaces import NamespaceGone, entered
from tcprio.kernel.tc_inventory import _read_tcx  # tcx is not netlink: the same code for both
from tcprio.model import (
    Direction,
    HookInventory,
    Interface,
    NamespaceInventory,
    NetNamespace,
    TcFilter,
)

TC_H_CLSACT = 0xFFFFFFF1  # also TC_H_INGRESS: the parent of both clsact and ingress qdiscs
PARENT_BY_DIRECTION = {Direction.INGRESS: 0xFFFFFFF2, Direction.EGRESS: 0xFFFFFFF3}
TCA_BPF_FLAG_ACT_DIRECT = 1

# pyroute2 caches a compiled attribute table per class under this mangled name; a subclass with
# a longer nla_map must reset it, or it silently keeps using its parent's table.
_COMPILED_FLAG = "_nlmsg_base__compiled_nla"


class _BpfOptions(sched_bpf.options):
    nla_map = (
        *sched_bpf.options.nla_map,
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )


class _TcMsg(tcmsg):
    nla_map = (
        *tcmsg.nla_map,
        ("TCA_PAD", "hex"),
        ("TCA_DUMP_INVISIBLE", "flag"),
        ("TCA_CHAIN", "uint32"),
        ("TCA_HW_OFFLOAD", "uint8"),
        ("TCA_INGRESS_BLOCK", "uint32"),
        ("TCA_EGRESS_BLOCK", "uint32"),
    )

    @staticmethod
    def get_options(self: Any, *argv: Any, **kwarg: Any) -> Any:
        if self.get_attr("TCA_KIND") == "bpf":
            return _BpfOptions
        return tcmsg.get_options(self, *argv, **kwarg)


setattr(_BpfOptions, _COMPILED_FLAG, False)
setattr(_TcMsg, _COMPILED_FLAG, False)


class ReadError(Exception):
    """Reading a namespace's tc state failed for a reason other than it vanishing."""


@contextlib.contextmanager
def rtnl_socket() -> Iterator[IPRoute]:
    """A pyroute2 socket in the calling thread's namespace, decoding the extra tc attributes."""
    ipr = IPRoute()
    try:
        ipr.marshal.msg_map = {
            **ipr.marshal.msg_map,
            rtnl.RTM_NEWTFILTER: _TcMsg,
            rtnl.RTM_NEWQDISC: _TcMsg,
        }
        yield ipr
    finally:
        ipr.close()


def _hex_tag(raw: str | None) -> str | None:
    return raw.replace(":", "").lower() if raw else None


def _action_kinds(options: Any) -> tuple[str, ...]:
    """Kinds of the actions attached to a filter (any *_ACT attribute of its options)."""
    kinds: list[str] = []
    for name, value in options.get("attrs", []):
        if not name.endswith("_ACT") or not hasattr(value, "get"):
            continue
        for _prio, action in value.get("attrs", []):
            kind = action.get_attr("TCA_ACT_KIND") if hasattr(action, "get_attr") else None
            if kind:
                kinds.append(kind)
    return tuple(kinds)


def _action_verdicts(kind: str, options: Any) -> tuple[int, ...]:
    """What one action can return (see tcprio.kernel.rtnetlink._action_verdicts)."""
    if kind not in ("mirred", "gact") or not hasattr(options, "get_attr"):
        return ()
    parms = options.get_attr("TCA_MIRRED_PARMS" if kind == "mirred" else "TCA_GACT_PARMS")
    if not parms:
        return ()
    found = [parms["action"]]
    if kind == "mirred" and parms.get("eaction") in (1, 3):  # a redirect: SHOT on failure
        found.append(2)
    prob = options.get_attr("TCA_GACT_PROB") if kind == "gact" else None
    if prob:
        found.append(prob["paction"])
    return tuple(dict.fromkeys(found))


def _action_controls(options: Any) -> tuple[tuple[int, ...], ...]:
    controls: list[tuple[int, ...]] = []
    for name, value in options.get("attrs", []):
        if not name.endswith("_ACT") or not hasattr(value, "get"):
            continue
        for _prio, action in value.get("attrs", []):
            kind = action.get_attr("TCA_ACT_KIND") if hasattr(action, "get_attr") else None
            if kind:
                controls.append(_action_verdicts(kind, action.get_attr("TCA_ACT_OPTIONS")))
    return tuple(controls)


def _u32_fields(options: Any) -> dict[str, Any]:
    selector = options.get_attr("TCA_U32_SEL")
    link = options.get_attr("TCA_U32_LINK")  # pyroute2 shows it as hex bytes, little endian
    return {
        "u32_terminal": bool(selector["flags"] & 1) if selector else None,
        "u32_link": int.from_bytes(bytes.fromhex(link.replace(":", "")), "little")
        if link
        else None,
    }


def _is_filter_entry(kind: str, handle: int, options: Any) -> bool:
    """Dumps also list each classifier instance (handle 0, no options) and u32 hash tables."""
    if options is None or not hasattr(options, "get_attr"):
        return handle != 0
    return not (kind == "u32" and options.get_attr("TCA_U32_DIVISOR") is not None)


def filter_from_message(msg: Any, position: int) -> TcFilter | None:
    kind = msg.get_attr("TCA_KIND") or "?"
    handle = msg["handle"]
    options = msg.get_attr("TCA_OPTIONS")
    if not _is_filter_entry(kind, handle, options):
        return None
    info = msg["info"]
    common = {
        "kind": kind,
        "chain": msg.get_attr("TCA_CHAIN") or 0,
        "priority": info >> 16,
        "handle": handle,
        "protocol": socket.ntohs(info & 0xFFFF),
        "position": position,
    }
    if kind != "bpf" or not hasattr(options, "get_attr"):
        classid = options.get_attr("TCA_U32_CLASSID") if hasattr(options, "get_attr") else None
        actions = _action_kinds(options) if hasattr(options, "get") else ()
        controls = _action_controls(options) if hasattr(options, "get") else ()
        extra = _u32_fields(options) if kind == "u32" and hasattr(options, "get_attr") else {}
        return TcFilter(
            **common, classid=classid, actions=actions, action_controls=controls, **extra
        )
    flags = options.get_attr("TCA_BPF_FLAGS") or 0
    return TcFilter(
        **common,
        direct_action=bool(flags & TCA_BPF_FLAG_ACT_DIRECT),
        name=options.get_attr("TCA_BPF_NAME"),
        prog_id=options.get_attr("TCA_BPF_ID"),
        tag=_hex_tag(options.get_attr("TCA_BPF_TAG")),
        classid=options.get_attr("TCA_BPF_CLASSID"),
        actions=_action_kinds(options),
        action_controls=_action_controls(options),
    )


def filters_from_messages(messages: Iterable[Any]) -> tuple[TcFilter, ...]:
    filters: list[TcFilter] = []
    for msg in messages:
        parsed = filter_from_message(msg, len(filters))
        if parsed is not None:
            filters.append(parsed)
    return tuple(filters)


def _hook_qdiscs(ipr: IPRoute) -> dict[int, tuple[str, dict[Direction, int | None]]]:
    """ifindex -> ("clsact" or "ingress", its shared blocks), for every interface with one."""
    found: dict[int, tuple[str, dict[Direction, int | None]]] = {}
    for msg in ipr.get_qdiscs():
        kind = msg.get_attr("TCA_KIND")
        if msg["parent"] == TC_H_CLSACT and kind in ("clsact", "ingress"):
            blocks = {
                Direction.INGRESS: msg.get_attr("TCA_INGRESS_BLOCK") or None,
                Direction.EGRESS: msg.get_attr("TCA_EGRESS_BLOCK") or None,
            }
            found[msg["index"]] = (kind, blocks)
    return found


def _read_hook(
    ipr: IPRoute,
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
            messages = ipr.get_filters(index=ifindex, parent=PARENT_BY_DIRECTION[direction])
            filters = filters_from_messages(messages)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                error = f"filter dump failed: {exc}"
    return HookInventory(
        direction=direction,
        qdisc=hook_qdisc,
        filters=filters,
        tcx=tcx,
        error=error,
        block=block if hook_qdisc is not None else None,
    )


def _links(ipr: IPRoute) -> list[tuple[int, str, str | None, dict[str, Any]]]:
    """(ifindex, name, kind, a veth's peer fields) of every link."""
    links = []
    for msg in ipr.get_links():
        kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        peer = {}
        if kind == "veth":
            peer = {
                "peer_ifindex": msg.get_attr("IFLA_LINK") or None,
                "peer_netnsid": msg.get_attr("IFLA_LINK_NETNSID"),
            }
        name = msg.get_attr("IFLA_IFNAME") or f"if{msg['index']}"
        links.append((msg["index"], name, kind, peer))
    return links


def read_current_namespace(ns: NetNamespace) -> NamespaceInventory:
    """The tc inventory of the namespace the calling thread is in (labelled as `ns`)."""
    with rtnl_socket() as ipr:
        qdiscs = _hook_qdiscs(ipr)
        interfaces = []
        for ifindex, ifname, kind, peer in _links(ipr):
            qdisc, blocks = qdiscs.get(ifindex, (None, {}))
            hooks = tuple(
                _read_hook(ipr, ifindex, qdisc, direction, blocks.get(direction))
                for direction in Direction
            )
            interfaces.append(
                Interface(ifindex=ifindex, name=ifname, kind=kind, hooks=hooks, **peer)
            )
    return NamespaceInventory(namespace=ns, interfaces=tuple(interfaces))


def read_namespace(ns: NetNamespace) -> NamespaceInventory | None:
    """The tc inventory of `ns`, or None when the namespace vanished before or while reading."""
    try:
        with entered(ns):
            return read_current_namespace(ns)
    except NamespaceGone:
        return None
    except (NetlinkError, OSError) as exc:
        if isinstance(exc, NetlinkError) and exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        return NamespaceInventory(namespace=ns, interfaces=(), error=f"{type(exc).__name__}: {exc}")
