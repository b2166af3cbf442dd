"""Is Datadog's network detection active on this node? Pure: the settings found (a verified
system-probe, the local files) and the classifiers attached in, one state and its evidence out.

* active: a Datadog classifier is attached (whatever the files say), or a verified system-probe
  runs with Workload Protection and network detection enabled, or (the daemon) its classifiers
  were seen attached within the last hour and nothing turns detection off;
* assumed: the caller said so (`--assume-datadog`, the self-test's own scene);
* disabled: the configuration in force (a verified system-probe's, else the local files')
  turns Workload Protection or network detection off;
* configured: local config files enable it, but no verified system-probe runs and none of its
  classifiers is attached;
* absent: nothing of Datadog's found.

Only active and assumed leave the conflicts their severity (see `analysis/conflicts.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

from tcprio.analysis.conflicts import HookClassifiers
from tcprio.analysis.datadog_settings import WP_ENABLED_KEY, show
from tcprio.model import DatadogPresence, DatadogSettings, PresenceState, Setting

NETWORK_KEY = "network.enabled"


def _attached(hooks: Iterable[HookClassifiers]) -> str | None:
    """One line naming the Datadog classifiers attached, or None."""
    found = [(hook, c) for hook in hooks for c in hook.classifiers if c.is_datadog]
    if not found:
        return None
    hook, first = found[0]
    where = f"{hook.namespace}/{hook.interface} {hook.direction}"
    prio = f" at priority {first.priority}" if first.priority is not None else ""
    why = f" ({first.vendor_evidence})" if first.vendor_evidence else ""
    count = f"{len(found)} Datadog classifier" + ("" if len(found) == 1 else "s")
    return f"{count} attached, e.g. '{first.name}' on {where}{prio}{why}"


def _off(settings: DatadogSettings) -> str | None:
    """What turns detection off in these settings, or None when both keys are on."""
    wp = settings.wp_enabled
    if wp is not None and wp.value is not True:
        return _setting_text(f"Workload Protection ({WP_ENABLED_KEY})", wp)
    if settings.enabled.value is not True:
        return _setting_text(f"network detection ({NETWORK_KEY})", settings.enabled)
    return None


def _setting_text(label: str, setting: Setting) -> str:
    return f"{label} is {show(setting.value)} ({setting.source})"


def _explicitly_off(settings: DatadogSettings) -> bool:
    return settings.enabled.source != "default" and settings.enabled.value is not True


def _turned_off(settings: DatadogSettings, off: str | None) -> bool:
    """The local files, or an explicit setting, turn detection off (Workload Protection's
    default being off does not count without files)."""
    return (settings.found == "files" and off is not None) or _explicitly_off(settings)


def decide_presence(
    settings: DatadogSettings,
    hooks: Iterable[HookClassifiers],
    assume: bool = False,
    seen_before: str | None = None,
) -> DatadogPresence:
    """`seen_before`: one line saying that Datadog's classifiers were attached a short while
    ago (the daemon remembers): a CNI that moves to tcx deletes them while the agent still
    runs, and that is when the conflicts matter most. Settings that turn detection off (a
    verified agent's, else the files') still win over the memory."""
    found = settings.found_evidence
    attached = _attached(hooks)
    if attached:
        return DatadogPresence(PresenceState.ACTIVE, (attached, *found))
    if assume:
        line = "assumed active (--assume-datadog); no Datadog classifier attached here"
        return DatadogPresence(PresenceState.ASSUMED, (line, *found))
    off = _off(settings)
    if settings.found == "process":
        if off is None:
            line = "a verified system-probe runs with Workload Protection and network detection on"
            return DatadogPresence(PresenceState.ACTIVE, (line, *found))
        return DatadogPresence(PresenceState.DISABLED, (f"{off}; no classifier attached", *found))
    if seen_before and not _turned_off(settings, off):
        return DatadogPresence(PresenceState.ACTIVE, (seen_before, *found))
    if settings.found == "files":
        if off is None:
            line = "the local config enables network detection, but no verified system-probe "
            line += "runs and no Datadog classifier is attached"
            return DatadogPresence(PresenceState.CONFIGURED, (line, *found))
        return DatadogPresence(PresenceState.DISABLED, (off, *found))
    if _explicitly_off(settings):
        return DatadogPresence(PresenceState.DISABLED, (off or "network detection is off",))
    line = "no Datadog classifier attached, no verified system-probe, no Datadog config or install"
    return DatadogPresence(PresenceState.ABSENT, (line,))
