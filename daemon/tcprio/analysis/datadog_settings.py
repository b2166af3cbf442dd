"""The Datadog agent's own rules for its Workload Protection network settings: keys and
variables, defaults and ranges, precedence, what each agent version does, the known
incompatibility. Pure: `tcprio.datadog` feeds it what `tcprio.kernel.datadog_agent` read.

What system-probe does with these keys (datadog-agent `pkg/security/config/config.go` and
`pkg/config/setup/system_probe.go`), which this module reproduces:

* The keys are `event_monitoring_config.network.<key>` and the deprecated
  `runtime_security_config.network.<key>`. `getInt`/`getBool` return the deprecated key whenever
  it is *configured* (`IsConfigured`: set by a non-default source, non-null), else the new key.
* Both environment variables, `DD_EVENT_MONITORING_CONFIG_NETWORK_<KEY>` and
  `DD_RUNTIME_SECURITY_CONFIG_NETWORK_<KEY>`, are bound to the *new* key, in that order: the first
  one set to a non-empty value wins. No variable feeds the deprecated key, so only a config file
  can set it, and a deprecated key in the file beats both variables.
* For the new key the environment beats the file, which beats the default.
* Agents 7.39.2 up to the event-monitor split (datadog-agent PR 16108, 2023, first shipped in
  about 7.44) only know `runtime_security_config.network.*`, bound to `DD_RUNTIME_SECURITY_...`;
  there the variable beats the file. Agents 7.36.0-7.39.1 attach at priority 1 whatever the
  configuration says (configurable from 7.39.2, release notes); older ones have no classifiers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from tcprio.inputs import ConfigDoc, Log, brief, parse_version
from tcprio.model import DatadogSettings, Setting

DEPRECATED_NS = "runtime_security_config"
NEW_NS = "event_monitoring_config"
WP_ENABLED_KEY = f"{DEPRECATED_NS}.enabled"

PRIORITY_RANGE = (1, 0xFFFF)
HANDLE_RANGE = (0, 0xFFFF)
DEFAULT_PRIORITY = 10
DEFAULT_HANDLE = 0

# Agent versions that change how the settings are read (see the module docstring).
FIRST_NETWORK_VERSION = (7, 36, 0)
FIRST_CONFIGURABLE_PRIORITY = (7, 39, 2)
FIXED_PRIORITY_BEFORE_7_39_2 = 1
FIRST_EVENT_MONITORING_VERSION = (7, 44, 0)  # approximate: PR 16108 merged March 2023
FIRST_INGRESS_DEFAULT_ON = (7, 64, 0)  # approximate: PR 34487 merged 2025-02-27
FIRST_RAW_PACKET_DEFAULT_ON = (7, 67, 0)  # approximate: PR 37413 (2025)

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_MISSING = object()


# --- small value helpers ---------------------------------------------------------------------


def env_name(key: str) -> str:
    """The environment variable viper derives for a key: DD_ prefix, dots to underscores."""
    return "DD_" + key.upper().replace(".", "_")


def deprecated_key(suffix: str) -> str:
    return f"{DEPRECATED_NS}.{suffix}"


def new_key(suffix: str) -> str:
    return f"{NEW_NS}.{suffix}"


def _as_version(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_version(value)
    return tuple(value) or None


def _padded(version: Sequence[int], width: int = 3) -> tuple[int, ...]:
    return tuple(version) + (0,) * (width - len(version))


def _uint16(value: int) -> int:
    return value & 0xFFFF


# --- validators: raw value -> (value, problem) -----------------------------------------------


@dataclass(frozen=True)
class Checked:
    value: object = None
    problem: str | None = None


def _integer(raw: object) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and len(raw) <= 20 and _DECIMAL.fullmatch(raw):
        return int(raw)  # longer: not an int64 for the agent either (nor for int() past 4300)
    return None


def _check_int(raw: object, low: int, high: int) -> Checked:
    allowed = f"is not an integer in {low}..{high}"
    number = _integer(raw)
    if number is None:
        return Checked(problem=allowed)
    if not low <= number <= high:
        hint = ""
        if number != _uint16(number) or number < 0:
            hint = f" (system-probe would wrap it to 16 bits: {_uint16(number)})"
        return Checked(problem=allowed + hint)
    return Checked(value=number)


def check_priority(raw: object) -> Checked:
    return _check_int(raw, *PRIORITY_RANGE)


def check_handle(raw: object) -> Checked:
    return _check_int(raw, *HANDLE_RANGE)


def check_bool(raw: object) -> Checked:
    """What spf13/cast.ToBoolE accepts: YAML booleans, numbers (non-zero is true), and the
    strings of Go's strconv.ParseBool. Anything else system-probe would read as false."""
    if isinstance(raw, bool):
        return Checked(value=raw)
    if isinstance(raw, int):
        return Checked(value=raw != 0)
    if isinstance(raw, str) and raw in _GO_TRUE | _GO_FALSE:
        return Checked(value=raw in _GO_TRUE)
    return Checked(
        problem="is not a boolean (true/false, 1/0, t/f, TRUE/FALSE, True/False)"
        " (system-probe would read it as false)"
    )


