"""The daemon's YAML configuration: parsed, validated, every problem one clear line.

A bad file never half-applies: `load_config` returns a complete DaemonConfig or raises
ConfigError carrying one line per problem, each naming the file, the key, the value and what
is allowed. The daemon keeps its last good configuration when a reload fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tcprio.analysis.shadowing import ObserverRule
from tcprio.inputs import ConfigReadError, brief, label_of, load_yaml
from tcprio.kernel.containers import DEFAULT_ROOTS, ContainerRoots
from tcprio.kernel.files import read_bytes_checked
from tcprio.service.web_config import WebConfig, WebConfigError, load_web_config

DEFAULT_CONFIG_PATH = Path("/etc/tcprio/tcprio.yaml")
DEFAULT_LISTEN = "0.0.0.0:9842"
DEFAULT_TELEMETRY_PATH = "/metrics"
PROBE_PATHS = ("/healthz", "/readyz")  # answered without credentials (kubelet probes)
LOG_FORMATS = ("json", "logfmt")
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_DATADOG_FILES = (
    "/etc/datadog-agent/system-probe.yaml",
    "/etc/datadog-agent/security-agent.yaml",
)


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Observer:
    """A classifier to protect besides Datadog's (Retina, Beyla, your own)."""

    name: str
    programs: tuple[str, ...] = ()  # globs on program names
    filters: tuple[str, ...] = ()  # globs on cls_bpf filter names
    priority: int | None = None  # where it attaches when it is not attached yet

    def rule(self) -> ObserverRule:
        """What the analysis needs to recognise it (analysis/shadowing.py)."""
        return ObserverRule(self.name, self.programs, self.filters)


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MetricsConfig:
    """How much /metrics says: bounded by default (series independent of the pod count)."""

    full_inventory: bool = False  # every classifier and per-hook counters, uncapped
    max_hook_series: int = 20  # per-hook detail series (conflicts, starved, missing) each


