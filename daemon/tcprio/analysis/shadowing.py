"""Every classifier that a classifier before it on the same hook may hide. Pure: data in, findings
out.

`conflicts.py` protects Datadog's classifier; this module reports every other classifier that a
terminal (or unknown) classifier earlier on its hook may keep from seeing packets. On a hook a
packet meets the tcx programs first, in link order, then the clsact filters of chain 0 by
priority and list order (on an ingress fed by a netkit device, that device's netkit chain before
them all, then the device's XDP programs, which run on receive before its tc ingress); any
verdict that ends the chain there hides everything after it.

Each hidden classifier is reported once, with the earliest classifier that may hide it and the
count of the others, as one of three kinds:

- `observer_hidden`: an observer (a vendor whose role is "observer" in data/vendors.yaml:
  Retina, Beyla; or one the daemon's `observers:` names) never sees those packets;
- `policy_bypass`: a CNI's policy program (role "datapath": Cilium, Calico) sits behind a
  classifier of another vendor that may return TC_ACT_OK (TCX_PASS in tcx): the packets it
  accepts go on without the policy deciding;
- `hidden`: any other classifier.

Datadog's own classifier hidden is a conflict, never repeated here. Datadog's classifier as the
one that hides is reported like any other: its main classifiers return TC_ACT_UNSPEC and hide
nothing, but a raw-packet filter returned TC_ACT_OK before agent PR 38078 and hid what followed.

Severity, from what the blocker may do to the hidden classifier's packets:

- it may end the chain (terminal): `error`, `critical` for a policy bypass;
- tcprio could not prove what it returns (unknown): `warning`;
- it is a clsact filter for a protocol that carries no IP (arp, ...) in front of a classifier
  of protocol all, so it hides only those frames: `info`;
- both are the same vendor's (its own chain, or a leftover of an upgrade): `info`.

When several classifiers may hide one, the most severe pair decides the kind and severity (the
earliest on a tie) and the message names it too. Not seen: a tcx program returning a value
other than -1, 0, 2 and 7 stops the later tcx programs although clsact still runs (the
classifier's verdict, made for clsact, calls it transparent), nor a netkit program returning
NETKIT_PASS, which stops the later programs of its netkit chain but delivers the packet.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tcprio.analysis.conflicts import (
    EARLY_HOOKS,
    IP_CARRYING_PROTOCOLS,
    SEVERITY_ORDER,
    describe,
    execution_order,
    protocol_name,
    terminal_text,
)
from tcprio.analysis.vendors import VendorRule, default_rules
from tcprio.model import (
    ETH_P_ALL,
    Classifier,
    HookKind,
    HookReport,
    Severity,
    Shadowing,
    ShadowKind,
    VerdictClass,
)

ROLE_OBSERVER = "observer"
ROLE_DATAPATH = "datapath"
# What a classifier returns when it accepts a packet and ends the chain: the packet goes on.
PASS_ACTIONS = frozenset({"TC_ACT_OK", "TCX_PASS"})
KIND_ORDER = {ShadowKind.POLICY_BYPASS: 0, ShadowKind.OBSERVER_HIDDEN: 1, ShadowKind.HIDDEN: 2}


@dataclass(frozen=True)
class ObserverRule:
    """An observer to protect besides Datadog's classifier, as the daemon's `observers:` names
    it: globs on program names (the full name when the program has BTF, else the 15 characters
    the kernel keeps) and on cls_bpf filter names."""

    name: str
    programs: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()

    def matches(self, c: Classifier) -> bool:
        if c.prog_id is not None and any(fnmatch.fnmatchcase(c.name, p) for p in self.programs):
            return True
        return c.filter_name is not None and any(
            fnmatch.fnmatchcase(c.filter_name, p) for p in self.filters
        )


def vendor_roles(rules: Iterable[VendorRule] | None = None) -> dict[str, str]:
    """Vendor name -> its role ("observer", "datapath") from data/vendors.yaml."""
    return {r.name: r.role for r in (default_rules() if rules is None else rules)}


@dataclass(frozen=True)
class _Owner:
    """Who a classifier belongs to, as far as shadowing goes."""

    label: str  # the vendor, or a configured observer's name; "" when nobody is known
    role: str  # ROLE_OBSERVER, ROLE_DATAPATH or ""
    configured: bool = False  # named by the configuration's `observers:`


def owner_of(c: Classifier, observers: Sequence[ObserverRule], roles: Mapping[str, str]) -> _Owner:
    for rule in observers:
        if rule.matches(c):
            return _Owner(rule.name, ROLE_OBSERVER, configured=True)
    if c.vendor is None:
        return _Owner("", "")
    return _Owner(c.vendor, roles.get(c.vendor, ""))


# --- one blocker, one hidden classifier ------------------------------------------------------


def may_hide(b: Classifier, h: Classifier) -> bool:
    """`b`, running before `h`, may end the chain for a packet `h` would see."""
    if b.verdict.verdict_class is VerdictClass.TRANSPARENT:
        return False
    if b.hook in EARLY_HOOKS:
        return True
    if b.chain != 0 or h.hook is not HookKind.CLSACT:
        return False
    return ETH_P_ALL in (b.protocol, h.protocol) or b.protocol == h.protocol


def protocol_limited(b: Classifier, h: Classifier) -> bool:
    """`b` hides only some of `h`'s frames, and no IP packet."""
    return (
        b.hook is HookKind.CLSACT
        and b.protocol != h.protocol
        and b.protocol not in IP_CARRYING_PROTOCOLS
    )