# --- settings that are resolved --------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One setting: its DatadogSettings field, its key suffix, its check and default."""

    field: str
    suffix: str
    check: Callable[[object], Checked]
    default: object


SPECS: tuple[Spec, ...] = (
    Spec("enabled", "network.enabled", check_bool, True),
    Spec("classifier_priority", "network.classifier_priority", check_priority, DEFAULT_PRIORITY),
    Spec("classifier_handle", "network.classifier_handle", check_handle, DEFAULT_HANDLE),
    Spec("ingress_enabled", "network.ingress.enabled", check_bool, True),
    Spec("raw_packet_enabled", "network.raw_packet.enabled", check_bool, True),
    Spec("raw_classifier_handle", "network.raw_classifier_handle", check_handle, DEFAULT_HANDLE),
)
SPEC_BY_FIELD = {spec.field: spec for spec in SPECS}


# --- key lookup, viper style -----------------------------------------------------------------


def _child(mapping: Mapping[object, object], name: str) -> object:
    for key, value in mapping.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return _MISSING


def lookup(data: Mapping[object, object], key: str) -> object:
    """The value at dotted `key`, or _MISSING. Like viper: case-insensitive, and a YAML key may
    itself contain dots (`runtime_security_config.enabled: true` at the top level)."""
    return _lookup(data, key.lower().split("."))


def _lookup(data: Mapping[object, object], parts: list[str]) -> object:
    for cut in range(len(parts), 0, -1):
        value = _child(data, ".".join(parts[:cut]))
        if value is _MISSING:
            continue
        if cut == len(parts):
            return value
        if isinstance(value, Mapping):
            found = _lookup(value, parts[cut:])
            if found is not _MISSING:
                return found
    return _MISSING


# --- one system-probe's view of its configuration --------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One place a value may come from, in precedence order."""

    label: str  # Setting.source
    where: str  # start of an error line: a file, or an environment variable
    key: str
    raw: object


@dataclass(frozen=True)
class ConfigView:
    """What one system-probe reads: its config files (later ones override earlier ones), its
    environment, and the prefix that labels where that came from."""

    docs: tuple[ConfigDoc, ...]
    environ: Mapping[str, str]
    prefix: str = ""
    legacy: bool = False  # agent before ~7.44: only runtime_security_config.* exists

    def file_value(self, key: str) -> Candidate | None:
        for doc in reversed(self.docs):
            raw = lookup(doc.data, key)
            if raw is not _MISSING and raw is not None:
                return Candidate(
                    f"{self.prefix}file:{doc.label}:{key}", self.prefix + doc.label, key, raw
                )
        return None

    def env_value(self, name: str, key: str) -> Candidate | None:
        raw = self.environ.get(name)
        if not raw:  # the agent ignores unset and empty variables
            return None
        where = f"{self.prefix}environment variable {name}"
        return Candidate(f"{self.prefix}env:{name}", where, key, raw)

    def candidates(self, suffix: str) -> list[Candidate]:
        old, new = deprecated_key(suffix), new_key(suffix)
        if self.legacy:
            found = [self.env_value(env_name(old), old), self.file_value(old)]
        else:
            found = [
                self.file_value(old),
                self.env_value(env_name(new), new),
                self.env_value(env_name(old), new),
                self.file_value(new),
            ]
        return [c for c in found if c is not None]


