"""Attach to each conflict the exact changes that fix it, for each way of installing Datadog."""

from __future__ import annotations

from dataclasses import replace

from tcprio.analysis import vendors
from tcprio.analysis.conflicts import severity_rank
from tcprio.datadog_config import (
    disable_network_remedy,
    disable_workload_protection_remedy,
    known_incompatibility,
    priority_remedy,
)
from tcprio.model import Conflict, DatadogSettings, Remedy, ScanResult, Severity, VerdictClass

INSPECT = Remedy(
    summary=(
        "tcprio could not prove what this classifier returns: read its exit paths with "
        "`tcprio --scan --explain`, and ask its vendor whether it returns TC_ACT_UNSPEC for "
        "packets it accepts; treat it as terminal until then"
    )
)


def vendor_remedy(vendor: str | None) -> Remedy | None:
    rule = vendors.rule_by_name(vendor) if vendor else None
    if rule is None or not rule.remedy:
        return None
    return Remedy(summary=f"reconfigure {rule.name}: {rule.remedy}")


def remedies_for(conflict: Conflict, settings: DatadogSettings) -> tuple[Remedy, ...]:
    """Most direct fix first."""
    found: list[Remedy | None] = []
    if conflict.severity is Severity.CRITICAL:
        found += [
            vendor_remedy(conflict.blocker.vendor),
            disable_network_remedy(settings.enabled),
            disable_workload_protection_remedy(),
        ]
    elif conflict.severity in (Severity.ERROR, Severity.WARNING):
        if conflict.recommended_priority is not None:
            found.append(
                priority_remedy(conflict.recommended_priority, settings.classifier_priority)
            )
        elif conflict.severity is Severity.ERROR:
            found += [
                vendor_remedy(conflict.blocker.vendor),
                disable_network_remedy(settings.enabled),
            ]
        if conflict.blocker.verdict.verdict_class is VerdictClass.UNKNOWN:
            found.append(INSPECT)
    return tuple(r for r in found if r is not None)


def attach_remedies(result: ScanResult, settings: DatadogSettings) -> ScanResult:
    def fix(conflict: Conflict) -> Conflict:
        return replace(conflict, remedies=remedies_for(conflict, settings))

    hooks = [replace(h, conflicts=tuple(fix(c) for c in h.conflicts)) for h in result.hooks]
    conflicts = sorted((c for h in hooks for c in h.conflicts), key=severity_rank)
    return replace(result, hooks=hooks, conflicts=conflicts)


def incompatibility_notes(
    settings: DatadogSettings, cilium_version: str | None, cilium_present: bool
) -> list[str]:
    """The known broken pair: Cilium <= 1.9 with agent 7.36 to 7.39.1."""
    if not cilium_present:
        return []
    verdict = known_incompatibility(cilium_version, settings.agent_version)
    if verdict:
        return [verdict]
    if cilium_version is None or settings.agent_version is None:
        missing = (
            "Cilium's version (--cilium-version)"
            if cilium_version is None
            else ("the Datadog agent's version")
        )
        return [
            "Cilium classifiers found: the known incompatible pair (Cilium <= 1.9 with agent "
            f"7.36 to 7.39.1) cannot be checked without {missing}"
        ]
    return []
