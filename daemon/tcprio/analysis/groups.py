"""Conflicts and hidden classifiers grouped by cause, for a report that fits on one screen
whatever the number of pods: one group per severity, blocker (its vendor, else its program's
name), hook and priority, with how many hooks, interfaces and pods it covers and a few
examples; and the distinct remedies in the order to try them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tcprio.model import Classifier, Conflict, Remedy, Severity, Shadowing, ShadowKind

EXAMPLES = 3
SEVERITY_ORDER = {s: i for i, s in enumerate(Severity)}


@dataclass(frozen=True)
class Place:
    """Where a finding is: the namespace and interface, and what is behind them (the pod, or
    for a host-side veth the pod or namespace at its other end)."""

    namespace: str
    interface: str
    direction: str
    pod: str | None = None  # a pod's "<namespace>/<name>"
    behind: str | None = None  # the namespace at a veth's other end, when not a pod

    def text(self) -> str:
        where = f"{self.namespace}/{self.interface} {self.direction}"
        if self.pod and self.pod not in self.namespace:
            return f"{where} (pod {self.pod})"
        if self.behind:
            return f"{where} (peer {self.behind})"
        return where


# (namespace name, interface name) -> (pod, namespace behind)
PlaceInfo = Mapping[tuple[str, str], tuple[str | None, str | None]]


@dataclass
class Group:
    """Findings sharing one cause."""

    severity: Severity
    blocker: str  # the vendor, else 'program name'
    hook: str  # clsact, tcx, xdp, netkit
    priority: int | None  # clsact only
    kind: ShadowKind | None = None  # hidden classifiers only
    hidden: str = ""  # hidden classifiers only: who is hidden
    programs: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    places: list[Place] = field(default_factory=list)
    remedies: list[Remedy] = field(default_factory=list)
    recommended_priority: int | None = None
    message: str = ""  # the first finding's

    @property
    def hooks(self) -> int:
        return len(self.places)

    @property
    def interfaces(self) -> int:
        return len({(p.namespace, p.interface) for p in self.places})

    @property
    def pods(self) -> int:
        return len({p.pod for p in self.places if p.pod})

    @property
    def other_namespaces(self) -> int:
        """Namespaces behind the interfaces (or holding them) that are not known pods."""
        return len({p.behind for p in self.places if p.behind and not p.pod})

    def examples(self, count: int = EXAMPLES) -> list[str]:
        seen: list[str] = []
        for place in self.places:
            key = f"{place.namespace}/{place.interface}"
            if not any(s.startswith(key + " ") for s in seen):
                seen.append(place.text())
            if len(seen) == count:
                break
        return seen


def _blocker_label(c: Classifier) -> str:
    return c.vendor or f"'{c.name}'"


def _add_unique(items: list, new: Iterable) -> None:
    for item in new:
        if item not in items:
            items.append(item)


def _place(namespace: str, interface: str, direction: str, info: PlaceInfo) -> Place:
    pod, behind = info.get((namespace, interface), (None, None))
    return Place(namespace, interface, direction, pod, behind)


def conflict_groups(conflicts: Iterable[Conflict], info: PlaceInfo) -> list[Group]:
    """The conflicts by cause, most severe first, then by how many hooks they cover."""
    groups: dict[tuple, Group] = {}
    for c in conflicts:
        b = c.blocker
        key = (c.severity, _blocker_label(b), str(b.hook), b.priority)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(
                c.severity, key[1], key[2], b.priority,
                recommended_priority=c.recommended_priority, message=c.message,
            )  # fmt: skip
        _add_unique(group.programs, [b.name])
        _add_unique(group.verdicts, b.verdict.terminal_actions)
        _add_unique(group.remedies, c.remedies)
        group.places.append(_place(c.namespace, c.interface, str(c.direction), info))
    return sorted(groups.values(), key=lambda g: (SEVERITY_ORDER[g.severity], -g.hooks))


def shadowing_groups(shadowings: Iterable[Shadowing], info: PlaceInfo) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for s in shadowings:
        b, h = s.blocker, s.hidden
        hidden = s.hidden_label or _blocker_label(h)
        key = (s.severity, s.kind, _blocker_label(b), str(b.hook), b.priority, hidden)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(
                s.severity, key[2], key[3], b.priority, kind=s.kind, hidden=hidden,
                message=s.message,
            )  # fmt: skip
        _add_unique(group.programs, [b.name])
        _add_unique(group.verdicts, b.verdict.terminal_actions)
        group.places.append(_place(s.namespace, s.interface, str(s.direction), info))
    return sorted(groups.values(), key=lambda g: (SEVERITY_ORDER[g.severity], -g.hooks))


# Remedies in the order to try them: Datadog's own setting, then what reading or the vendor can
# change, disabling last.
PRIORITY_FIX, DATADOG_CHANGE, VENDOR_FIX, DISABLE_NETWORK, DISABLE_ALL = range(5)


def remedy_rank(r: Remedy) -> int:
    summary = r.summary
    if summary.startswith("set Workload Protection's classifier priority"):
        return PRIORITY_FIX
    if summary.startswith("upgrade the Datadog agent"):
        return DATADOG_CHANGE
    if summary.startswith("disable Workload Protection network"):
        return DISABLE_NETWORK
    if summary.startswith("disable Workload Protection entirely"):
        return DISABLE_ALL
    return VENDOR_FIX


def ordered_remedies(groups: Iterable[Group]) -> list[Remedy]:
    """Each distinct remedy once, the everyday fix first and disabling last."""
    found: list[Remedy] = []
    for group in groups:
        _add_unique(found, group.remedies)
    return sorted(found, key=remedy_rank)  # stable: within a rank, in order of first use