def resolve_setting(view: ConfigView, spec: Spec, log: Log) -> Setting:
    """The first valid candidate; each invalid one is an error line and is skipped."""
    for cand in view.candidates(spec.suffix):
        checked = spec.check(cand.raw)
        if checked.problem is None:
            return Setting(checked.value, cand.label)
        log.errors.append(f"{cand.where}: {cand.key}: {brief(cand.raw)} {checked.problem}; ignored")
    return Setting(spec.default, "default")


def resolve_wp_enabled(view: ConfigView, log: Log) -> Setting:
    """runtime_security_config.enabled (Workload Protection itself), default false."""
    key = WP_ENABLED_KEY
    found = [view.env_value(env_name(key), key), view.file_value(key)]
    for cand in (c for c in found if c is not None):
        checked = check_bool(cand.raw)
        if checked.problem is None:
            return Setting(checked.value, cand.label)
        log.errors.append(f"{cand.where}: {key}: {brief(cand.raw)} {checked.problem}; ignored")
    return Setting(False, "default")


def resolve_view(view: ConfigView, log: Log) -> dict[str, Setting]:
    settings = {spec.field: resolve_setting(view, spec, log) for spec in SPECS}
    settings["wp_enabled"] = resolve_wp_enabled(view, log)
    for spec in SPECS:
        _note_spelling(view, spec, settings[spec.field], log)
    return settings


def _note_spelling(view: ConfigView, spec: Spec, setting: Setting, log: Log) -> None:
    old, new = deprecated_key(spec.suffix), new_key(spec.suffix)
    ignored = view.file_value(new) if view.legacy else None
    if ignored is not None:
        log.notes.append(f"{ignored.label}: ignored, this agent predates {NEW_NS}")
    if not view.legacy and setting.source.endswith(f":{old}"):
        log.notes.append(
            f"{setting.source}: deprecated spelling; it wins over {new} and over "
            f"{env_name(new)} / {env_name(old)}"
        )


# --- version-dependent behaviour -------------------------------------------------------------


def apply_version(
    settings: dict[str, Setting],
    version: tuple[int, ...] | None,
    version_text: str | None,
    log: Log,
) -> dict[str, Setting]:
    """Adjust what the configuration says to what an agent of that version really does."""
    if version is None:
        return settings
    v, out = _padded(version), dict(settings)
    if v < FIRST_NETWORK_VERSION:
        out["enabled"] = Setting(False, f"agent {version_text}: no network detection before 7.36")
        log.notes.append(f"agent {version_text} predates Workload Protection network detection")
    elif v < FIRST_CONFIGURABLE_PRIORITY:
        configured = settings["classifier_priority"]
        if configured.source != "default":
            log.notes.append(
                f"{configured.source}: ignored by agent {version_text} "
                "(classifier_priority is configurable from 7.39.2)"
            )
        out["classifier_priority"] = Setting(
            FIXED_PRIORITY_BEFORE_7_39_2, f"agent {version_text}: fixed priority 1 before 7.39.2"
        )
    if v < FIRST_INGRESS_DEFAULT_ON and settings["ingress_enabled"].source == "default":
        out["ingress_enabled"] = Setting(False, f"default for agent {version_text}")
    if v < FIRST_RAW_PACKET_DEFAULT_ON and settings["raw_packet_enabled"].source == "default":
        out["raw_packet_enabled"] = Setting(False, f"default for agent {version_text}")
    return out


