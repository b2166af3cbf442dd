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
import ctypes
import errno
import json
import os
import re
import reprlib
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
)
SPEC_BY_FIELD = {spec.field: spec for spec in SPECS}


# --- one-line messages ------------------------------------------------------------------------

MAX_SHOWN = 80  # characters of a bad value shown in a message

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 2
_BRIEF.maxdict = _BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxset = _BRIEF.maxfrozenset = 4
_BRIEF.maxstring = _BRIEF.maxother = _BRIEF.maxlong = MAX_SHOWN


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped (newlines, terminal escapes, Unicode
    line separators): a message built from it stays one line and cannot forge another."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def label_of(text: str, limit: int = 300) -> str:
    """A path or name shown in a message or a source label: one line, at most `limit` chars."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief(value: object, limit: int = MAX_SHOWN) -> str:
    """A bad value as shown in a message: its repr, bounded in depth, breadth and length (a YAML
    alias bomb or a 10 MB string costs nothing), on one line."""
    try:
        text = _BRIEF.repr(value)
    except Exception:  # an int too long to print, a broken object
        text = f"<{type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- reading files safely --------------------------------------------------------------------
#
# Policy, for the daemon's own configuration, the Datadog files and the files read through a
# system-probe's /proc/<pid>/root: symbolic links are followed (inside that root: a container's
# link to /etc/... names its own /etc, never the host's), and only a regular file on a real file
# system is read: a directory, a fifo, a socket or a device is refused before it is opened (so a
# fifo never blocks and no device is touched), so is a file on proc, sysfs and the other pseudo
# file systems (their sizes lie and some reads have effects), and reading stops after the limit.


class ConfigReadError(Exception):
    """A config file that exists but cannot be used; the message is one report line.
    `kind`: missing, type, pseudo, size, io, loop or text."""

    def __init__(self, message: str, kind: str = "io", **details: object) -> None:
        super().__init__(message)
        self.kind = kind
        self.details = details


PSEUDO_FILE_SYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
}
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (new syscalls are unified)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_openat2_works = True


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _file_system(fd: int) -> str | None:
    """The name of the pseudo file system `fd` is on; None for any other (or when unknown)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first word
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return PSEUDO_FILE_SYSTEMS.get(ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF)


