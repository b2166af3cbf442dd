"""The effective Datadog Workload Protection network settings, each labelled with its source.

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

When a `system-probe` process runs on the node, its own environment (/proc/<pid>/environ) and its
own config file, read through /proc/<pid>/root, are the truth. Otherwise the local files and the
given environment are used. Bad input never raises: it becomes one line in `errors` and the value
falls back to the next source.

The `*_snippet`, `*_line` and `*_remedy` helpers at the end produce the configuration changes the
report recommends, in the spelling that will actually win on the node.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from tcprio.model import DatadogSettings, Remedy, Setting

DEFAULT_CONFIG_DIR = "/etc/datadog-agent"
SYSTEM_PROBE_FILE = "system-probe.yaml"
SECURITY_AGENT_FILE = "security-agent.yaml"
DEFAULT_SYSTEM_PROBE_CONFIG = f"{DEFAULT_CONFIG_DIR}/{SYSTEM_PROBE_FILE}"
DEFAULT_FILES: tuple[Path, ...] = (
    Path(DEFAULT_SYSTEM_PROBE_CONFIG),
    Path(f"{DEFAULT_CONFIG_DIR}/{SECURITY_AGENT_FILE}"),
)
DEFAULT_INSTALL_DIR = "/opt/datadog-agent"
VERSION_MANIFESTS = ("version-manifest.txt", "version-manifest.json")
MAX_FILE_BYTES = 1 << 20
MAX_SYMLINKS = 40
PROCESS_NAME = "system-probe"

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

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_VERSION = re.compile(r"(\d+)((?:\.\d+)+)")
_MISSING = object()


class ConfigReadError(Exception):
    """A config file that exists but cannot be used; the message is one report line."""


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
    if isinstance(raw, str) and _DECIMAL.fullmatch(raw):
        return int(raw)
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
)
SPEC_BY_FIELD = {spec.field: spec for spec in SPECS}


# --- reading files safely --------------------------------------------------------------------


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def resolve_in_root(root: Path, path: str) -> Path:
    """Resolve `path` as the process whose root is `root` would, symlinks included, without ever
    leaving `root` (an absolute link target restarts at `root`, `..` stops at it)."""
    todo = deque(part for part in path.split("/") if part)
    done: list[str] = []
    links = 0
    while todo:
        part = todo.popleft()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        info = _lstat_or_none(here)
        if info is None or not stat.S_ISLNK(info.st_mode):
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise ConfigReadError(f"more than {MAX_SYMLINKS} symbolic links (a loop?)")
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed([p for p in target.split("/") if p]))
    return root.joinpath(*done)


def _open_regular(path: Path) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise ConfigReadError("is a directory, not a file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigReadError("is a symbolic link that changed while reading") from None
        raise ConfigReadError(f"cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = _file_type_problem(info)
    if problem:
        os.close(fd)
        raise ConfigReadError(problem)
    return fd


def _file_type_problem(info: os.stat_result) -> str | None:
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (fifo, socket or device)"
    if info.st_size > MAX_FILE_BYTES:
        return f"is {info.st_size} bytes, more than the {MAX_FILE_BYTES} bytes allowed"
    return None


def read_small_file(path: Path) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES; ConfigReadError otherwise."""
    fd = _open_regular(path)
    try:
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigReadError(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigReadError(f"is more than the {MAX_FILE_BYTES} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigReadError(f"is not valid UTF-8 (byte {exc.start})") from None


def parse_yaml_mapping(text: str) -> Mapping[str, object]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigReadError(f"malformed YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigReadError(f"YAML root is a {type(data).__name__}, not a mapping")
    return data


@dataclass(frozen=True)
class ConfigDoc:
    """One config file that was read: the label shown in reports, and its YAML mapping."""

    label: str
    data: Mapping[str, object]


@dataclass
class Log:
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_config(root: Path, path: str, label: str, log: Log, prefix: str = "") -> ConfigDoc | None:
    """Read `path` as seen from `root`. Missing: a note. Unusable: one error line. Either way
    None, so the file contributes nothing. `prefix` names the process it belongs to."""
    try:
        real = resolve_in_root(root, path)
        if _lstat_or_none(real) is None:
            log.notes.append(f"{prefix}{label}: not found; skipped")
            return None
        if real != resolve_plain(root, path):
            log.notes.append(f"{prefix}{label}: symbolic link followed to {_inside(root, real)}")
        return ConfigDoc(label, parse_yaml_mapping(read_small_file(real)))
    except ConfigReadError as exc:
        log.errors.append(f"{prefix}{label}: {exc}; ignored")
    except OSError as exc:
        log.errors.append(f"{prefix}{label}: cannot be read: {exc.strerror}; ignored")
    return None


def resolve_plain(root: Path, path: str) -> Path:
    return root.joinpath(*(part for part in path.split("/") if part))


def _inside(root: Path, real: Path) -> str:
    rel = real.relative_to(root)
    return "/" + str(rel) if str(rel) != "." else "/"


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
        log.errors.append(f"{cand.where}: {cand.key}: {cand.raw!r} {checked.problem}; ignored")
    return Setting(spec.default, "default")


def resolve_wp_enabled(view: ConfigView, log: Log) -> Setting:
    """runtime_security_config.enabled (Workload Protection itself), default false."""
    key = WP_ENABLED_KEY
    found = [view.env_value(env_name(key), key), view.file_value(key)]
    for cand in (c for c in found if c is not None):
        checked = check_bool(cand.raw)
        if checked.problem is None:
            return Setting(checked.value, cand.label)
        log.errors.append(f"{cand.where}: {key}: {cand.raw!r} {checked.problem}; ignored")
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
    return out


# --- running system-probe processes ----------------------------------------------------------


@dataclass(frozen=True)
class AgentProcess:
    pid: int
    argv: tuple[str, ...]
    exe: str | None  # the executable's path as the kernel reports it
    proc_dir: Path

    @property
    def root(self) -> Path:
        return self.proc_dir / "root"

    @property
    def prefix(self) -> str:
        return f"process {self.pid} ({PROCESS_NAME}) "


def _read_proc_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _read_link(path: Path) -> str | None:
    try:
        return os.readlink(path).removesuffix(" (deleted)")
    except OSError:
        return None


def _is_system_probe(proc_dir: Path) -> tuple[bool, str | None]:
    comm = (_read_proc_text(proc_dir / "comm") or "").strip()
    exe = _read_link(proc_dir / "exe")
    named = comm == PROCESS_NAME or (exe is not None and os.path.basename(exe) == PROCESS_NAME)
    return named, exe


def find_system_probes(
    proc_root: Path = Path("/proc"), only_pids: Collection[int] | None = None
) -> list[AgentProcess]:
    """Every process whose comm or executable is named system-probe, by pid."""
    found = []
    for pid in _pids(proc_root, only_pids):
        proc_dir = proc_root / str(pid)
        named, exe = _is_system_probe(proc_dir)
        if not named:
            continue
        cmdline = _read_proc_text(proc_dir / "cmdline")
        if cmdline is None:  # gone meanwhile
            continue
        found.append(AgentProcess(pid, _split_cmdline(cmdline), exe, proc_dir))
    return found


def _split_cmdline(cmdline: str) -> tuple[str, ...]:
    items = cmdline.split("\0")
    if items and items[-1] == "":
        items.pop()
    return tuple(items)


def _pids(proc_root: Path, only_pids: Collection[int] | None) -> list[int]:
    try:
        pids = sorted(int(entry.name) for entry in proc_root.iterdir() if entry.name.isdigit())
    except OSError:
        return []
    return [pid for pid in pids if only_pids is None or pid in only_pids]


def config_flag(argv: Sequence[str]) -> str | None:
    """The value of system-probe's `--config`/`-c` flag (pflag syntax; the last one wins)."""
    value = None
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        nxt = args[i + 1] if i + 1 < len(args) else None
        if arg in ("--config", "-c"):
            value = nxt
        elif arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        elif arg.startswith("-c") and not arg.startswith("--"):
            value = arg[2:].removeprefix("=")
    return value


def config_file_for(flag: str | None) -> str:
    """system-probe's config file: the flag names the file when it ends in .yaml, else the
    directory holding system-probe.yaml; without it, /etc/datadog-agent/system-probe.yaml."""
    if not flag:
        return DEFAULT_SYSTEM_PROBE_CONFIG
    if flag.endswith(".yaml"):
        return flag
    return flag.rstrip("/") + "/" + SYSTEM_PROBE_FILE


def _process_config_path(proc: AgentProcess) -> tuple[Path, str]:
    """(root to resolve in, path inside it) for the process's config file."""
    path = config_file_for(config_flag(proc.argv))
    if path.startswith("/"):
        return proc.root, path
    return proc.proc_dir / "cwd", path  # relative to its working directory


def read_environ(proc: AgentProcess, log: Log) -> dict[str, str]:
    try:
        raw = (proc.proc_dir / "environ").read_bytes()
    except OSError as exc:
        log.errors.append(f"{proc.prefix}environment cannot be read: {exc.strerror}; ignored")
        return {}
    pairs = (item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0"))
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def process_view(proc: AgentProcess, log: Log) -> ConfigView:
    base, path = _process_config_path(proc)
    label = str(resolve_plain(base, path))
    doc = load_config(base, path, label, log, proc.prefix)
    docs = (doc,) if doc else ()
    return ConfigView(docs, read_environ(proc, log), proc.prefix)


# --- agent version ---------------------------------------------------------------------------


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """The first dotted number in `text`: "agent 7.50.3-1" -> (7, 50, 3), "v1.9.18" -> (1, 9, 18).
    None when there is none."""
    if not text:
        return None
    match = _VERSION.search(text)
    if match is None:
        return None
    return (int(match.group(1)), *(int(p) for p in match.group(2).split(".")[1:]))


def _version_from_manifest(name: str, text: str) -> str | None:
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        value = data.get("build_version") if isinstance(data, dict) else None
        return value if isinstance(value, str) and parse_version(value) else None
    first = text.splitlines()[0] if text else ""  # "agent 7.50.3-1"
    words = first.split()
    return words[-1] if len(words) >= 2 and parse_version(words[-1]) else None


def read_agent_version(root: Path, install_dirs: Sequence[str]) -> tuple[str, str] | None:
    """(version, source) from an Omnibus version manifest under one of `install_dirs`."""
    for install_dir in dict.fromkeys(install_dirs):
        for name in VERSION_MANIFESTS:
            path = f"{install_dir.rstrip('/')}/{name}"
            with contextlib.suppress(ConfigReadError, OSError):
                text = read_small_file(resolve_in_root(root, path))
                version = _version_from_manifest(name, text)
                if version:
                    return version, str(resolve_plain(root, path))
    return None


def process_install_dirs(proc: AgentProcess) -> list[str]:
    """/opt/datadog-agent/embedded/bin/system-probe -> /opt/datadog-agent, then the default."""
    dirs = []
    suffix = f"/embedded/bin/{PROCESS_NAME}"
    if proc.exe and proc.exe.endswith(suffix):
        dirs.append(proc.exe.removesuffix(suffix) or "/")
    return [*dirs, DEFAULT_INSTALL_DIR]


# --- putting it together ---------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """The settings of one system-probe (or of the local files) and the agent version."""

    settings: dict[str, Setting]
    version: str | None = None
    version_source: str | None = None


def _resolve(view: ConfigView, version: tuple[str, str] | None, log: Log) -> Resolved:
    text, source = version if version else (None, None)
    parsed = parse_version(text)
    legacy = parsed is not None and _padded(parsed) < FIRST_EVENT_MONITORING_VERSION
    settings = resolve_view(replace(view, legacy=legacy), log)
    return Resolved(apply_version(settings, parsed, text, log), text, source)


def _resolve_process(proc: AgentProcess, log: Log) -> Resolved:
    version = read_agent_version(proc.root, process_install_dirs(proc))
    return _resolve(process_view(proc, log), version, log)


def _is_security_agent_file(path: Path) -> bool:
    return path.name == SECURITY_AGENT_FILE


def _load_local(files: Sequence[Path], log: Log) -> tuple[list[ConfigDoc], list[ConfigDoc]]:
    """(system-probe docs, security-agent docs) from the local files."""
    probe_docs, agent_docs = [], []
    for path in files:
        doc = load_config(Path("/"), str(path.absolute()), str(path), log)
        if doc is not None:
            (agent_docs if _is_security_agent_file(path) else probe_docs).append(doc)
    return probe_docs, agent_docs


def _resolve_local(
    files: Sequence[Path], environ: Mapping[str, str], host_root: Path, log: Log
) -> Resolved:
    probe_docs, agent_docs = _load_local(files, log)
    version = read_agent_version(host_root, [DEFAULT_INSTALL_DIR])
    resolved = _resolve(ConfigView(tuple(probe_docs), environ), version, log)
    if agent_docs:
        wp = resolve_wp_enabled(ConfigView(tuple(agent_docs), environ), log)
        log.notes.append(
            f"Workload Protection for security-agent ({WP_ENABLED_KEY}): "
            f"{_show(wp.value)} ({wp.source})"
        )
    return resolved


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


COMPARED = ("enabled", "classifier_priority", "classifier_handle", "ingress_enabled")


def _describe(pid: int, resolved: Resolved) -> str:
    parts = ", ".join(f"{name}={_show(resolved.settings[name].value)}" for name in COMPARED)
    return f"pid {pid}: {parts}"


def _note_disagreement(results: list[tuple[AgentProcess, Resolved]], log: Log) -> None:
    first = results[0][1].settings
    if all(all(r.settings[n].value == first[n].value for n in COMPARED) for _, r in results):
        return
    detail = "; ".join(_describe(proc.pid, res) for proc, res in results)
    log.notes.append(
        f"system-probe processes disagree (pid {results[0][0].pid} is reported): {detail}"
    )


def _note_wp(resolved: Resolved, log: Log) -> None:
    wp = resolved.settings["wp_enabled"]
    note = (
        f"Workload Protection for system-probe ({WP_ENABLED_KEY}): {_show(wp.value)} ({wp.source})"
    )
    if wp.value is False:
        note += "; its network classifiers are normally only attached when it is enabled"
    log.notes.append(note)


def _note_ingress(resolved: Resolved, log: Log) -> None:
    ingress = resolved.settings["ingress_enabled"]
    if ingress.source == "default" and resolved.version is None:
        log.notes.append(
            "network.ingress.enabled defaults to true since datadog-agent PR 34487 "
            "(2025); older agents default to false"
        )


def resolve_settings(
    files: Sequence[Path] = DEFAULT_FILES,
    environ: Mapping[str, str] | None = None,
    proc_root: Path = Path("/proc"),
    scan_processes: bool = True,
    host_root: Path = Path("/"),
    only_pids: Collection[int] | None = None,
) -> DatadogSettings:
    """The settings the running agent uses, each labelled with its source.

    A running system-probe process (its environment and config file) is the truth; without one,
    `files` and `environ` (default: this process's environment) are used. `host_root` is where
    the locally installed agent's version manifest is looked for; `only_pids` limits the process
    scan (tests, or a caller that already picked the process).
    """
    log = Log()
    env = os.environ if environ is None else environ
    procs = find_system_probes(proc_root, only_pids) if scan_processes else []
    if procs:
        results = [(proc, _resolve_process(proc, log)) for proc in procs]
        resolved = results[0][1]
        log.notes.insert(
            0,
            f"source of truth: {len(procs)} running system-probe process(es), "
            f"pid {', '.join(str(p.pid) for p, _ in results)} (local files and this "
            "environment are not used)",
        )
        _note_disagreement(results, log)
    else:
        resolved = _resolve_local(files, env, host_root, log)
        log.notes.insert(0, "no running system-probe found: using the local files and environment")
    _note_wp(resolved, log)
    _note_ingress(resolved, log)
    return _settings(resolved, log)


def _settings(resolved: Resolved, log: Log) -> DatadogSettings:
    s = resolved.settings
    return DatadogSettings(
        enabled=s["enabled"],
        classifier_priority=s["classifier_priority"],
        classifier_handle=s["classifier_handle"],
        ingress_enabled=s["ingress_enabled"],
        agent_version=resolved.version,
        agent_version_source=resolved.version_source,
        notes=tuple(dict.fromkeys(log.notes)),
        errors=tuple(dict.fromkeys(log.errors)),
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


# --- remedies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spelling:
    """Where a fix must go to win: the system-probe.yaml key, the environment variable, and why."""

    yaml_key: str
    env_var: str
    why: str


def _source_key(source: str) -> tuple[str, str] | None:
    """("file", key) or ("env", variable) from a Setting.source made by this module."""
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
    return _show(value) if isinstance(value, bool) else str(value)


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


def restart_instructions() -> tuple[str, ...]:
    return (
        f"host: {RESTART_HOST} (restarts system-probe and security-agent with it)",
        f"Kubernetes: {RESTART_KUBERNETES}",
    )


def priority_remedy(priority: int, setting: Setting | None = None) -> Remedy:
    """Move Datadog's classifiers to `priority`, in the spelling that will win."""
    spelling = winning_spelling("network.classifier_priority", setting)
    return Remedy(
        summary=f"set Workload Protection's classifier priority to {priority}",
        system_probe_yaml=system_probe_yaml_snippet(priority, setting),
        helm_values=helm_values_snippet(priority, setting),
        environment=env_line(priority, setting),
        extra=(
            spelling.why,
            "the Helm chart has no value for it: the variable goes on the system-probe container",
            *restart_instructions(),
        ),
    )


HELM_DISABLE_NETWORK = (
    "datadog:\n  securityAgent:\n    runtime:\n      network:\n        enabled: false\n"
)
HELM_DISABLE_WP = "datadog:\n  securityAgent:\n    runtime:\n      enabled: false\n"


def disable_network_remedy(setting: Setting | None = None) -> Remedy:
    """Turn off Workload Protection's network detection (and with it its classifiers)."""
    spelling = winning_spelling("network.enabled", setting)
    return Remedy(
        summary="disable Workload Protection network detection",
        system_probe_yaml=nested_yaml(spelling.yaml_key, False),
        helm_values=HELM_DISABLE_NETWORK,
        environment=f"{spelling.env_var}=false",
        extra=(
            spelling.why,
            "the Datadog Helm chart always writes runtime_security_config.network.enabled into "
            "system-probe.yaml, so on Helm installs use the chart value: the variable is ignored",
            *restart_instructions(),
        ),
    )


def disable_workload_protection_remedy() -> Remedy:
    """Turn off Workload Protection entirely (system-probe and security-agent)."""
    snippet = nested_yaml(WP_ENABLED_KEY, False)
    return Remedy(
        summary="disable Workload Protection entirely",
        system_probe_yaml=snippet,
        helm_values=HELM_DISABLE_WP,
        environment=f"{env_name(WP_ENABLED_KEY)}=false",
        extra=(
            f"set it in both system-probe.yaml and security-agent.yaml:\n{snippet}",
            "the variable goes on both the system-probe and the security-agent containers",
            *restart_instructions(),
        ),
    )


def iter_settings(settings: DatadogSettings) -> Iterator[tuple[str, Setting]]:
    """(field, Setting) for every setting present, in a stable order."""
    for spec in SPECS:
        value = getattr(settings, spec.field)
        if value is not None:
            yield spec.field, value