@dataclass(frozen=True)
class DaemonConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 9842
    resync_interval: float = 300.0
    proc_sweep_interval: float = 10.0
    tcx_poll_interval: float = 1.0
    debounce: float = 0.05
    datadog_files: tuple[Path, ...] = tuple(Path(p) for p in DEFAULT_DATADOG_FILES)
    scan_datadog_processes: bool = True
    # Treat Datadog's network detection as active even where nothing shows it (`--assume-datadog`)
    assume_datadog: bool = False
    include_namespaces: tuple[str, ...] = ("*",)
    exclude_namespaces: tuple[str, ...] = ()
    observers: tuple[Observer, ...] = ()
    tls: TlsConfig | None = None
    basic_auth: BasicAuth | None = None
    live_probe: bool = True
    log_level: str = "info"
    log_format: str = "json"  # or logfmt, as the Prometheus exporters write
    # --web.config.file / web.config_file: TLS, client CA, bcrypt users, headers (checked)
    web_config_file: Path | None = None
    web: WebConfig | None = None
    telemetry_path: str = DEFAULT_TELEMETRY_PATH
    # One line for each deprecated key or flag in use: logged at start and at each reload
    deprecations: tuple[str, ...] = ()
    # Where containerd and CRI-O keep their OCI bundles: pods' names, products' versions
    container_roots: ContainerRoots = DEFAULT_ROOTS
    metrics: MetricsConfig = MetricsConfig()
    source: str = "defaults"

    @property
    def observer_rules(self) -> tuple[ObserverRule, ...]:
        return tuple(o.rule() for o in self.observers)

    @property
    def listen_address(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def serves_tls(self) -> bool:
        return self.tls is not None or (self.web is not None and self.web.tls is not None)


LOG_LEVELS = ("debug", "info", "warning", "error")


class _Checker:
    """Collects problems while reading one document."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.problems: list[str] = []
        self.deprecations: list[str] = []

    def deprecated(self, key: str, instead: str) -> None:
        self.deprecations.append(deprecation(f"{self.origin}: {key}", instead))

    def problem(self, key: str, value: object, allowed: str) -> None:
        """One line: the value bounded (80 characters, however big or deep) and escaped."""
        self.problems.append(f"{self.origin}: {key}: {brief(value)} is not {allowed}")

    def number(self, data: Mapping, key: str, default: float, low: float, high: float) -> float:
        value = data.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            self.problem(key, value, f"a number of seconds in {low:g}..{high:g}")
            return default
        return float(value)

    def boolean(self, data: Mapping, key: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.problem(key, value, "true or false")
            return default
        return value

    def string_list(self, data: Mapping, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = data.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(key, value, "a list of non-empty strings")
            return default
        return tuple(value)

    def mapping(self, data: Mapping, key: str) -> Mapping | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(key, value, "a mapping")
            return None
        return value

    def unknown_keys(self, data: Mapping, allowed: set[str], prefix: str = "") -> None:
        names = ", ".join(sorted(allowed))
        for key in data:
            if key not in allowed:
                where = f"{self.origin}: {prefix}{label_of(str(key), 80)}"
                self.problems.append(f"{where}: unknown key (allowed: {names})")


def parse_listen_address(text: object) -> tuple[str, int] | None:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); None when malformed."""
    if not isinstance(text, str) or ":" not in text or len(text) > 300:
        return None
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not host.isprintable() or " " in host:
        return None
    if not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def deprecation(what: str, instead: str) -> str:
    return f"{what} is deprecated and goes in the next release: use {instead}"


def _listen(c: _Checker, data: Mapping, web: Mapping) -> tuple[str, int]:
    key = "web.listen_address"
    if "listen_address" in data:  # the older key, still read for one release
        key = "listen_address"
        c.deprecated(key, "web.listen_address (or --web.listen-address)")
        if "listen_address" in web:
            c.problems.append(f"{c.origin}: listen_address: set web.listen_address only")
    value = data["listen_address"] if key == "listen_address" else web.get("listen_address")
    parsed = parse_listen_address(DEFAULT_LISTEN if value is None else value)
    if parsed is None:
        c.problem(key, value, "HOST:PORT with a port in 1..65535")
        return parse_listen_address(DEFAULT_LISTEN)  # type: ignore[return-value]
    return parsed


def telemetry_path_problem(value: object) -> str | None:
    """What is wrong with a telemetry path (None when it does): a path of its own."""
    ok = (
        isinstance(value, str) and value.startswith("/") and len(value) <= 200
        and value.isprintable() and not any(c in value for c in " ?#%")
        and value not in ("/", *PROBE_PATHS)
    )  # fmt: skip
    return None if ok else "a path like /metrics (not /, /healthz or /readyz)"


def _telemetry_path(c: _Checker, web: Mapping) -> str:
    value = web.get("telemetry_path", DEFAULT_TELEMETRY_PATH)
    problem = telemetry_path_problem(value)
    if problem is not None:
        c.problem("web.telemetry_path", value, problem)
        return DEFAULT_TELEMETRY_PATH
    return value


def read_web_config(value: object, key: str) -> tuple[Path, WebConfig]:
    """The web config file a key or flag names, checked; ConfigError naming `key`."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError([f"{key}: {brief(value)} is not a file path"])
    try:
        return Path(value), load_web_config(Path(value))
    except WebConfigError as exc:
        raise ConfigError(exc.problems) from None


def _web_config(c: _Checker, web: Mapping) -> tuple[Path | None, WebConfig | None]:
    if web.get("config_file") is None:
        return None, None
    try:
        return read_web_config(web["config_file"], f"{c.origin}: web.config_file")
    except ConfigError as exc:
        c.problems.extend(exc.problems)
        return None, None


def _legacy_security(
    c: _Checker, data: Mapping, web_config: bool
) -> tuple[TlsConfig | None, BasicAuth | None]:
    """The deprecated tls: and basic_auth: keys, read for one release."""
    for key, instead in (("tls", "tls_server_config"), ("basic_auth", "basic_auth_users")):
        if key not in data:
            continue
        c.deprecated(key, f"{instead} in a web config file (web.config_file, --web.config.file)")
        if web_config:
            c.problems.append(f"{c.origin}: {key}: cannot go with web.config_file: move it "
                              f"into the web config file's {instead}")  # fmt: skip
    return _tls(c, data), _basic_auth(c, data)


def _log_format(c: _Checker, data: Mapping) -> str:
    value = data.get("log_format", "json")
    if value not in LOG_FORMATS:
        c.problem("log_format", value, f"one of {', '.join(LOG_FORMATS)}")
        return "json"
    return value


def _observer(c: _Checker, index: int, entry: object) -> Observer | None:
    key = f"observers[{index}]"
    if not isinstance(entry, dict):
        c.problem(key, entry, "a mapping with name, programs/filters and priority")
        return None
    c.unknown_keys(entry, {"name", "programs", "filters", "priority"}, f"{key}.")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        c.problem(f"{key}.name", name, "a non-empty string")
        return None
    programs = c.string_list(entry, "programs", ())
    filters = c.string_list(entry, "filters", ())
    if not programs and not filters:
        c.problems.append(f"{c.origin}: {key}: needs programs or filters to recognise it")
        return None
    priority = entry.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 65535
    ):
        c.problem(f"{key}.priority", priority, "an integer in 1..65535")
        priority = None
    return Observer(name=name, programs=programs, filters=filters, priority=priority)


def _observers(c: _Checker, data: Mapping) -> tuple[Observer, ...]:
    value = data.get("observers", [])
    if not isinstance(value, list):
        c.problem("observers", value, "a list")
        return ()
    found = (_observer(c, i, entry) for i, entry in enumerate(value))
    return tuple(o for o in found if o is not None)


def _read_file(c: _Checker, key: str, value: object) -> tuple[Path, bytes] | None:
    """(path, contents) of a file the configuration names: a regular file on disk of at most
    MAX_CONFIG_BYTES (same policy as the configuration itself)."""
    if not isinstance(value, str) or not value:
        c.problem(key, value, "a file path")
        return None
    try:
        return Path(value), read_bytes_checked(Path(value), MAX_CONFIG_BYTES)
    except ConfigReadError as exc:
        c.problem(key, value, f"a readable file ({str(exc).removeprefix('is ')})")
        return None


def _readable_file(c: _Checker, key: str, value: object) -> Path | None:
    found = _read_file(c, key, value)
    return found[0] if found else None


def _tls(c: _Checker, data: Mapping) -> TlsConfig | None:
    section = c.mapping(data, "tls")
    if section is None:
        return None
    c.unknown_keys(section, {"cert_file", "key_file"}, "tls.")
    cert = _readable_file(c, "tls.cert_file", section.get("cert_file"))
    key = _readable_file(c, "tls.key_file", section.get("key_file"))
    return TlsConfig(cert, key) if cert and key else None


def _basic_auth(c: _Checker, data: Mapping) -> BasicAuth | None:
    section = c.mapping(data, "basic_auth")
    if section is None:
        return None
    c.unknown_keys(section, {"username", "password_file"}, "basic_auth.")
    username = section.get("username")
    if not isinstance(username, str) or not username or ":" in username:
        c.problem("basic_auth.username", username, "a non-empty string without ':'")
        return None
    found = _read_file(c, "basic_auth.password_file", section.get("password_file"))
    if found is None:
        return None
    path, data = found
    password = data.decode("utf-8", "replace").strip()
    if not password:
        c.problems.append(f"{c.origin}: basic_auth.password_file: {label_of(str(path))} is empty")
        return None
    return BasicAuth(username, password)


def _datadog(c: _Checker, data: Mapping) -> tuple[tuple[Path, ...], bool, bool]:
    section = c.mapping(data, "datadog") or {}
    c.unknown_keys(section, {"config_files", "scan_processes", "assume_active"}, "datadog.")
    files = c.string_list(section, "config_files", DEFAULT_DATADOG_FILES)
    if any("\0" in f for f in files):
        c.problem("datadog.config_files", list(files), "a list of paths without NUL bytes")
        files = DEFAULT_DATADOG_FILES
    scan = c.boolean(section, "scan_processes", True)
    return tuple(Path(f) for f in files), scan, c.boolean(section, "assume_active", False)


CONTAINER_KEYS = {"containerd_bundle_dirs": "containerd", "crio_bundle_dirs": "crio"}


def _container_roots(c: _Checker, data: Mapping) -> ContainerRoots:
    section = c.mapping(data, "containers") or {}
    c.unknown_keys(section, set(CONTAINER_KEYS), "containers.")
    if not section:
        return DEFAULT_ROOTS
    containerd = _folders(c, section, "containerd_bundle_dirs", DEFAULT_ROOTS.more_containerd)
    crio = _folders(c, section, "crio_bundle_dirs", DEFAULT_ROOTS.more_crio)
    return ContainerRoots.of(containerd, crio)


def _folders(
    c: _Checker, section: Mapping, key: str, default: tuple[Path, ...]
) -> tuple[Path, ...]:
    value = section.get(key)
    if value is None:
        return default
    ok = isinstance(value, list) and all(
        isinstance(v, str) and v.startswith("/") and "\0" not in v for v in value
    )
    if not ok:
        c.problem(f"containers.{key}", value, "a list of absolute folder paths")
        return default
    return tuple(Path(v) for v in value)


def _namespaces(c: _Checker, data: Mapping) -> tuple[tuple[str, ...], tuple[str, ...]]:
    section = c.mapping(data, "namespaces") or {}
    c.unknown_keys(section, {"include", "exclude"}, "namespaces.")
    return c.string_list(section, "include", ("*",)), c.string_list(section, "exclude", ())


def _metrics(c: _Checker, data: Mapping) -> MetricsConfig:
    section = c.mapping(data, "metrics") or {}
    c.unknown_keys(section, {"full_inventory", "max_hook_series"}, "metrics.")
    full = c.boolean(section, "full_inventory", False)
    cap = section.get("max_hook_series", MetricsConfig.max_hook_series)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= 100_000:
        c.problem("metrics.max_hook_series", cap, "an integer in 0..100000")
        cap = MetricsConfig.max_hook_series
    return MetricsConfig(full_inventory=full, max_hook_series=cap)


def _log_level(c: _Checker, data: Mapping) -> str:
    value = data.get("log_level", "info")
    if value == "warn":  # the exporters' spelling (--log.level warn)
        return "warning"
    if value not in LOG_LEVELS:
        c.problem("log_level", value, f"one of {', '.join(LOG_LEVELS)}")
        return "info"
    return value


TOP_LEVEL_KEYS = {
    "listen_address", "resync_interval_seconds", "proc_sweep_interval_seconds",
    "tcx_poll_interval_seconds", "debounce_seconds", "datadog", "namespaces", "observers",
    "tls", "basic_auth", "live_probe", "log_level", "containers", "metrics", "web",
    "log_format",
}  # fmt: skip
WEB_KEYS = {"listen_address", "config_file", "telemetry_path"}


def config_from_mapping(data: Mapping[str, Any], origin: str) -> DaemonConfig:
    c = _Checker(origin)
    c.unknown_keys(data, TOP_LEVEL_KEYS)
    web = c.mapping(data, "web") or {}
    c.unknown_keys(web, WEB_KEYS, "web.")
    host, port = _listen(c, data, web)
    web_config_file, web_config = _web_config(c, web)
    tls, basic_auth = _legacy_security(c, data, web_config_file is not None)
    datadog_files, scan_processes, assume_datadog = _datadog(c, data)
    include, exclude = _namespaces(c, data)
    config = DaemonConfig(
        listen_host=host,
        listen_port=port,
        resync_interval=c.number(data, "resync_interval_seconds", 300.0, 5, 86400),
        proc_sweep_interval=c.number(data, "proc_sweep_interval_seconds", 10.0, 0.5, 3600),
        tcx_poll_interval=c.number(data, "tcx_poll_interval_seconds", 1.0, 0.1, 3600),
        debounce=c.number(data, "debounce_seconds", 0.05, 0, 10),
        datadog_files=datadog_files,
        scan_datadog_processes=scan_processes,
        assume_datadog=assume_datadog,
        include_namespaces=include,
        exclude_namespaces=exclude,
        observers=_observers(c, data),
        tls=tls,
        basic_auth=basic_auth,
        live_probe=c.boolean(data, "live_probe", True),
        log_level=_log_level(c, data),
        log_format=_log_format(c, data),
        web_config_file=web_config_file,
        web=web_config,
        telemetry_path=_telemetry_path(c, web),
        deprecations=tuple(c.deprecations),
        container_roots=_container_roots(c, data),
        metrics=_metrics(c, data),
        source=origin,
    )
    if c.problems:
        raise ConfigError(c.problems)
    return config


def _read_config_text(
    path: Path, origin: str, root: Path | None = None, missing_ok: bool = False
) -> str | None:
    """The file's text: a regular file on disk (symbolic links followed, inside `root` when
    given) of at most MAX_CONFIG_BYTES, read without ever blocking (a fifo, a device, /proc
    and /sys refused). None when it does not exist and `missing_ok`."""
    try:
        data = read_bytes_checked(path, MAX_CONFIG_BYTES, root)
    except ConfigReadError as exc:
        if exc.kind == "missing" and missing_ok:
            return None
        if exc.kind == "missing":
            raise ConfigError([f"{origin}: cannot read: No such file or directory"]) from None
        if exc.kind == "type":
            raise ConfigError([f"{origin}: is not a regular file"]) from None
        if exc.kind == "size":
            size = exc.details.get("size")
            shown = f"{size} bytes" if size is not None else f"more than {MAX_CONFIG_BYTES} bytes"
            line = f"{origin}: is {shown}; at most {MAX_CONFIG_BYTES} allowed"
            raise ConfigError([line]) from None
        message = str(exc).replace("cannot be read:", "cannot read:")
        raise ConfigError([f"{origin}: {message}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{origin}: is not valid UTF-8 (byte {exc.start})"]) from None


def load_config(path: Path, missing_ok: bool = False, root: Path | None = None) -> DaemonConfig:
    """The configuration in `path` (as a process whose root is `root` sees it: its links
    cannot leave that root); the defaults when it is absent and `missing_ok`.
    Never raises anything but ConfigError, whatever the file holds."""
    origin = label_of(str(path) if root is None else f"{root}:{path}")
    if "\0" in str(path):
        raise ConfigError([f"{origin}: cannot read: the path holds a NUL byte"])
    if root is None and missing_ok and not path.exists() and not path.is_symlink():
        return DaemonConfig(source=f"defaults ({origin} absent)")
    # Inside a root, "absent" is only known by trying (a dangling link there is absent too).
    text = _read_config_text(path, origin, root, missing_ok and root is not None)
    if text is None:
        return DaemonConfig(source=f"defaults ({origin} absent)")
    try:
        data, duplicates = load_yaml(text)
    except ConfigReadError as exc:
        where, problem = exc.details.get("where", ""), exc.details.get("problem", str(exc))
        raise ConfigError([f"{origin}: not valid YAML{where}: {problem}"]) from None
    if duplicates:
        raise ConfigError(
            [
                f"{origin}: {brief(key)}: set again at line {line}; each key may appear once"
                for key, line in duplicates
            ]
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{origin}: the top level must be a mapping of settings"])
    try:
        return config_from_mapping(data, origin)
    except ConfigError:
        raise
    except Exception as exc:  # a bug in a check must not take the daemon down on a reload
        raise ConfigError([f"{origin}: cannot be checked: {brief(str(exc))}"]) from None


@dataclass(frozen=True)
class Overrides:
    """`tcprio serve`'s flags: each one given wins over the file."""

    listen_address: str | None = None  # --web.listen-address
    legacy_listen_address: str | None = None  # --listen-address, deprecated
    web_config_file: str | None = None  # --web.config.file
    telemetry_path: str | None = None  # --web.telemetry-path
    log_level: str | None = None  # --log.level: debug, info, warn, error
    log_format: str | None = None  # --log.format: logfmt, json