def check_raw_handles(settings: Mapping[str, Setting], log: Log) -> None:
    """With raw packets on, system-probe refuses its configuration unless classifier_handle and
    raw_classifier_handle are both 0 (the kernel picks) or both set and different: one error
    line when they are not (Workload Protection then does not start)."""
    raw = settings.get("raw_packet_enabled")
    if raw is None or raw.value is not True or settings["enabled"].value is not True:
        return
    main, raw_handle = settings["classifier_handle"], settings["raw_classifier_handle"]
    if main.value == raw_handle.value == 0:
        return
    if main.value == raw_handle.value:
        problem = "they must differ"
    elif 0 in (main.value, raw_handle.value):
        problem = "they must both be 0 or both be set"
    else:
        return
    log.errors.append(
        f"network.classifier_handle {main.value} ({main.source}) and "
        f"network.raw_classifier_handle {raw_handle.value} ({raw_handle.source}) with "
        f"network.raw_packet.enabled true ({raw.source}): {problem}, system-probe refuses "
        "this configuration and Workload Protection does not start"
    )


# --- putting it together ---------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """The settings of one system-probe (or of the local files) and the agent version."""

    settings: dict[str, Setting]
    version: str | None = None
    version_source: str | None = None


def resolve(view: ConfigView, version: tuple[str, str] | None, log: Log) -> Resolved:
    text, source = version if version else (None, None)
    parsed = parse_version(text)
    legacy = parsed is not None and _padded(parsed) < FIRST_EVENT_MONITORING_VERSION
    settings = apply_version(resolve_view(replace(view, legacy=legacy), log), parsed, text, log)
    check_raw_handles(settings, log)
    return Resolved(settings, text, source)


def show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def note_wp(resolved: Resolved, log: Log) -> None:
    wp = resolved.settings["wp_enabled"]
    note = (
        f"Workload Protection for system-probe ({WP_ENABLED_KEY}): {show(wp.value)} ({wp.source})"
    )
    if wp.value is False:
        note += "; its network classifiers are normally only attached when it is enabled"
    log.notes.append(note)


def note_ingress(resolved: Resolved, log: Log) -> None:
    ingress = resolved.settings["ingress_enabled"]
    if ingress.source == "default" and resolved.version is None:
        log.notes.append(
            "network.ingress.enabled defaults to true since datadog-agent PR 34487 "
            "(2025); older agents default to false"
        )


# --- known incompatibility -------------------------------------------------------------------

KNOWN_BAD_AGENT = ((7, 36, 0), (7, 39, 1))
KNOWN_BAD_CILIUM_MAX = (1, 9)


def known_incompatibility(
    cilium_version: str | Sequence[int] | None, agent_version: str | Sequence[int] | None
) -> str | None:
    """The documented race: Cilium <= 1.9 with agent 7.36.0-7.39.1 (both at priority 1; Cilium's
    `tc filter replace ... prio 1 handle 1` vs the agent's add). None when either is unknown."""
    cilium, agent = _as_version(cilium_version), _as_version(agent_version)
    if cilium is None or agent is None:
        return None
    low, high = KNOWN_BAD_AGENT
    if _padded(cilium, 2)[:2] > KNOWN_BAD_CILIUM_MAX or not low <= _padded(agent) <= high:
        return None
    return (
        f"Cilium {'.'.join(map(str, cilium))} (<= 1.9) with Datadog agent "
        f"{'.'.join(map(str, agent))} (7.36.0-7.39.1): both use TC priority 1 and pods can lose "
        "connectivity when they start; upgrade the agent to 7.39.2 or later (default priority 10)"
    )


def iter_settings(settings: DatadogSettings) -> Iterator[tuple[str, Setting]]:
    """(field, Setting) for every setting present, in a stable order."""
    for spec in SPECS:
        value = getattr(settings, spec.field)
        if value is not None:
            yield spec.field, value
