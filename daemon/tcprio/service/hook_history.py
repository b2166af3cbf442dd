"""The last seconds of each hook, dated: why Datadog's classifier may have disappeared.

The daemon hands every reading of a namespace here with the netlink events that led to it:
clsact qdisc deletions come dated from netlink (`TcEvent.at`), tcx attaches from the link poll
(a link's first sighting) or from the first reading that shows the program. When a reading
shows Datadog's classifier gone, `explain` dates that from the filter or qdisc deletion that
removed it and names the event on the same hook within `CAUSE_WINDOW_S` (`analysis/churn.py`);
one that is only seen after that reading (a tcx attach that came second, or a link the poll
lists later) is named by `late_causes` in a follow-up `datadog-disappearance-cause` change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from tcprio.analysis import vendors
from tcprio.analysis.churn import Change, HookEvent, describe_cause, likely_cause
from tcprio.model import Direction, HookKey, NamespaceInventory
from tcprio.service.watch import TcEvent

KEEP_S = 10.0  # older events can no longer explain a disappearance read now
MAX_EVENTS = 16  # per hook: a vendor re-attaching in a loop must not grow the history
TC_H_CLSACT = 0xFFFFFFF1  # the parent of clsact and ingress qdiscs
FILTER_PARENTS = {0xFFFFFFF2: Direction.INGRESS, 0xFFFFFFF3: Direction.EGRESS}
# (namespace, interface, direction, priority): when a filter there was last deleted or replaced;
# priority None: the qdisc went (every priority of both hooks)
Removals = dict[tuple[str, str, str, int | None], float]
NameOf = Callable[[int], str | None]


def _tcx_entries(inventory: NamespaceInventory) -> dict[tuple[str, str], set[tuple[int, int]]]:
    """(program id, link id or 0) of each hook's tcx programs (not positions: they shift)."""
    return {
        (interface.name, str(hook.direction)): {(t.prog_id, t.link_id or 0) for t in hook.tcx}
        for interface in inventory.interfaces
        for hook in interface.hooks
    }


def removals(namespace: str, names: dict[int, str], events: Iterable[TcEvent]) -> Removals:
    """When filters went, per hook and priority, from netlink events the daemon dated."""
    found: Removals = {}
    for event in events:
        ifname = names.get(event.ifindex)
        if ifname is None or not event.at:
            continue
        if event.kind == "qdisc-delete" and event.parent == TC_H_CLSACT:
            for direction in Direction:
                key = (namespace, ifname, str(direction), None)
                found[key] = max(found.get(key, 0.0), event.at)
        removed = event.kind == "filter-delete" or (event.kind == "filter-add" and event.replace)
        direction = FILTER_PARENTS.get(event.parent)
        if removed and direction is not None:
            key = (namespace, ifname, str(direction), event.priority)
            found[key] = max(found.get(key, 0.0), event.at)
    return found


class HookHistory:
    """Dated tcx attaches and qdisc deletions per hook, for the last KEEP_S seconds."""

    def __init__(self) -> None:
        self.events: dict[HookKey, list[HookEvent]] = {}
        self.link_seen: dict[int, float] = {}  # link id -> when the poll first listed it
        # disappearances no event explained yet: (change, when it went, Datadog's program)
        self.unexplained: list[tuple[Change, float, str | None]] = []

    def links_listed(self, links: Iterable[int], now: float) -> None:
        """The poll's list of BPF links: a link's first sighting dates its attach."""
        self.link_seen = {link: self.link_seen.get(link, now) for link in links}

    def _add(self, hook: HookKey, event: HookEvent, now: float) -> None:
        kept = [e for e in self.events.get(hook, ()) if now - e.at <= KEEP_S]
        self.events[hook] = [*kept, event][-MAX_EVENTS:]

    def note_reading(
        self,
        namespace: str,
        old: NamespaceInventory | None,
        new: NamespaceInventory,
        removed: Removals,
        name_of: NameOf,
        now: float,
    ) -> None:
        """Record the qdisc deletions among `removed` and the tcx programs `new` shows that
        `old` did not (a namespace read for the first time has no history)."""
        for (ns, ifname, direction, priority), at in removed.items():
            if priority is None:
                self._add((ns, ifname, direction), HookEvent("qdisc-delete", at), now)
        if old is None:
            return
        before = _tcx_entries(old)
        for (ifname, direction), entries in _tcx_entries(new).items():
            for prog_id, link_id in entries - before.get((ifname, direction), set()):
                seen = self.link_seen.get(link_id, now) if link_id else now
                program = name_of(prog_id)
                rule = vendors.identify(program, None)
                event = HookEvent("tcx-attach", min(seen, now), program, rule and rule.name)
                self._add((namespace, ifname, direction), event, now)
        cutoff = now - KEEP_S
        for hook in [h for h, events in self.events.items() if events[-1].at < cutoff]:
            del self.events[hook]

    def explain(self, change: Change, removed: Removals, name_of: NameOf, now: float) -> Change:
        """`change` (Datadog's classifier gone) with its likely cause, when one is near."""
        hook = (change.namespace, change.interface, str(change.direction))
        dates = [removed.get((*hook, change.priority)), removed.get((*hook, None))]
        gone_at = max((d for d in dates if d), default=now)
        event = likely_cause(gone_at, self.events.get(hook, ()))
        program = name_of(change.old_prog_id) if change.old_prog_id is not None else None
        if event is None:
            self.unexplained.append((change, gone_at, program))
            return change
        return dataclasses.replace(change, cause=describe_cause(change, event, gone_at, program))

    def late_causes(self, now: float) -> list[Change]:
        """Follow-ups for disappearances whose cause was recorded after they were read."""
        found, waiting = [], []
        for change, gone_at, program in self.unexplained:
            hook = (change.namespace, change.interface, str(change.direction))
            event = likely_cause(gone_at, self.events.get(hook, ()))
            if event is not None:
                cause = describe_cause(change, event, gone_at, program)
                found.append(
                    dataclasses.replace(change, kind="datadog-disappearance-cause", cause=cause)
                )
            elif now - gone_at <= KEEP_S:  # a poll may still date an attach within the window
                waiting.append((change, gone_at, program))
        self.unexplained = waiting
        return found
