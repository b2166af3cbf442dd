"""What changed between two readings of a namespace: the filter churn Datadog's guide warns of.

Pure: two inventories in, change records out. The daemon counts them and logs each one. A
Datadog classifier that disappears in the same second as a vendor attached a tcx program on its
hook or deleted its clsact qdisc gets that likely cause named (`likely_cause`, `describe_cause`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from tcprio.model import Direction, NamespaceInventory, TcFilter

FilterKey = tuple[int, int, int]  # (chain, priority, handle)


@dataclass(frozen=True)
class Change:
    """One change on a hook, ready to count and to log as a structured event."""

    # "add", "delete", "replace", "datadog-disappeared"; "datadog-disappearance-cause": a cause
    # found for an earlier "datadog-disappeared" once that was logged
    kind: str
    namespace: str
    interface: str
    direction: Direction
    priority: int
    handle: int
    old_prog_id: int | None = None
    new_prog_id: int | None = None
    name: str | None = None
    cause: str | None = None  # datadog-disappeared: the likely cause, one sentence, if any

    def as_log(self) -> dict[str, object]:
        datadog = self.kind.startswith("datadog-")
        cause = {"cause": self.cause} if datadog else {}
        return {
            "event": self.kind if datadog else f"filter-{self.kind}",
            "namespace": self.namespace,
            "interface": self.interface,
            "direction": str(self.direction),
            "priority": self.priority,
            "handle": self.handle,
            "old_prog_id": self.old_prog_id,
            "new_prog_id": self.new_prog_id,
            "name": self.name,
            **cause,
        }


HookFilters = dict[tuple[str, Direction], dict[FilterKey, TcFilter]]


def hook_filters(inventory: NamespaceInventory | None) -> HookFilters:
    found: HookFilters = {}
    if inventory is None:
        return found
    for interface in inventory.interfaces:
        for hook in interface.hooks:
            found[(interface.name, hook.direction)] = {
                (f.chain, f.priority, f.handle): f for f in hook.filters
            }
    return found


def _hook_changes(
    namespace: str,
    where: tuple[str, Direction],
    old: dict[FilterKey, TcFilter],
    new: dict[FilterKey, TcFilter],
    is_datadog: Callable[[TcFilter], bool],
    hook_still_there: bool,
) -> Iterator[Change]:
    """Adds, deletes, replacements; and a Datadog classifier gone from a hook that remains
    (a hook that vanished with its interface or namespace is not a disappearance)."""
    interface, direction = where

    def change(kind: str, f: TcFilter, old_id: int | None, new_id: int | None) -> Change:
        return Change(
            kind, namespace, interface, direction, f.priority, f.handle, old_id, new_id, f.name
        )

    for key, before in old.items():
        after = new.get(key)
        if after is None:
            yield change("delete", before, before.prog_id, None)
        elif after.prog_id != before.prog_id or after.kind != before.kind:
            yield change("replace", after, before.prog_id, after.prog_id)
    for key, after in new.items():
        if key not in old:
            yield change("add", after, None, after.prog_id)
    had_datadog = [f for f in old.values() if is_datadog(f)]
    if hook_still_there and had_datadog and not any(is_datadog(f) for f in new.values()):
        yield change("datadog-disappeared", had_datadog[0], had_datadog[0].prog_id, None)


def diff_inventories(
    old: NamespaceInventory | None,
    new: NamespaceInventory | None,
    is_datadog: Callable[[TcFilter], bool],
) -> list[Change]:
    """Changes from `old` to `new` (None: the namespace did not exist / is gone)."""
    namespace = (new or old).namespace.name if (new or old) else "?"
    before, after = hook_filters(old), hook_filters(new)
    changes: list[Change] = []
    for where in dict.fromkeys([*before, *after]):
        old_filters, new_filters = before.get(where, {}), after.get(where, {})
        changes.extend(
            _hook_changes(namespace, where, old_filters, new_filters, is_datadog, where in after)
        )
    return changes


# --- why Datadog's classifier went -------------------------------------------------------------

# What takes Datadog's filter with it acts within milliseconds: Cilium >= 1.16 attaches its tcx
# program, then deletes every legacy filter on that device and direction; Calico >= 3.31 (TCX
# mode) attaches tcx and deletes the clsact qdisc; Retina deletes the qdisc on cleanup. tcprio
# dates a netlink event when its loop reads it (milliseconds late) and a tcx attach when a link
# poll or a reading of the hook first shows it: a filter deletion makes the hook be read at
# once (debounce_seconds, 0.05 s by default), and that reading shows a tcx program attached just
# before. One second holds both dates of one such pass with room for a loaded node, and is the
# "same second" of the guide; an unrelated tcx attach on this very hook within it is unlikely.
CAUSE_WINDOW_S = 1.0


@dataclass(frozen=True)
class HookEvent:
    """Something on a hook that removes its legacy tc filters, as the daemon dated it."""

    kind: str  # "tcx-attach" or "qdisc-delete"
    at: float  # wall clock, seconds
    program: str | None = None  # tcx-attach: the program's name
    vendor: str | None = None  # tcx-attach: the product it belongs to, when known


def likely_cause(
    gone_at: float, events: Iterable[HookEvent], window: float = CAUSE_WINDOW_S
) -> HookEvent | None:
    """The event of the hook closest in time to the disappearance, within `window`."""
    near = [e for e in events if abs(e.at - gone_at) <= window]
    return min(near, key=lambda e: abs(e.at - gone_at), default=None)


TCX_MOVES = {
    "Cilium": "Cilium >= 1.16 deletes legacy tc filters when it moves to tcx",
    "Calico": "Calico >= 3.31 (bpfAttachType TCX) deletes the clsact qdisc and its filters "
    "when it moves to tcx",
}
TCX_MOVE_OTHER = (
    "tools moving to tcx delete the legacy tc filters there (Cilium >= 1.16, Calico >= 3.31)"
)
QDISC_DELETE = (
    "deleting the clsact qdisc removes every filter on it (Calico >= 3.31 in TCX mode, Retina "
    "when it cleans up)"
)


def _when(gone_at: float, event: HookEvent) -> str:
    """How long after the event, or before tcprio saw it: a tcx program attached just before
    the deletion may only show in the reading that the deletion itself set off."""
    delay = gone_at - event.at
    return f"{delay:.1f} s after" if delay >= 0 else f"{-delay:.1f} s before tcprio saw"


def describe_cause(change: Change, event: HookEvent, gone_at: float, program: str | None) -> str:
    """One sentence: which Datadog classifier went from where, and what happened there then."""
    what = f"Datadog's classifier {program or change.name}"
    if program and change.name:
        what += f" (filter {change.name})"
    where = f"{change.namespace}/{change.interface} {change.direction}"
    when = _when(gone_at, event)
    if event.kind == "tcx-attach":
        vendor = f" ({event.vendor})" if event.vendor else ""
        why = TCX_MOVES.get(event.vendor or "", TCX_MOVE_OTHER)
        attached = "was attached" if when.endswith("after") else "attached"
        return (
            f"{what} disappeared from {where} {when} a tcx program {event.program}{vendor} "
            f"{attached} there: {why}"
        )
    deleted = "was deleted" if when.endswith("after") else "deleted"
    return f"{what} disappeared from {where} {when} its clsact qdisc {deleted}: {QDISC_DELETE}"
