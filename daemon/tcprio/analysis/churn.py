"""What changed between two readings of a namespace: the filter churn Datadog's guide warns of.

Pure: two inventories in, change records out. The daemon counts them and logs each one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tcprio.model import Direction, NamespaceInventory, TcFilter

FilterKey = tuple[int, int, int]  # (chain, priority, handle)


@dataclass(frozen=True)
class Change:
    """One change on a hook, ready to count and to log as a structured event."""

    kind: str  # "add", "delete", "replace", "datadog-disappeared"
    namespace: str
    interface: str
    direction: Direction
    priority: int
    handle: int
    old_prog_id: int | None = None
    new_prog_id: int | None = None
    name: str | None = None

    def as_log(self) -> dict[str, object]:
        return {
            "event": f"filter-{self.kind}" if self.kind != "datadog-disappeared" else self.kind,
            "namespace": self.namespace,
            "interface": self.interface,
            "direction": str(self.direction),
            "priority": self.priority,
            "handle": self.handle,
            "old_prog_id": self.old_prog_id,
            "new_prog_id": self.new_prog_id,
            "name": self.name,
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
