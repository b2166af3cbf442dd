"""Where a netkit pair's program chains run, as hooks of the scan (pure).

netkit_xmit (drivers/net/netkit.c) runs the chain of the device that transmits, then hands the
packet to the other device's receive path: the peer chain runs before the primary's ingress
hooks (tcx, then clsact), the primary chain before the peer's. Both chains are read on the
primary; the peer usually lives in another namespace (a pod), found here by its ifindex and the
primary's ifindex it points back to. A chain whose peer is not among the scanned namespaces (or
not told apart from another) is not placed on any hook: a note says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tcprio.model import Interface, NamespaceInventory, NetkitChain, TcxEntry

NETKIT_DROP = 2
IngressKey = tuple[tuple[int, int], int]  # (namespace key, ifindex) of an ingress hook


@dataclass(frozen=True)
class PlacedChain:
    """A netkit chain, in execution order, and the primary device it was read on."""

    chain: NetkitChain
    device: str  # the primary's name
    entries: tuple[TcxEntry, ...]

    @property
    def label(self) -> str:
        return f"{self.chain} chain of {self.device}"


@dataclass
class NetkitPlacement:
    before_ingress: dict[IngressKey, PlacedChain] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _is_peer_of(candidate: Interface, primary: Interface, same_namespace: bool) -> bool:
    nk = candidate.netkit
    return (
        nk is not None
        and not nk.primary
        and candidate.ifindex == (primary.netkit.peer_ifindex if primary.netkit else None)
        and nk.peer_ifindex == primary.ifindex
        and (nk.peer_netnsid is None) == same_namespace
    )


def _find_peer(
    inventories: list[NamespaceInventory], home: NamespaceInventory, primary: Interface
) -> list[IngressKey]:
    assert primary.netkit is not None
    same = primary.netkit.peer_netnsid is None
    spaces = [home] if same else [inv for inv in inventories if inv is not home]
    return [
        (inv.namespace.key, i.ifindex)
        for inv in spaces
        for i in inv.interfaces
        if _is_peer_of(i, primary, same)
    ]


def _policy_notes(ns: str, primary: Interface) -> list[str]:
    nk = primary.netkit
    assert nk is not None
    notes = []
    for chain, policy, entries in (
        (NetkitChain.PRIMARY, nk.policy, nk.primary_chain),
        (NetkitChain.PEER, nk.peer_policy, nk.peer_chain),
    ):
        if policy == NETKIT_DROP and not entries:
            sender = "the primary" if chain is NetkitChain.PRIMARY else "its peer"
            notes.append(
                f"{ns}/{primary.name}: netkit default policy blackhole with no program on the "
                f"{chain} chain: every packet {sender} sends is dropped before the other "
                "device's ingress hooks"
            )
    return notes


def _place_primary_chain(
    placement: NetkitPlacement,
    inventories: list[NamespaceInventory],
    home: NamespaceInventory,
    primary: Interface,
) -> None:
    assert primary.netkit is not None
    chain = PlacedChain(NetkitChain.PRIMARY, primary.name, primary.netkit.primary_chain)
    found = _find_peer(inventories, home, primary)
    if len(found) == 1:
        placement.before_ingress[found[0]] = chain
        return
    why = "is not in a scanned namespace" if not found else "could not be told apart"
    placement.notes.append(
        f"{home.namespace.name}/{primary.name}: the netkit primary chain "
        f"({len(chain.entries)} program{'' if len(chain.entries) == 1 else 's'}) runs before "
        "the ingress hooks of its peer "
        f"(ifindex {primary.netkit.peer_ifindex}), which {why}: not checked against them"
    )


def place_chains(inventories: Iterable[NamespaceInventory]) -> NetkitPlacement:
    """The netkit chain that runs before each ingress hook, and notes on what was not placed."""
    inventories = list(inventories)
    placement = NetkitPlacement()
    for home in inventories:
        for interface in home.interfaces:
            nk = interface.netkit
            if nk is None or not nk.primary:
                continue
            placement.notes.extend(_policy_notes(home.namespace.name, interface))
            if nk.peer_chain:
                key = (home.namespace.key, interface.ifindex)
                placement.before_ingress[key] = PlacedChain(
                    NetkitChain.PEER, interface.name, nk.peer_chain
                )
            if nk.primary_chain:
                _place_primary_chain(placement, inventories, home, interface)
    return placement


def chain_program_ids(inventories: Iterable[NamespaceInventory]) -> list[int]:
    """Every program on a netkit chain of the inventories (read on the primaries)."""
    return [
        entry.prog_id
        for inventory in inventories
        for interface in inventory.interfaces
        if interface.netkit is not None
        for entry in (*interface.netkit.primary_chain, *interface.netkit.peer_chain)
    ]
