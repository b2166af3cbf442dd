"""Known incompatible pairs of a vendor and Datadog's agent, as data, checked against what is
known of the node: the vendors' versions (container images, `--cilium-version`), the agent's,
the kernel's release, and where the vendors' programs were seen.

Each row is one documented incompatibility (see ../shared/platform-notes.md, "Vendors"). A row
with a hook `mode` is also confirmed by observation: a Cilium program on tcx *is* Cilium in tcx
mode, whatever its version. Pure: facts in, one line per incompatibility out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tcprio.inputs import parse_version
from tcprio.model import HookKind, VendorVersion

Version = tuple[int, ...]


@dataclass(frozen=True)
class NodeFacts:
    """What is known of the node for these checks."""

    versions: Mapping[str, VendorVersion]  # by vendor name, as vendors.yaml spells it
    agent_version: str | None
    kernel_release: str | None
    observed: Mapping[str, frozenset[HookKind]]  # vendor -> the hooks its programs are on
    datadog_configured: bool  # Workload Protection's network detection is on


@dataclass(frozen=True)
class Incompatibility:
    """One known incompatible combination. Version bounds are inclusive; None: unbounded."""

    vendor: str
    vendor_min: Version | None
    vendor_max: Version | None
    agent_min: Version | None  # agent bounds None (both): any agent
    agent_max: Version | None
    kernel_min: Version | None  # the vendor's mode needs this kernel
    mode: HookKind | None  # the hook the vendor uses in the incompatible mode
    problem: str  # what goes wrong, one clause
    fix: str  # what to change

    @property
    def any_agent(self) -> bool:
        return self.agent_min is None and self.agent_max is None


KNOWN: tuple[Incompatibility, ...] = (
    Incompatibility(
        vendor="Cilium",
        vendor_min=None,
        vendor_max=(1, 9),
        agent_min=(7, 36, 0),
        agent_max=(7, 39, 1),
        kernel_min=None,
        mode=None,
        problem=(
            "both use TC priority 1 (Cilium replaces `prio 1 handle 1`) and pods can lose "
            "connectivity when they start"
        ),
        fix="upgrade the agent to 7.39.2 or later (default priority 10)",
    ),
    Incompatibility(
        vendor="Cilium",
        vendor_min=(1, 16),
        vendor_max=None,
        agent_min=None,
        agent_max=None,
        kernel_min=(6, 6),
        mode=HookKind.TCX,
        problem=(
            "Cilium attaches with tcx (enable-tcx, the default there): it runs before Datadog's "
            "classifier whatever its priority, and deletes every legacy tc filter on the devices "
            "it attaches to, Datadog's included"
        ),
        fix='set `enable-tcx: "false"` in cilium-config (Helm `bpf.enableTCX=false`)',
    ),
    Incompatibility(
        vendor="Calico",
        vendor_min=(3, 31),
        vendor_max=None,
        agent_min=None,
        agent_max=None,
        kernel_min=(6, 6),
        mode=HookKind.TCX,
        problem=(
            "Calico attaches with tcx (bpfAttachType TCX, the default there): it runs before "
            "Datadog's classifier and removes the clsact qdisc with every filter on it, "
            "Datadog's included"
        ),
        fix="set `bpfAttachType: TC` in the default FelixConfiguration",
    ),
)


def _dotted(version: Version) -> str:
    return ".".join(map(str, version))


def _padded(version: Sequence[int], width: int) -> Version:
    return tuple(version)[:width] + (0,) * (width - len(version))


def _within(version: Version, low: Version | None, high: Version | None) -> bool:
    """Inclusive bounds, compared on the bounds' own precision: 1.9.18 is within `<= 1.9`."""
    if low is not None and _padded(version, len(low)) < low:
        return False
    return high is None or _padded(version, len(high)) <= high


def _versioned(row: Incompatibility, facts: NodeFacts) -> str | None:
    """The row's line when the versions (and the kernel) put the node in it."""
    known = facts.versions.get(row.vendor)
    vendor = parse_version(known.version) if known else None
    if known is None or vendor is None or not _within(vendor, row.vendor_min, row.vendor_max):
        return None
    subject = f"{row.vendor} {_dotted(vendor)} ({known.source})"
    if row.any_agent:
        if not facts.datadog_configured:
            return None
        with_agent = "with Datadog's network detection on"
    else:
        agent = parse_version(facts.agent_version)
        if agent is None or not _within(agent, row.agent_min, row.agent_max):
            return None
        with_agent = f"with Datadog agent {_dotted(agent)}"
    if row.kernel_min is not None:
        kernel = parse_version(facts.kernel_release)
        if kernel is None or not _within(kernel, row.kernel_min, None):
            return None
        subject += f" on kernel {facts.kernel_release}"
    seen = facts.observed.get(row.vendor)
    if row.mode is not None and seen and row.mode not in seen:
        return None  # seen here, but not in that mode: configured out of it
    return f"{subject} {with_agent}: {row.problem}; {row.fix}"


def _observed(row: Incompatibility, facts: NodeFacts) -> str | None:
    """The row's line when the vendor's programs are seen in the row's mode."""
    if row.mode is None or not facts.datadog_configured:
        return None
    if row.mode not in facts.observed.get(row.vendor, frozenset()):
        return None
    return (
        f"{row.vendor} runs on {row.mode} here: it runs before Datadog's classifier and "
        f"{_consequence(row)}; {row.fix}"
    )


def _consequence(row: Incompatibility) -> str:
    if row.vendor == "Calico":
        return "removes the clsact qdisc, with Datadog's filters, on the devices it attaches to"
    return "deletes the legacy tc filters on that device, Datadog's included"


def check(row: Incompatibility, facts: NodeFacts) -> str | None:
    """One line when the node is in this incompatibility, else None."""
    return _observed(row, facts) or _versioned(row, facts)


def known_incompatibilities(facts: NodeFacts, rows: Sequence[Incompatibility] = KNOWN) -> list[str]:
    """Every known incompatibility the node is in, one line each."""
    return [line for row in rows if (line := check(row, facts)) is not None]


def unchecked(facts: NodeFacts) -> list[str]:
    """Cilium on legacy tc without the versions the Cilium <= 1.9 row needs: one line saying
    which one is missing."""
    seen = facts.observed.get("Cilium")
    if not seen or HookKind.CLSACT not in seen:
        return []
    if "Cilium" in facts.versions and facts.agent_version is not None:
        return []
    missing = (
        "Cilium's version (--cilium-version)"
        if "Cilium" not in facts.versions
        else "the Datadog agent's version"
    )
    return [
        "Cilium classifiers found: the known incompatible pair (Cilium <= 1.9 with agent "
        f"7.36 to 7.39.1) cannot be checked without {missing}"
    ]
