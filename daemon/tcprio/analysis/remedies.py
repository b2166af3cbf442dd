"""Attach to each conflict the exact changes that fix it, for each way of installing Datadog."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from tcprio.analysis import vendors
from tcprio.analysis.conflicts import EARLY_HOOKS, is_raw_packet, severity_rank
from tcprio.analysis.datadog_settings import (
    PRIORITY_RANGE,
    WP_ENABLED_KEY,
    deprecated_key,
    env_name,
    new_key,
    show,
)
from tcprio.analysis.incompatibilities import NodeFacts, known_incompatibilities, unchecked
from tcprio.model import (
    Conflict,
    DatadogSettings,
    HookKind,
    Remedy,
    ScanResult,
    Setting,
    Severity,
    VendorVersion,
    VerdictClass,
)

INSPECT = Remedy(
    summary=(
        "tcprio could not prove what this classifier returns: read its exit paths with "
        "`tcprio scan --explain`, and ask its vendor whether it returns TC_ACT_UNSPEC for "
        "packets it accepts; treat it as terminal until then"
    )
)


def vendor_remedy(vendor: str | None, hook: HookKind | str = HookKind.CLSACT) -> Remedy | None:
    """The vendor-side fix for its program on `hook`: a tcx, netkit or XDP program is never told
    to change a tc priority (vendors.yaml keeps one remedy per hook)."""
    rule = vendors.rule_by_name(vendor) if vendor else None
    text = rule.remedy_for(str(hook)) if rule is not None else None
    if rule is None or not text:
        return None
    return Remedy(summary=f"reconfigure {rule.name} ({hook}): {text}")


def remedies_for(conflict: Conflict, settings: DatadogSettings) -> tuple[Remedy, ...]:
    """The routine fix first (Datadog's priority, or the vendor's own setting), then reading
    what could not be proven, and disabling Datadog's detection last."""
    blocker = conflict.blocker
    vendor = vendor_remedy(blocker.vendor, blocker.hook)
    if is_raw_packet(blocker):
        vendor = raw_packet_remedy(settings.raw_packet_enabled)
    found: list[Remedy | None] = []
    if conflict.severity is Severity.CRITICAL:
        found += [
            vendor,
            disable_network_remedy(settings.enabled),
            disable_workload_protection_remedy(),
        ]
    elif conflict.severity in (Severity.ERROR, Severity.WARNING):
        fixable = conflict.recommended_priority is not None and blocker.hook is HookKind.CLSACT
        if fixable:
            found.append(
                priority_remedy(conflict.recommended_priority, settings.classifier_priority)
            )
        elif conflict.severity is Severity.ERROR:
            found.append(vendor)
        if blocker.verdict.verdict_class is VerdictClass.UNKNOWN:
            found.append(INSPECT)
            if blocker.hook in EARLY_HOOKS:
                found.append(vendor)
        if conflict.severity is Severity.ERROR and not fixable:
            found.append(disable_network_remedy(settings.enabled))
    return tuple(r for r in found if r is not None)


def attach_remedies(result: ScanResult, settings: DatadogSettings) -> ScanResult:
    def fix(conflict: Conflict) -> Conflict:
        return replace(conflict, remedies=remedies_for(conflict, settings))

    hooks = [replace(h, conflicts=tuple(fix(c) for c in h.conflicts)) for h in result.hooks]
    conflicts = sorted((c for h in hooks for c in h.conflicts), key=severity_rank)
    return replace(result, hooks=hooks, conflicts=conflicts)


def incompatibility_notes(
    settings: DatadogSettings,
    versions: Mapping[str, VendorVersion],
    observed: Mapping[str, frozenset[HookKind]],
    kernel_release: str | None = None,
    datadog_configured: bool | None = None,
) -> list[str]:
    """The known incompatible pairs the node is in (analysis/incompatibilities.py), from the
    vendors' versions, the agent's, the kernel's and where each vendor's programs were seen;
    and one line when Cilium's legacy tc filters are seen without the versions to check.
    `datadog_configured` (default: what network.enabled says) gates the any-agent rows."""
    configured = datadog_configured
    if configured is None:
        configured = settings.enabled.value is True
    facts = NodeFacts(
        versions=versions,
        agent_version=settings.agent_version,
        kernel_release=kernel_release,
        observed=observed,
        datadog_configured=configured,
    )
    return known_incompatibilities(facts) + unchecked(facts)


