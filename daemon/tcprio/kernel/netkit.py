"""netkit devices (kernel 6.7+, drivers/net/netkit.c): each end of a pair, its policies and, on
the primary, the programs of both chains.

A netkit pair runs BPF programs in its transmit routine: the peer chain when the peer (usually
in a pod) transmits, before the packet reaches the primary's ingress; the primary chain when the
primary transmits, before the peer's ingress. Both chains are bpf_mprog lists read with
BPF_PROG_QUERY on the PRIMARY's ifindex, in the primary's namespace (the kernel answers EACCES on
the peer). They send no netlink event when programs come and go: the daemon polls the link list.
Read-only.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import replace

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.rtnetlink import Link
from tcprio.model import NetkitChain, NetkitDevice, TcxEntry

# include/uapi/linux/if_link.h, IFLA_NETKIT_*
IFLA_NETKIT_PRIMARY, IFLA_NETKIT_POLICY, IFLA_NETKIT_PEER_POLICY, IFLA_NETKIT_MODE = 2, 3, 4, 5


def _u32(data: dict[int, bytes], attr: int) -> int | None:
    value = data.get(attr)
    return struct.unpack_from("=I", value)[0] if value is not None and len(value) >= 4 else None


def _chain(ifindex: int, chain: NetkitChain) -> tuple[tuple[TcxEntry, ...], str | None]:
    try:
        return bpf_syscalls.netkit_query(ifindex, chain), None
    except bpf_syscalls.BpfError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return (), None  # the device went meanwhile (ENXIO: its index is another device's)
        return (), f"netkit {chain} chain query failed: {exc}"


def read_device(link: Link) -> NetkitDevice:
    """The netkit end `link` is (of the calling thread's namespace), with its chains if it is
    the primary."""
    data = link.info_data or {}
    flag = data.get(IFLA_NETKIT_PRIMARY)
    device = NetkitDevice(
        primary=bool(flag and flag[0]),
        peer_ifindex=link.peer_ifindex or None,
        peer_netnsid=link.peer_netnsid,
        mode=_u32(data, IFLA_NETKIT_MODE),
        policy=_u32(data, IFLA_NETKIT_POLICY),
        peer_policy=_u32(data, IFLA_NETKIT_PEER_POLICY),
    )
    if not device.primary:
        return device
    primary, error_primary = _chain(link.ifindex, NetkitChain.PRIMARY)
    peer, error_peer = _chain(link.ifindex, NetkitChain.PEER)
    errors = "; ".join(e for e in (error_primary, error_peer) if e)
    return replace(device, primary_chain=primary, peer_chain=peer, error=errors or None)
