"""tcx, netkit and XDP links, as the daemon tracks them: they send no netlink event, so the
daemon polls the kernel's link list and reads again the hooks a tcx link appeared on or went
from, the namespaces whose netkit chains a netkit link joined or left, and those where an XDP
link's device may be.

A mixin of the daemon (`service/daemon.py`), which provides `inventories`, `watched`,
`link_ids`, `tcx_links`, `tcx_rechecks`, `netkit_links`, `xdp_links`, `xdp_rechecks`,
`xdp_unlinked`, `log` and `_mark_dirty`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import NamespaceGone, entered
from tcprio.kernel.tc_inventory import PARENT_BY_DIRECTION
from tcprio.model import Direction, NamespaceInventory
from tcprio.service.watch import TcEvent

NsKey = tuple[int, int]
TCX_RECHECK_S = 1.0  # a tcx link change: hooks read again until they show it, this long
NETKIT_RECHECK_S = 1.0  # a new netkit link: namespaces read again until one shows it, this long
XDP_RECHECK_S = 1.0  # an XDP link change: namespaces read again until they agree, this long
DIRECTION_BY_PARENT = {0xFFFFFFF2: "ingress", 0xFFFFFFF3: "egress", 0xFFFF0000: "ingress"}
TCX_PARENT = {bpf_syscalls.BPF_TCX_INGRESS: 0xFFFFFFF2, bpf_syscalls.BPF_TCX_EGRESS: 0xFFFFFFF3}


class TcxLinks:
    inventories: dict[NsKey, NamespaceInventory]
    watched: dict
    link_ids: frozenset[int]
    tcx_links: dict[int, tuple[int, int]]  # link id -> (ifindex, parent)
    # link id -> (ifindex, parent, until): hooks to check again against the link list
    tcx_rechecks: dict[int, tuple[int, int, float]]
    netkit_links: dict[int, float]  # netkit link id -> until when to look for it
    xdp_links: dict[int, tuple[int, int]]  # XDP link id -> (ifindex, program id)
    # XDP link id -> (ifindex, program id, whether it should show, until when to look)
    xdp_rechecks: dict[int, tuple[int, int, bool, float]]
    # (namespace, ifindex, program id) of XDP programs shown without a link and read again once
    xdp_unlinked: set[tuple[NsKey, int, int]]
    log: Callable[..., None]
    _mark_dirty: Callable[[NsKey], None]

    def _mark_tcx_shown_but_gone(self, links: frozenset[int]) -> None:
        """A link attached and closed between two polls never shows in the list's diff: read
        again every hook that still shows a link the list no longer has."""
        for key, inventory in self.inventories.items():
            if key not in self.watched:
                continue
            events = [
                TcEvent("tcx-change", ifindex=interface.ifindex,
                        parent=PARENT_BY_DIRECTION[hook.direction])
                for interface in inventory.interfaces
                for hook in interface.hooks
                if any(t.link_id is not None and t.link_id not in links for t in hook.tcx)
            ]  # fmt: skip
            if events:
                self.watched[key].pending.extend(events)
                self._mark_dirty(key)

    def _shows_link(self, link: int) -> bool:
        return any(
            t.link_id == link
            for inventory in self.inventories.values()
            for interface in inventory.interfaces
            for hook in interface.hooks
            for t in hook.tcx
        )

    def _recheck_tcx(self, changed: list[tuple[int, int, int]]) -> None:
        """The kernel frees a tcx link's id before it detaches the program, and gives a new link
        its id before it attaches it (a synchronize_rcu apart, long under load): a hook read in
        between still shows the old chain. Read such hooks again until they agree with the
        link list, for TCX_RECHECK_S at most."""
        now = time.monotonic()
        for link, ifindex, parent in changed:
            self.tcx_rechecks[link] = (ifindex, parent, now + TCX_RECHECK_S)
        fresh = {link for link, _, _ in changed}
        stale = []
        for link, (ifindex, parent, until) in list(self.tcx_rechecks.items()):
            if link in fresh:
                continue
            if now > until or self._shows_link(link) == (link in self.link_ids):
                del self.tcx_rechecks[link]
            else:
                stale.append((link, ifindex, parent))
        if stale:
            self.log("debug", "tcx hooks read again", links=[s[0] for s in stale])
            self._mark_tcx_hooks(stale)

    def _tcx_hooks_changed(self, links: frozenset[int]) -> list[tuple[int, int, int]]:
        """(link id, ifindex, parent) of the tcx links that appeared or went."""
        changed = [(link, *self.tcx_links.pop(link)) for link in self.link_ids - links
                   if link in self.tcx_links]  # fmt: skip
        for link in links - self.link_ids:
            try:
                info = bpf_syscalls.link_info(link)
            except OSError:
                continue
            if info.type == bpf_syscalls.BPF_LINK_TYPE_NETKIT:
                self.netkit_links[link] = time.monotonic() + NETKIT_RECHECK_S
                continue
            if info.type == bpf_syscalls.BPF_LINK_TYPE_XDP and info.ifindex:
                self.xdp_links[link] = (info.ifindex, info.prog_id)
                until = time.monotonic() + XDP_RECHECK_S
                self.xdp_rechecks[link] = (info.ifindex, info.prog_id, True, until)
                continue
            parent = TCX_PARENT.get(info.attach_type or 0)
            if info.type == bpf_syscalls.BPF_LINK_TYPE_TCX and info.ifindex and parent:
                self.tcx_links[link] = (info.ifindex, parent)
                changed.append((link, info.ifindex, parent))
        return changed

    def _mark_netkit_namespaces(self, links: frozenset[int]) -> None:
        """A netkit link names the device of its chain by index only, and the peer's may live
        in another namespace: read again the namespace that shows a link the list no longer
        has, and, while a new link shows nowhere (NETKIT_RECHECK_S at most), every namespace
        holding a netkit primary (the chains are read there)."""
        for link in [link for link in self.netkit_links if link not in links]:
            del self.netkit_links[link]
        shown: dict[int, NsKey] = {}
        primaries: set[NsKey] = set()
        for key, inventory in self.inventories.items():
            for interface in inventory.interfaces:
                nk = interface.netkit
                if key in self.watched and nk is not None and nk.primary:
                    primaries.add(key)
                    chains = (*nk.primary_chain, *nk.peer_chain)
                    shown.update((t.link_id, key) for t in chains if t.link_id is not None)
        dirty = {key for link, key in shown.items() if link not in links}
        now = time.monotonic()
        if any(now <= until and link not in shown for link, until in self.netkit_links.items()):
            dirty |= primaries
        for key in dirty:
            self._mark_dirty(key)

    def _mark_xdp_namespaces(self, links: frozenset[int]) -> None:
        """An XDP link names its device by index only, and neither it nor its detach sends a
        netlink event (a generic-mode attach sends one, before the program shows): while an XDP
        link's program shows on its device index in no namespace (a new link) or still shows
        there (one that went), for XDP_RECHECK_S at most, read again every namespace with an
        interface of that index (the kernel frees the id before it detaches the program)."""
        now = time.monotonic()
        for link in [link for link in self.xdp_links if link not in links]:
            self.xdp_rechecks[link] = (*self.xdp_links.pop(link), False, now + XDP_RECHECK_S)
        holders: dict[int, set[NsKey]] = {}  # ifindex -> the namespaces with such an interface
        shown: set[tuple[int, int]] = set()  # (ifindex, program id) of the XDP programs read
        for key, inventory in self.inventories.items():
            if key in self.watched:
                for interface in inventory.interfaces:
                    holders.setdefault(interface.ifindex, set()).add(key)
                    shown.update((interface.ifindex, x.prog_id) for x in interface.xdp)
        dirty = self._unlinked_xdp()
        for link, (ifindex, prog_id, present, until) in list(self.xdp_rechecks.items()):
            if now > until or ((ifindex, prog_id) in shown) == present:
                del self.xdp_rechecks[link]
            else:
                dirty |= holders.get(ifindex, set())
        for key in dirty:
            self._mark_dirty(key)

    def _unlinked_xdp(self) -> set[NsKey]:
        """An XDP link attached and closed between two polls never shows in the list's diff:
        a namespace showing an XDP program that no XDP link explains is read again, once per
        program (one attached through netlink stays: its changes send netlink events)."""
        linked = set(self.xdp_links.values())
        shown = {
            (key, interface.ifindex, x.prog_id)
            for key, inventory in self.inventories.items()
            if key in self.watched
            for interface in inventory.interfaces
            for x in interface.xdp
            if (interface.ifindex, x.prog_id) not in linked
        }
        fresh = shown - self.xdp_unlinked
        self.xdp_unlinked = shown
        return {key for key, _ifindex, _prog_id in fresh}

    def _holds_link(self, key: NsKey, link: int, ifindex: int, parent: int) -> bool:
        """Whether namespace `key` has (or had, at its last reading) tcx link `link`."""
        inventory = self.inventories[key]
        if any(t.link_id == link for i in inventory.interfaces for h in i.hooks for t in h.tcx):
            return True  # a link that went: our last reading shows where it was
        direction = Direction(DIRECTION_BY_PARENT[parent])
        try:  # a new link names its interface by index only: ask the candidate namespace
            with entered(self.watched[key].namespace):
                return any(t.link_id == link for t in bpf_syscalls.tcx_query(ifindex, direction))
        except (OSError, NamespaceGone):
            return False

    def _mark_tcx_hooks(self, changed: list[tuple[int, int, int]]) -> None:
        for key, inventory in self.inventories.items():
            if key not in self.watched:
                continue
            present = {i.ifindex for i in inventory.interfaces}
            events = [
                TcEvent("tcx-change", ifindex=ifindex, parent=parent)
                for link, ifindex, parent in changed
                if ifindex in present and self._holds_link(key, link, ifindex, parent)
            ]
            if events:
                self.watched[key].pending.extend(events)
                self._mark_dirty(key)