def passes(b: Classifier) -> bool:
    """`b` may accept a packet and end the chain (TC_ACT_OK, TCX_PASS)."""
    return b.verdict.verdict_class is VerdictClass.TERMINAL and bool(
        PASS_ACTIONS & set(b.verdict.terminal_actions)
    )


@dataclass(frozen=True)
class _Pair:
    blocker: Classifier
    kind: ShadowKind
    severity: Severity
    same_owner: bool

    @property
    def rank(self) -> tuple[int, int]:
        return (SEVERITY_ORDER[self.severity], KIND_ORDER[self.kind])


def _pair(b: Classifier, h: Classifier, hidden: _Owner, blocker: _Owner) -> _Pair:
    same = bool(hidden.label) and hidden.label == blocker.label
    if hidden.role == ROLE_OBSERVER:
        kind = ShadowKind.OBSERVER_HIDDEN
    elif hidden.role == ROLE_DATAPATH and passes(b) and not same:
        kind = ShadowKind.POLICY_BYPASS
    else:
        kind = ShadowKind.HIDDEN
    if same or protocol_limited(b, h):
        severity = Severity.INFO
    elif b.verdict.verdict_class is VerdictClass.UNKNOWN:
        severity = Severity.WARNING
    elif kind is ShadowKind.POLICY_BYPASS:
        severity = Severity.CRITICAL
    else:
        severity = Severity.ERROR
    return _Pair(b, kind, severity, same)


# --- messages --------------------------------------------------------------------------------


def place(c: Classifier) -> str:
    if c.hook is HookKind.XDP:
        return f"in XDP ({c.xdp_mode} mode, #{c.position})"
    if c.hook is HookKind.NETKIT:
        return f"in the netkit {c.netkit_chain} (#{c.position})"
    if c.hook is HookKind.TCX:
        return f"in tcx (#{c.position})"
    return f"at priority {c.priority or 0}"


def _verdict_text(b: Classifier) -> str:
    if b.verdict.verdict_class is VerdictClass.TERMINAL:
        return terminal_text(b)
    return f"may end the chain (tcprio could not prove what it returns: {b.verdict.reason})"


def how_it_hides(b: Classifier, h: Classifier) -> str:
    """Who hides `h` and how: tcx before clsact, a lower priority or the list order, verdicts."""
    if b.hook is HookKind.XDP and h.hook is not HookKind.XDP:
        where = f"runs in XDP ({b.xdp_mode} mode), before every tcx and clsact program, and"
    elif b.hook is HookKind.XDP:
        where = f"runs before it in XDP ({b.xdp_mode} mode, #{b.position}) and"
    elif b.hook is HookKind.NETKIT and h.hook is not HookKind.NETKIT:
        where = f"runs in the netkit {b.netkit_chain}, before every tcx and clsact program, and"
    elif b.hook is HookKind.NETKIT:
        where = f"runs before it in the netkit {b.netkit_chain} (#{b.position}) and"
    elif b.hook is HookKind.TCX and h.hook is HookKind.CLSACT:
        where = "runs in tcx, before every clsact filter, and"
    elif b.hook is HookKind.TCX:
        where = f"runs before it in tcx (#{b.position}) and"
    elif b.priority == h.priority:
        where = f"at the same priority {b.priority or 0} comes first in the kernel's list and"
    else:
        where = f"at priority {b.priority or 0}, before it,"
    text = f"{describe(b)} {where} {_verdict_text(b)}"
    if protocol_limited(b, h):
        text += f"; it only sees {protocol_name(b.protocol)} frames, so it hides only those"
    return text