def _openat2_in_root(root: Path, path: str) -> int:
    """An O_PATH fd on `path` resolved by the kernel inside `root` (RESOLVE_IN_ROOT: absolute
    links and `..` stop at `root`, no magic links), race-free. OSError(ENOSYS) when the kernel
    (< 5.6) or a seccomp filter refuses openat2."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        for _ in range(3):  # EAGAIN: a rename raced with the lookup
            fd = _libc.syscall(
                ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                ctypes.c_char_p(os.fsencode(path.lstrip("/") or ".")),
                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
            )  # fmt: skip
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                break
        raise OSError(err, os.strerror(err))
    finally:
        os.close(dirfd)


def _open_path(path: Path, root: Path | None) -> int:
    """An O_PATH fd (nothing is really opened: a fifo cannot block, a device is not touched)."""
    global _openat2_works
    if root is not None and _openat2_works:
        try:
            return _openat2_in_root(root, str(path))
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _openat2_works = False
    if root is not None:  # old kernel: resolve by hand, then refuse a link at the last step
        return os.open(resolve_in_root(root, str(path)), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _type_problem(info: os.stat_result, fs: str | None, limit: int) -> ConfigReadError | None:
    if stat.S_ISDIR(info.st_mode):
        return ConfigReadError("is a directory, not a file", "type")
    if not stat.S_ISREG(info.st_mode):
        return ConfigReadError("is not a regular file (fifo, socket or device)", "type")
    if fs is not None:
        return ConfigReadError(
            f"is on {fs}, a pseudo file system; only regular files on disk are read", "pseudo"
        )
    if info.st_size > limit:
        return ConfigReadError(
            f"is {info.st_size} bytes, more than the {limit} bytes allowed", "size",
            size=info.st_size,
        )  # fmt: skip
    return None


def _os_error(exc: OSError) -> ConfigReadError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ConfigReadError("not found", "missing")
    if exc.errno == errno.ELOOP:
        return ConfigReadError(f"more than {MAX_SYMLINKS} symbolic links (a loop?)", "loop")
    if exc.errno == errno.ENXIO:  # a socket
        return ConfigReadError("is not a regular file (fifo, socket or device)", "type")
    return ConfigReadError(f"cannot be read: {exc.strerror}", "io")


def read_bytes_checked(path: Path, limit: int = MAX_FILE_BYTES, root: Path | None = None) -> bytes:
    """The bytes of `path` (inside `root` when given) if it is a regular file on a real file
    system of at most `limit` bytes; ConfigReadError (one line, with its `kind`) otherwise."""
    if "\0" in str(path) or "\0" in str(root or ""):
        raise ConfigReadError("cannot be read: the path holds a NUL byte", "io")
    try:
        pfd = _open_path(path, root)
    except ConfigReadError:
        raise
    except OSError as exc:
        raise _os_error(exc) from None
    try:
        info = os.fstat(pfd)
        problem = _type_problem(info, _file_system(pfd), limit)
        if problem is not None:
            raise problem
        try:  # reopen the very inode the checks were made on
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_error(exc) from None
    finally:
        os.close(pfd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise ConfigReadError("changed while being read", "io")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigReadError(f"cannot be read: {exc.strerror}", "io") from None
    finally:
        os.close(fd)
    if size > limit:
        raise ConfigReadError(f"is more than the {limit} bytes allowed", "size")
    return b"".join(chunks)


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
            raise ConfigReadError(f"more than {MAX_SYMLINKS} symbolic links (a loop?)", "loop")
        try:
            target = os.readlink(here)
        except OSError as exc:  # replaced meanwhile
            raise _os_error(exc) from None
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed([p for p in target.split("/") if p]))
    return root.joinpath(*done)


def read_small_file(path: Path, root: Path | None = None) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES (`path` inside `root` when given,
    never leaving it); ConfigReadError otherwise."""
    data = read_bytes_checked(path, MAX_FILE_BYTES, root)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigReadError(f"is not valid UTF-8 (byte {exc.start})", "text") from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), noting duplicate keys (PyYAML keeps the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[object, int]] = []
        self.node: yaml.Node | None = None

    def construct_object(self, node, deep=False):  # type: ignore[no-untyped-def]
        self.node = node
        return super().construct_object(node, deep)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode
                ):
                    continue
                key = self.construct_object(key_node)
                with contextlib.suppress(TypeError):
                    if key in seen:
                        self.duplicates.append((key, key_node.start_mark.line + 1))
                    seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> tuple[object, list[tuple[object, int]]]:
    """(document, [(duplicate key, line)]); ConfigReadError("malformed YAML: ...") on anything
    the loader refuses, including what PyYAML raises outside YAMLError (`!!int abc`, an integer
    of 5000 digits, nesting deeper than Python's recursion limit)."""
    try:
        loader = _Loader(text)  # the reader refuses NUL and other control characters here
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        problem = f"unacceptable character #x{exc.character:04x}"
        where = f" at line {line}, column {column}"
        raise ConfigReadError(
            f"malformed YAML: {problem}{where}", "yaml", problem=problem, where=where
        ) from None
    try:
        return loader.get_single_data(), loader.duplicates
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        problem = one_line(problem)
        raise ConfigReadError(
            f"malformed YAML: {problem}{where}", "yaml", problem=problem, where=where
        ) from None
    except RecursionError:
        problem = "nested too deeply"
        raise ConfigReadError(
            f"malformed YAML: {problem}", "yaml", problem=problem, where=""
        ) from None
    except Exception as exc:  # ValueError, AttributeError... from a tagged or huge scalar
        where = _loader_line(loader)
        problem = f"a value cannot be read ({brief(str(exc), 60)})"
        raise ConfigReadError(
            f"malformed YAML: {problem}{where}", "yaml", problem=problem, where=where
        ) from None
    finally:
        loader.dispose()


def _loader_line(loader: _Loader) -> str:
    node = loader.node
    return f" at line {node.start_mark.line + 1}" if node is not None else ""