# --- Datadog's own changes, in the spelling that wins ----------------------------------------
#
# The `*_snippet`, `*_line` and `*_remedy` helpers produce the configuration changes the
# report recommends, in the spelling that will actually win on the node.


@dataclass(frozen=True)
class Spelling:
    """Where a fix must go to win: the system-probe.yaml key, the environment variable, and why."""

    yaml_key: str
    env_var: str
    why: str


def _source_key(source: str) -> tuple[str, str] | None:
    """("file", key) or ("env", variable) from a Setting.source made by `datadog_settings`."""
    tail = source.split(") ", 1)[-1] if source.startswith("process ") else source
    if tail.startswith("env:"):
        return "env", tail.removeprefix("env:")
    if tail.startswith("file:"):
        return "file", tail.rsplit(":", 1)[-1]
    return None


def winning_spelling(suffix: str, setting: Setting | None = None) -> Spelling:
    """The key and variable to change so that a new value for `suffix` wins on the node."""
    old, new = deprecated_key(suffix), new_key(suffix)
    origin = _source_key(setting.source) if setting else None
    where = _file_of(setting)
    if origin == ("file", old):
        why = (
            f"{old} is set in {where}: this deprecated key wins over {new} and over every "
            "environment variable, so change it there (a variable would have no effect)"
        )
        return Spelling(old, env_name(old), why)
    if origin == ("file", new):
        why = (
            f"{new} is set in {where}: change it there; {old} in the same file or "
            f"{env_name(new)} / {env_name(old)} would also override it"
        )
        return Spelling(new, env_name(old), why)
    if origin is not None and origin[0] == "env":
        why = (
            f"{origin[1]} is set in system-probe's environment: change that variable (it beats "
            f"{new} in the file), or set {old} in system-probe.yaml, which beats both "
            "variables on agent 7.44 and later"
        )
        return Spelling(old, origin[1], why)
    why = (
        f"{old} is the spelling of Datadog's troubleshooting guide: every agent that has the "
        f"setting reads it and, in system-probe.yaml, it beats {new} and both environment "
        "variables (the agent logs that it is deprecated)"
    )
    return Spelling(old, env_name(old), why)


def _file_of(setting: Setting | None) -> str:
    if setting is None:
        return "system-probe.yaml"
    return setting.source.split("file:", 1)[-1].rsplit(":", 1)[0]


def nested_yaml(key: str, value: object) -> str:
    """`a.b.c` = v as block YAML: "a:\\n  b:\\n    c: v\\n"."""
    parts = key.split(".")
    lines = [f"{'  ' * depth}{part}:" for depth, part in enumerate(parts[:-1])]
    lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: object) -> str:
    return show(value) if isinstance(value, bool) else str(value)


def _check_priority_arg(priority: int) -> None:
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise ValueError(f"priority {priority!r} is not an integer in {low}..{high}")


def system_probe_yaml_snippet(priority: int, setting: Setting | None = None) -> str:
    """system-probe.yaml lines that set classifier_priority in the spelling that wins."""
    _check_priority_arg(priority)
    return nested_yaml(winning_spelling("network.classifier_priority", setting).yaml_key, priority)


def env_line(priority: int, setting: Setting | None = None) -> str:
    _check_priority_arg(priority)
    return f"{winning_spelling('network.classifier_priority', setting).env_var}={priority}"


def helm_env_snippet(name: str, value: str) -> str:
    """Helm values adding one variable to the system-probe container of the Datadog chart."""
    return (
        "agents:\n"
        "  containers:\n"
        "    systemProbe:\n"
        "      env:\n"
        f"        - name: {name}\n"
        f'          value: "{value}"\n'
    )


def operator_env_snippet(name: str, value: str) -> str:
    """DatadogAgent lines (Datadog Operator) adding one variable to the system-probe container.
    The Operator has no field for these settings (`spec.features.cws.network.enabled: false`
    changes nothing on the agent): the variable is the way."""
    return (
        "spec:\n"
        "  override:\n"
        "    nodeAgent:\n"
        "      containers:\n"
        "        system-probe:\n"
        "          env:\n"
        f"            - name: {name}\n"
        f'              value: "{value}"\n'
    )


def helm_values_snippet(priority: int, setting: Setting | None = None) -> str:
    """The Datadog chart has no value for classifier_priority: set the variable on system-probe."""
    _check_priority_arg(priority)
    var = winning_spelling("network.classifier_priority", setting).env_var
    return helm_env_snippet(var, str(priority))