def _listen_flag(overrides: Overrides) -> tuple[str, str | None, list[str]]:
    if overrides.legacy_listen_address is None:
        return "--web.listen-address", overrides.listen_address, []
    if overrides.listen_address is not None:
        raise ConfigError(["--listen-address: give --web.listen-address only"])
    note = deprecation("--listen-address", "--web.listen-address")
    return "--listen-address", overrides.legacy_listen_address, [note]


def _web_flag(config: DaemonConfig, path: str) -> DaemonConfig:
    if config.tls is not None or config.basic_auth is not None:
        raise ConfigError([f"--web.config.file: cannot go with {config.source}'s tls: and "
                           "basic_auth: keys: move them into the web config file"])  # fmt: skip
    web_config_file, web = read_web_config(path, "--web.config.file")
    return replace(config, web_config_file=web_config_file, web=web)


def with_overrides(config: DaemonConfig, overrides: Overrides | str | None) -> DaemonConfig:
    """Command-line flags win over the file (a string: the deprecated --listen-address)."""
    if not isinstance(overrides, Overrides):
        overrides = Overrides(legacy_listen_address=overrides)
    flag, listen_address, notes = _listen_flag(overrides)
    if listen_address is not None:
        parsed = parse_listen_address(listen_address)
        if parsed is None:
            raise ConfigError([f"{flag}: {brief(listen_address)} is not HOST:PORT with a port "
                               "in 1..65535"])  # fmt: skip
        config = replace(config, listen_host=parsed[0], listen_port=parsed[1])
    if overrides.web_config_file is not None:
        config = _web_flag(config, overrides.web_config_file)
    if overrides.telemetry_path is not None:
        problem = telemetry_path_problem(overrides.telemetry_path)
        if problem is not None:
            raise ConfigError([f"--web.telemetry-path: {brief(overrides.telemetry_path)} is "
                               f"not {problem}"])  # fmt: skip
        config = replace(config, telemetry_path=overrides.telemetry_path)
    if overrides.log_level is not None:
        level = "warning" if overrides.log_level == "warn" else overrides.log_level
        config = replace(config, log_level=level)
    if overrides.log_format is not None:
        config = replace(config, log_format=overrides.log_format)
    return replace(config, deprecations=config.deprecations + tuple(notes))