def parse_yaml_mapping(text: str, duplicates: list[str] | None = None) -> Mapping[str, object]:
    """The YAML mapping in `text` ({} when empty). Each duplicate key adds a line to
    `duplicates` when given."""
    data, dups = load_yaml(text)
    if duplicates is not None:
        duplicates.extend(
            f"duplicate key {brief(key)} at line {line}; the last one is used" for key, line in dups
        )
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigReadError(f"YAML root is a {type(data).__name__}, not a mapping", "yaml")
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
    label = label_of(label)
    try:
        real = resolve_in_root(root, path)
        if _lstat_or_none(real) is None:
            log.notes.append(f"{prefix}{label}: not found; skipped")
            return None
        if real != resolve_plain(root, path):
            where = one_line(_inside(root, real))
            log.notes.append(f"{prefix}{label}: symbolic link followed to {where}")
        duplicates: list[str] = []
        data = parse_yaml_mapping(read_small_file(Path(path), root), duplicates)
        log.notes.extend(f"{prefix}{label}: {line}" for line in duplicates)
        return ConfigDoc(label, data)
    except ConfigReadError as exc:
        if exc.kind == "missing":  # gone since it was looked at
            log.notes.append(f"{prefix}{label}: not found; skipped")
        else:
            log.errors.append(f"{prefix}{label}: {exc}; ignored")
    except OSError as exc:
        log.errors.append(f"{prefix}{label}: cannot be read: {exc.strerror}; ignored")
    except ValueError as exc:  # a NUL byte in the path
        log.errors.append(f"{prefix}{label}: cannot be read: {label_of(str(exc))}; ignored")
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


MAX_PROC_BYTES = 1 << 16  # comm, cmdline: the kernel shows at most a page of cmdline anyway
MAX_ENVIRON_BYTES = 4 << 20  # an environment is at most a quarter of the stack rlimit


def read_proc_bytes(path: Path, limit: int) -> tuple[bytes, bool]:
    """(at most `limit` bytes of a /proc file, whether there was more). OSError when it cannot
    be read (the process is gone...); a fifo or a device (a fake or lying /proc) is an OSError
    too, found without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data[:limit], size > limit


def _read_proc_text(path: Path) -> str | None:
    try:
        return read_proc_bytes(path, MAX_PROC_BYTES)[0].decode("utf-8", "replace")
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
        names = [entry.name for entry in proc_root.iterdir()]
        pids = sorted(int(n) for n in names if n.isascii() and n.isdigit() and len(n) < 12)
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
    """The process's environment (NUL-separated NAME=value; undecodable bytes replaced). Bounded:
    past MAX_ENVIRON_BYTES one line says so and the variables read so far are used."""
    try:
        raw, more = read_proc_bytes(proc.proc_dir / "environ", MAX_ENVIRON_BYTES)
    except OSError as exc:
        log.errors.append(
            f"{proc.prefix}environment cannot be read: {one_line(exc.strerror or str(exc))};"
            " ignored"
        )
        return {}
    items = raw.split(b"\0")
    if more:
        items.pop()  # cut in the middle
        log.errors.append(
            f"{proc.prefix}environment is more than {MAX_ENVIRON_BYTES} bytes; only the "
            f"{len(items)} variables before that are used"
        )
    pairs = (item.decode("utf-8", "replace").split("=", 1) for item in items)
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def process_view(proc: AgentProcess, log: Log) -> ConfigView:
    base, path = _process_config_path(proc)
    label = label_of(str(resolve_plain(base, path)))
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
        except (ValueError, RecursionError):
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
                text = read_small_file(Path(path), root)
                version = _version_from_manifest(name, text)
                if version:
                    return one_line(version), one_line(str(resolve_plain(root, path)))
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


def _resolve_process(proc: AgentProcess, log: Log) -> Resolved | None:
    """The process's settings; None when it exited meanwhile (not an error: what it said while
    it was going away is dropped)."""
    own = Log()
    version = read_agent_version(proc.root, process_install_dirs(proc))
    resolved = _resolve(process_view(proc, own), version, own)
    if not proc.proc_dir.is_dir():
        return None
    log.notes.extend(own.notes)
    log.errors.extend(own.errors)
    return resolved


def _is_security_agent_file(path: Path) -> bool:
    return path.name == SECURITY_AGENT_FILE


def _load_local(files: Sequence[Path], log: Log) -> tuple[list[ConfigDoc], list[ConfigDoc]]:
    """(system-probe docs, security-agent docs) from the local files."""
    probe_docs, agent_docs = [], []
    for path in files:
        doc = load_config(Path("/"), str(path.absolute()), label_of(str(path)), log)
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
    results = [(proc, res) for proc in procs if (res := _resolve_process(proc, log)) is not None]
    procs = [proc for proc, _ in results]
    if procs:
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
