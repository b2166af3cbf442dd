"""tcx and netkit: the chain of programs on a hook (query) and attaching to it; attaching tracing
programs. Both are bpf_mprog chains: queried and attached the same way, by attach type."""

from __future__ import annotations

import errno

from tcprio.kernel.bpf_syscalls.syscall import (
    BPF_NETKIT_PEER,
    BPF_NETKIT_PRIMARY,
    BPF_TRACE_FEXIT,
    TCX_ATTACH_TYPE,
    BpfCmd,
    BpfError,
    LinkCreateAttr,
    QueryAttr,
    TcxUnsupported,
    address,
    bpf,
    u32,
)
from tcprio.model import Direction, NetkitChain, TcxEntry

NETKIT_ATTACH_TYPE = {NetkitChain.PRIMARY: BPF_NETKIT_PRIMARY, NetkitChain.PEER: BPF_NETKIT_PEER}


def _tcx_query_once(
    ifindex: int, attach_type: int, capacity: int
) -> tuple[QueryAttr, list[tuple[int, int]]]:
    prog_ids = (u32 * capacity)()
    link_ids = (u32 * capacity)()
    attr = QueryAttr(
        target_ifindex=ifindex,
        attach_type=attach_type,
        prog_ids=address(prog_ids) if capacity else 0,
        prog_cnt=capacity,
        link_ids=address(link_ids) if capacity else 0,
    )
    try:
        bpf(BpfCmd.PROG_QUERY, attr)
    except BpfError as exc:
        if exc.errno == errno.EINVAL:
            raise TcxUnsupported(BpfCmd.PROG_QUERY, exc.errno, "no tcx in this kernel") from exc
        if exc.errno != errno.ENOSPC:  # ENOSPC: the chain grew since we sized the arrays
            raise
    entries = list(zip(prog_ids[: attr.prog_cnt], link_ids[: attr.prog_cnt], strict=True))
    return attr, entries


def tcx_query(ifindex: int, direction: Direction) -> tuple[TcxEntry, ...]:
    """The tcx chain of one hook, in execution order. `ifindex` is looked up in the calling
    thread's network namespace: enter the namespace first."""
    return mprog_query(ifindex, TCX_ATTACH_TYPE[direction])


def netkit_query(primary_ifindex: int, chain: NetkitChain) -> tuple[TcxEntry, ...]:
    """One chain of a netkit pair, in execution order, asked on the PRIMARY device's ifindex
    (in the calling thread's namespace; the peer's answers EACCES, another device ENXIO)."""
    return mprog_query(primary_ifindex, NETKIT_ATTACH_TYPE[chain])


def mprog_query(ifindex: int, attach_type: int) -> tuple[TcxEntry, ...]:
    """A bpf_mprog chain (tcx, netkit) by attach type, in execution order."""
    capacity = 0
    for _ in range(5):
        attr, entries = _tcx_query_once(ifindex, attach_type, capacity)
        if attr.prog_cnt <= capacity or attr.prog_cnt == 0:
            return tuple(
                TcxEntry(prog_id=prog_id, position=position, link_id=link_id or None)
                for position, (prog_id, link_id) in enumerate(entries)
            )
        capacity = attr.prog_cnt + 4  # a little room in case more programs arrive meanwhile
    raise BpfError(BpfCmd.PROG_QUERY, errno.EAGAIN, f"tcx chain of ifindex {ifindex} kept growing")


def tcx_attach(prog_fd: int, ifindex: int, direction: Direction) -> int:
    """Append a sched_cls program to a tcx chain; returns the link fd (closing it detaches)."""
    attr = LinkCreateAttr(
        prog_fd=prog_fd, target_ifindex=ifindex, attach_type=TCX_ATTACH_TYPE[direction]
    )
    return bpf(BpfCmd.LINK_CREATE, attr)


def netkit_attach(prog_fd: int, primary_ifindex: int, chain: NetkitChain) -> int:
    """Append a sched_cls program to a netkit chain; returns the link fd (closing it detaches)."""
    attr = LinkCreateAttr(
        prog_fd=prog_fd, target_ifindex=primary_ifindex, attach_type=NETKIT_ATTACH_TYPE[chain]
    )
    return bpf(BpfCmd.LINK_CREATE, attr)


def tracing_attach(prog_fd: int, attach_type: int = BPF_TRACE_FEXIT) -> int:
    """Attach a loaded tracing program where its load aimed it; returns the link fd."""
    return bpf(BpfCmd.LINK_CREATE, LinkCreateAttr(prog_fd=prog_fd, attach_type=attach_type))