def _who(h: Classifier, owner: _Owner) -> str:
    if owner.configured:
        return f"{describe(h)} (observer {owner.label} of the configuration)"
    return describe(h)


def _consequence(pair: _Pair, owner: _Owner) -> str:
    name = owner.label or "it"
    if pair.kind is ShadowKind.POLICY_BYPASS:
        accepted = ", ".join(a for a in pair.blocker.verdict.terminal_actions if a in PASS_ACTIONS)
        return (
            f"POLICY BYPASS: the packets it accepts with {accepted} go on without {name}'s "
            "policy program deciding, so its network policy is not enforced on them"
        )
    text = f"{name} never sees those packets"
    if pair.same_owner:
        text += f" (both are {name}'s: its own chain, or a leftover of an upgrade or a setting)"
    if pair.blocker.is_datadog:
        text += (
            "; Datadog's main classifiers return TC_ACT_UNSPEC, its raw-packet filters returned "
            "TC_ACT_OK before agent PR 38078 (2025-06): upgrade the agent"
        )
    return text


def _message(h: Classifier, owner: _Owner, pairs: Sequence[_Pair], decisive: _Pair) -> str:
    first = pairs[0]
    text = f"{_who(h, owner)} {place(h)} is hidden: {how_it_hides(first.blocker, h)}"
    if decisive is not first:
        text += f"; also {how_it_hides(decisive.blocker, h)}"
    text += f"; {_consequence(decisive, owner)}"
    others = len(pairs) - 1 - (decisive is not first)
    if others:
        text += f"; {others} more classifier{'s' if others > 1 else ''} before it may hide it too"
    return text


# --- hooks -----------------------------------------------------------------------------------


def _candidate(c: Classifier) -> bool:
    """Classifiers this module speaks for: not Datadog's (a conflict), and on the main path (a
    filter in another chain runs only when an action jumps there)."""
    return not c.is_datadog and (c.hook is not HookKind.CLSACT or c.chain == 0)


def shadowings_on_hook(
    hook: HookReport, observers: Sequence[ObserverRule], roles: Mapping[str, str]
) -> list[Shadowing]:
    ordered = execution_order(hook.classifiers)
    owners = [owner_of(c, observers, roles) for c in ordered]
    found: list[Shadowing] = []
    for index, h in enumerate(ordered):
        if not _candidate(h):
            continue
        owner = owners[index]
        pairs = [
            _pair(b, h, owner, owners[i]) for i, b in enumerate(ordered[:index]) if may_hide(b, h)
        ]
        if not pairs:
            continue
        decisive = min(pairs, key=lambda p: p.rank)  # the earliest among equals
        found.append(
            Shadowing(
                namespace=hook.namespace,
                interface=hook.interface,
                direction=hook.direction,
                kind=decisive.kind,
                severity=decisive.severity,
                hidden=h,
                blocker=pairs[0].blocker,
                message=_message(h, owner, pairs, decisive),
                hidden_label=owner.label,
                other_blockers=len(pairs) - 1,
            )
        )
    return found


def shadowing_rank(s: Shadowing) -> tuple[int, int]:
    return (SEVERITY_ORDER[s.severity], KIND_ORDER[s.kind])


def find_shadowings(
    hooks: Iterable[HookReport],
    observers: Sequence[ObserverRule] = (),
    roles: Mapping[str, str] | None = None,
) -> list[Shadowing]:
    """Every hidden classifier of every hook, most severe first (then in hook order)."""
    roles = vendor_roles() if roles is None else roles
    found = [s for hook in hooks for s in shadowings_on_hook(hook, observers, roles)]
    return sorted(found, key=shadowing_rank)
