"""tcx programs attached without a link (BPF_PROG_ATTACH), found by querying the hooks.

Such an attach or detach sends no netlink event and makes no link id for the daemon's link
poll to notice, so the tcx chains themselves are queried (BPF_PROG_QUERY, inside each
namespace): every poll, the namespaces whose last reading showed a link-less program (their
detach); every namespace on the poll that sees a program loaded since the last one and on the
next (an attach of a new program, the usual case: one syscall a poll tells whether any program
was loaded); and the others in turn, enough a poll for a round every LINKLESS_ROUND_S and at
least LINKLESS_MIN_NAMESPACES (an attach of a program loaded long before). Entering a namespace
costs a few syscalls, so a quiet poll enters only a few of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Mapping
from typing import Protocol, TypeVar

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.namespaces import NamespaceGone, entered
from tcprio.kernel.tc_inventory import PARENT_BY_DIRECTION
from tcprio.model import Direction, HookInventory, NamespaceInventory, NetNamespace
from tcprio.service.watch import TcEvent

LINKLESS_ROUND_S = 300.0  # every namespace queried once this often, when nothing was loaded
# (the default full resync too, which queries every hook again anyway)
LINKLESS_MIN_NAMESPACES = 1  # namespaces queried a poll at least (all of them on a small node)
NEW_PROGRAM_POLLS = 2  # polls querying every namespace after a program was loaded

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


def _is_classifier(prog_id: int) -> bool:
    try:
        return bpf_syscalls.prog_type(prog_id) == bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS
    except OSError:
        return False  # unloaded already: it cannot be attached


class LinklessTcxWatch:
    def __init__(
        self, round_s: float = LINKLESS_ROUND_S, minimum: int = LINKLESS_MIN_NAMESPACES
    ) -> None:
        self.round_s = round_s
        self.minimum = minimum
        self.cursor = 0
        self.newest_prog_id: int | None = None  # the newest program id seen loaded
        self.everywhere = 0  # polls left that query every namespace
        # per namespace: the reading last looked at, and whether it shows a link-less program
        self._linkless: dict[Hashable, tuple[NamespaceInventory, bool]] = {}
        self._split_state: Hashable = None
        self._split_cache: tuple[list, list] = ([], [])

    def _programs_loaded(self) -> bool:
        """Whether a sched_cls program (the only type tcx takes) was loaded since the last
        poll: one syscall when no program was, two more for each new program. The first poll
        only notes the newest (the first scan has just read every namespace)."""
        try:
            if self.newest_prog_id is None:
                self.newest_prog_id = max(bpf_syscalls.list_prog_ids(), default=0)
                return False
            new = bpf_syscalls.prog_ids_after(self.newest_prog_id)
        except OSError:
            return True
        if not new:
            return False
        self.newest_prog_id = new[-1]
        return any(_is_classifier(prog_id) for prog_id in new)

    def _holds_linkless(self, key: Hashable, inventory: NamespaceInventory) -> bool:
        """has_linkless, walked again only when the namespace was read again."""
        seen = self._linkless.get(key)
        if seen is None or seen[0] is not inventory:
            seen = self._linkless[key] = (inventory, has_linkless(inventory))
        return seen[1]

    def budget(self, namespaces: int, interval: float) -> int:
        """Namespaces queried a poll for a round every `round_s`."""
        return max(self.minimum, math.ceil(namespaces * interval / self.round_s))

    def _split(
        self, inventories: Mapping[Key, NamespaceInventory], watched: Mapping[Key, HasNamespace],
        state: Hashable,
    ) -> tuple[list[Key], list[Key]]:
        """(the watched namespaces holding a link-less program, the others), worked out again
        only when `state` (the readings' generation) moved: a quiet poll does not walk them."""
        if state is None or self._split_state != state:
            mine = {k: v for k, v in inventories.items() if k in watched}
            for gone in self._linkless.keys() - mine.keys():
                del self._linkless[gone]
            always = [k for k, inv in mine.items() if self._holds_linkless(k, inv)]
            held = set(always)
            self._split_cache = (always, [k for k in mine if k not in held])
            self._split_state = state
        return self._split_cache  # type: ignore[return-value]

    def _chosen(self, always: list[Key], others: list[Key], interval: float) -> list[Key]:
        """The namespaces to query this poll: those holding a link-less program, every one
        after a program was loaded, else the next `budget` of the others in turn."""
        if self._programs_loaded():
            self.everywhere = NEW_PROGRAM_POLLS
        budget = self.budget(len(others), interval)
        if self.everywhere:
            self.everywhere -= 1
            return always + others
        if len(others) <= budget:
            return always + others
        start = self.cursor % len(others)
        self.cursor = start + budget
        turn = others[start : start + budget] + others[: max(0, start + budget - len(others))]
        return always + turn

    def changed(
        self,
        inventories: Mapping[Key, NamespaceInventory],
        watched: Mapping[Key, HasNamespace],
        interval: float = 1.0,
        generation: int | None = None,
    ) -> dict[Key, list[TcEvent]]:
        """Per watched namespace, a tcx-change event for each hook whose tcx chain is not what
        its last reading showed (`interval`: seconds between two polls; `generation`: a number
        that moves whenever a reading is stored, None to work everything out again)."""
        found: dict[Key, list[TcEvent]] = {}
        state = None if generation is None else (generation, len(inventories), len(watched))
        always, others = self._split(inventories, watched, state)
        for key in self._chosen(always, others, interval):
            inventory, target = inventories.get(key), watched.get(key)
            if inventory is None or target is None:
                continue
            with contextlib.suppress(OSError, NamespaceGone), entered(target.namespace):
                hooks = changed_hooks(inventory)
                if hooks:
                    found[key] = [
                        TcEvent("tcx-change", ifindex=i, parent=PARENT_BY_DIRECTION[d])
                        for i, d in hooks
                    ]
        return found