RESTART_HOST = "sudo systemctl restart datadog-agent"
RESTART_KUBERNETES = (
    "apply the values with helm upgrade, then, if the agent pods were not replaced, "
    "kubectl -n <namespace> rollout restart daemonset/<datadog-agent-daemonset>"
)
RESTART_OPERATOR = "kubectl apply the DatadogAgent: the Operator replaces the agent pods"


def restart_instructions() -> tuple[str, ...]:
    return (
        f"host: {RESTART_HOST} (restarts system-probe and security-agent with it)",
        f"Kubernetes: {RESTART_KUBERNETES}",
        f"Datadog Operator: {RESTART_OPERATOR}",
    )


def priority_remedy(priority: int, setting: Setting | None = None) -> Remedy:
    """Move Datadog's classifiers to `priority`, in the spelling that will win."""
    spelling = winning_spelling("network.classifier_priority", setting)
    return Remedy(
        summary=f"set Workload Protection's classifier priority to {priority}",
        system_probe_yaml=system_probe_yaml_snippet(priority, setting),
        helm_values=helm_values_snippet(priority, setting),
        operator_values=operator_env_snippet(spelling.env_var, str(priority)),
        environment=env_line(priority, setting),
        extra=(
            spelling.why,
            "the Helm chart and the Datadog Operator have no value for it: the variable goes on "
            "the system-probe container",
            *restart_instructions(),
        ),
    )


HELM_DISABLE_NETWORK = (
    "datadog:\n  securityAgent:\n    runtime:\n      network:\n        enabled: false\n"
)
HELM_DISABLE_WP = "datadog:\n  securityAgent:\n    runtime:\n      enabled: false\n"
OPERATOR_DISABLE_WP = "spec:\n  features:\n    cws:\n      enabled: false\n"


def disable_network_remedy(setting: Setting | None = None) -> Remedy:
    """Turn off Workload Protection's network detection (and with it its classifiers)."""
    spelling = winning_spelling("network.enabled", setting)
    return Remedy(
        summary="disable Workload Protection network detection",
        system_probe_yaml=nested_yaml(spelling.yaml_key, False),
        helm_values=HELM_DISABLE_NETWORK,
        operator_values=operator_env_snippet(spelling.env_var, "false"),
        environment=f"{spelling.env_var}=false",
        extra=(
            spelling.why,
            "the Datadog Helm chart always writes runtime_security_config.network.enabled into "
            "system-probe.yaml, so on Helm installs use the chart value: the variable is ignored",
            "Datadog Operator: `spec.features.cws.network.enabled: false` changes nothing on the "
            "agent; the variable on the system-probe container does",
            *restart_instructions(),
        ),
    )


def raw_packet_remedy(setting: Setting | None = None) -> Remedy:
    """Datadog's raw-packet classifier ends the chain before its main one: upgrade the agent,
    or turn raw packets off (in the spelling that wins)."""
    spelling = winning_spelling("network.raw_packet.enabled", setting)
    return Remedy(
        summary=(
            "upgrade the Datadog agent (its raw-packet filter programs return TC_ACT_UNSPEC "
            "since PR 38078, 2025-06; a rule's drop action still drops on purpose), or turn "
            "raw packets off"
        ),
        system_probe_yaml=nested_yaml(spelling.yaml_key, False),
        helm_values=helm_env_snippet(spelling.env_var, "false"),
        operator_values=operator_env_snippet(spelling.env_var, "false"),
        environment=f"{spelling.env_var}=false",
        extra=(spelling.why, *restart_instructions()),
    )


def disable_workload_protection_remedy() -> Remedy:
    """Turn off Workload Protection entirely (system-probe and security-agent)."""
    snippet = nested_yaml(WP_ENABLED_KEY, False)
    return Remedy(
        summary="disable Workload Protection entirely",
        system_probe_yaml=snippet,
        helm_values=HELM_DISABLE_WP,
        operator_values=OPERATOR_DISABLE_WP,
        environment=f"{env_name(WP_ENABLED_KEY)}=false",
        extra=(
            f"set it in both system-probe.yaml and security-agent.yaml:\n{snippet}",
            "the variable goes on both the system-probe and the security-agent containers",
            *restart_instructions(),
        ),
    )
