"""tcx programs attached without a link (BPF_PROG_ATTACH), found by querying the hooks.

Such an attach or detach sends no netlink event and makes no link id for the daemon's link
poll to notice, so the tcx chains themselves are queried (BPF_PROG_QUERY, inside each
namespace): every poll, the namespaces whose last reading showed a link-less program (their
detach), and the others in turn, LINKLESS_POLL_NAMESPACES of them a poll (an attach: on a node
with more namespaces than that, it shows within ceil(namespaces / budget) polls).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Mapping
from typing import Protocol, TypeVar

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import NamespaceGone, entered
from tcprio.kernel.tc_inventory import PARENT_BY_DIRECTION
from tcprio.model import Direction, HookInventory, NamespaceInventory, NetNamespace
from tcprio.service.watch import TcEvent

LINKLESS_POLL_NAMESPACES = 128

Key = TypeVar("Key", bound=Hashable)
Chain = tuple[tuple[int, int | None], ...]  # (prog id, link id) in execution order


class HasNamespace(Protocol):
    namespace: NetNamespace  # the daemon's Watched


def _chain(hook: HookInventory) -> Chain:
    return tuple((t.prog_id, t.link_id) for t in hook.tcx)


def has_linkless(inventory: NamespaceInventory) -> bool:
    return any(t.link_id is None for i in inventory.interfaces for h in i.hooks for t in h.tcx)


def changed_hooks(inventory: NamespaceInventory) -> list[tuple[int, Direction]]:
    """(ifindex, direction) of the hooks whose tcx chain differs from `inventory`'s reading.
    The calling thread must be in the namespace."""
    changed = []
    for interface in inventory.interfaces:
        for hook in interface.hooks:
            try:
                now = bpf_syscalls.tcx_query(interface.ifindex, hook.direction)
            except bpf_syscalls.TcxUnsupported:
                return []
            except OSError:
                continue  # the interface went: its netlink event reads the namespace again
            if tuple((t.prog_id, t.link_id) for t in now) != _chain(hook):
                changed.append((interface.ifindex, hook.direction))
    return changed


class LinklessTcxWatch:
    def __init__(self, budget: int = LINKLESS_POLL_NAMESPACES) -> None:
        self.budget = budget
        self.cursor = 0

    def _chosen(self, inventories: Mapping[Key, NamespaceInventory]) -> list[Key]:
        """The namespaces to query this poll: those holding a link-less program, then the
        next `budget` of the others in turn."""
        always = [k for k, inv in inventories.items() if has_linkless(inv)]
        others = [k for k in inventories if k not in set(always)]
        if len(others) <= self.budget:
            return always + others
        start = self.cursor % len(others)
        self.cursor = start + self.budget
        turn = (others + others)[start : start + self.budget]
        return always + turn

    def changed(
        self, inventories: Mapping[Key, NamespaceInventory], watched: Mapping[Key, HasNamespace]
    ) -> dict[Key, list[TcEvent]]:
        """Per watched namespace, a tcx-change event for each hook whose tcx chain is not what
        its last reading showed."""
        found: dict[Key, list[TcEvent]] = {}
        mine = {k: v for k, v in inventories.items() if k in watched}
        for key in self._chosen(mine):
            with contextlib.suppress(OSError, NamespaceGone), entered(watched[key].namespace):
                hooks = changed_hooks(mine[key])
                if hooks:
                    found[key] = [
                        TcEvent("tcx-change", ifindex=i, parent=PARENT_BY_DIRECTION[d])
                        for i, d in hooks
                    ]
        return found
