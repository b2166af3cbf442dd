"""`tcprio bundle`: what support needs, in one tar.gz, secrets redacted. Nothing is uploaded.

Each collector returns a list of archive members. It runs guarded: an exception, a command
that fails, times out or is missing is recorded as `errors/<collector>.txt` and in
`manifest.json`, and the bundle is still written. The archive is built in memory, every member
goes through the redaction once more (defence in depth), the list of files is shown and
confirmed, then the archive is written to a temporary name next to its destination and renamed.

Read-only on the node: only `show` / `list` commands run (inside a namespace through
`nsenter --net`), and the scan is tcprio's own read-only scan.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import importlib
import importlib.metadata
import io
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from tcprio import __version__
from tcprio.bundle.redact import MASK, redact_bytes, redact_text
from tcprio.model import DatadogSettings, NetNamespace

EXIT_WRITTEN, EXIT_DECLINED, EXIT_CANNOT_PROMPT, EXIT_NOT_WRITTEN = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

PROG = "tcprio bundle"
SCHEMA_NAME = "tcprio.bundle"
SCHEMA_VERSION = 1
DEFAULT_FOLDER = Path("/var/tmp")
COMMAND_TIMEOUT = 10.0  # seconds, for each command
MAX_OUTPUT = 8 << 20  # bytes kept of each command's output
NETNS_WORKERS = 4
DATADOG_DEFAULT_FILES = (
    Path("/etc/datadog-agent/system-probe.yaml"),
    Path("/etc/datadog-agent/security-agent.yaml"),
    Path("/etc/datadog-agent/datadog.yaml"),
)
KERNEL_OPTIONS = (
    "CONFIG_BPF", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_NET_CLS_BPF",
    "CONFIG_NET_CLS_ACT", "CONFIG_NET_SCH_INGRESS", "CONFIG_NET_XGRESS", "CONFIG_NET_CLS_U32",
    "CONFIG_NET_CLS_MATCHALL", "CONFIG_NET_CLS_FLOWER", "CONFIG_NET_ACT_GACT",
    "CONFIG_NET_ACT_MIRRED", "CONFIG_DEBUG_INFO_BTF", "CONFIG_KPROBES", "CONFIG_FPROBE",
    "CONFIG_FUNCTION_TRACER", "CONFIG_BPF_EVENTS", "CONFIG_NETKIT", "CONFIG_CGROUP_BPF",
)  # fmt: skip
SYSCTLS = (
    "net.core.bpf_jit_enable",
    "kernel.unprivileged_bpf_disabled",
    "kernel.bpf_stats_enabled",
)
PYTHON_PACKAGES = ("pyroute2", "prometheus_client", "PyYAML")
TOOL_VERSIONS = (
    ("tc", "-V"),
    ("ip", "-V"),
    ("bpftool", "version"),
    ("nsenter", "--version"),
)

README = """\
tcprio support bundle
=====================

Made by `tcprio bundle` on {node} at {created}. Nothing was uploaded: whoever holds this file
decides where it goes. Secrets are redacted: values of keys naming a key, token, password,
secret or credential, 32/40-hex-digit keys, bearer tokens and URL passwords read `********`.

manifest.json           every file (path, size, collector, command), every collector (ok or
                        its error, duration)
errors/<collector>.txt  why a collector failed (the bundle is written anyway)
scan.json, scan.txt     tcprio's scan of the node (the --scan JSON and text report)
namespaces.json         the network namespaces found
namespaces/<name>/      per namespace: ip link, tc qdisc and filter (-s -d), bpftool net
bpf/                    bpftool prog show, bpftool link show (text and JSON)
tcprio/                 tcprio's configuration file and the effective configuration
logs/                   the tcprio service's recent journal
datadog/                the effective Datadog network settings (value and source) and the
                        Datadog configuration files
kernel/                 uname, /proc/version, os-release, relevant kernel options, sysctls
versions.txt            tcprio, Python, its packages and the tools
"""


# --- the pieces ------------------------------------------------------------------------------


class Item(NamedTuple):
    """One file of the archive as a collector returns it: (archive path, bytes), plus the
    command that produced it and what that command said on stderr, when it is an output."""

    path: str
    data: bytes
    command: str | None = None
    stderr: str | None = None


@dataclasses.dataclass(frozen=True)
class Collector:
    name: str  # also names errors/<name>.txt: [A-Za-z0-9._-] only
    collect: Callable[[], list[Item]]


class CollectorFailed(Exception):
    """A collector failed part-way: `items` still go into the bundle, `message` says why."""

    def __init__(self, message: str, items: Sequence[Item] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.items = list(items)


@dataclasses.dataclass(frozen=True)
class Member:
    path: str
    data: bytes
    collector: str
    command: str | None = None
    stderr: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    collector: str
    error: str | None
    duration_s: float
    files: int


@dataclasses.dataclass(frozen=True)
class Bundle:
    members: list[Member]  # manifest.json first
    outcomes: list[Outcome]

    @property
    def total_size(self) -> int:
        return sum(len(m.data) for m in self.members)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


# --- names -----------------------------------------------------------------------------------


def safe_name(name: str, limit: int = 80) -> str:
    """A file name made of [A-Za-z0-9._-] from any namespace or interface name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned[:limit] or "_"


def unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def archive_path_for_file(folder: str, path: Path) -> str:
    """`datadog/files` + `/etc/datadog-agent/x.yaml` -> `datadog/files/etc/datadog-agent/x.yaml`."""
    parts = [safe_name(p) for p in Path(os.path.abspath(path)).parts[1:] if p not in ("", "..")]
    return "/".join([folder, *parts])


def _to_bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")


def _json_bytes(document: object) -> bytes:
    return (json.dumps(document, indent=2, default=str) + "\n").encode()


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# --- commands --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CommandResult:
    shown: str  # the command as a person would type it
    stdout: bytes
    stderr: str
    error: str | None  # None: it ran and exited 0
    truncated: bool = False


def _first_line(text: str, limit: int = 300) -> str:
    line = next((line for line in text.splitlines() if line.strip()), "").strip()
    return line[:limit]


def _read_capped(f: Any, limit: int) -> tuple[bytes, bool]:
    f.seek(0)
    data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def run_command(
    argv: Sequence[str],
    shown: str | None = None,
    netns_fd: int | None = None,
    timeout: float = COMMAND_TIMEOUT,
    limit: int = MAX_OUTPUT,
) -> CommandResult:
    """Run a show/list command (inside the namespace open on `netns_fd`, through nsenter),
    bounded in time and output; never raises for the command's own failure."""
    shown = shown or " ".join(argv)
    program = shutil.which(argv[0])
    if program is None:
        return CommandResult(shown, b"", "", f"{argv[0]}: command not found in PATH")
    full = [program, *argv[1:]]
    if netns_fd is not None:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            return CommandResult(shown, b"", "", "nsenter: command not found in PATH")
        full = [nsenter, f"--net=/proc/self/fd/{netns_fd}", "--", *full]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(netns_fd,) if netns_fd is not None else (),
                start_new_session=True,  # killable as a group on timeout
            )
        except OSError as exc:
            return CommandResult(shown, b"", "", f"{argv[0]}: cannot run: {exc.strerror}")
        error = None
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            status, error = None, f"timed out after {timeout:g} s"
        except BaseException:  # Ctrl-C: leave nothing running behind
            _kill(proc)
            raise
        stdout, truncated = _read_capped(out, limit)
        stderr_bytes, _ = _read_capped(err, 64 << 10)
    stderr = stderr_bytes.decode("utf-8", "replace")
    if status:
        error = f"exit status {status}" + (f": {_first_line(stderr)}" if stderr.strip() else "")
    if truncated:
        stdout += f"\n[tcprio bundle: output cut at {limit} bytes]\n".encode()
    return CommandResult(shown, stdout, stderr, error, truncated)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- collecting ------------------------------------------------------------------------------


class Gather:
    """The items and the problems of one collector."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.problems: list[str] = []

    def add(self, path: str, data: bytes | str, command: str | None = None) -> None:
        self.items.append(Item(path, _to_bytes(data), command))

    def fail(self, problem: str) -> None:
        self.problems.append(problem)

    def command(
        self, path: str | None, argv: Sequence[str], netns: tuple[int, str] | None = None
    ) -> CommandResult:
        """Run `argv` (in the namespace (fd, path) when given); its output becomes `path`."""
        shown = " ".join(argv)
        if netns is not None:
            shown = f"nsenter --net={netns[1]} {shown}"
        result = run_command(argv, shown, netns_fd=netns[0] if netns else None)
        if path is not None and (result.error is None or result.stdout):
            stderr = result.stderr.strip() or None
            self.items.append(Item(path, result.stdout, result.shown, stderr))
        if result.error is not None:
            self.fail(f"{result.shown}: {result.error}")
        return result

    def done(self) -> list[Item]:
        if self.problems:
            raise CollectorFailed("\n".join(self.problems), self.items)
        return self.items


def run_collector(collector: Collector) -> tuple[list[Member], Outcome]:
    """Run one collector; whatever happens, its members and what went wrong."""
    started = time.monotonic()
    detail = ""
    try:
        items, error = collector.collect(), None
    except CollectorFailed as exc:
        items, error = exc.items, exc.message
    except Exception as exc:
        items, error = [], f"{type(exc).__name__}: {exc}"
        detail = traceback.format_exc()
    duration = time.monotonic() - started
    members = [Member(i.path, i.data, collector.name, i.command, i.stderr) for i in items]
    if error is not None:
        text = f"collector: {collector.name}\nerror:\n{error}\n"
        if detail:
            text += f"\nwhere (for tcprio's developers):\n{detail}"
        members.append(Member(f"errors/{collector.name}.txt", text.encode(), collector.name))
    return members, Outcome(collector.name, error, duration, len(members))


def run_collectors(
    collectors: Sequence[Collector], workers: int = 1
) -> list[tuple[list[Member], Outcome]]:
    """Results in the collectors' order; `workers` > 1 runs them on that many daemon threads
    (Ctrl-C returns at once: no new collector starts, none is waited for)."""
    if workers <= 1 or len(collectors) <= 1:
        return [run_collector(c) for c in collectors]
    results: list[tuple[list[Member], Outcome] | None] = [None] * len(collectors)
    todo: queue.SimpleQueue[tuple[int, Collector]] = queue.SimpleQueue()
    for index, collector in enumerate(collectors):
        todo.put((index, collector))

    def work() -> None:
        while True:
            try:
                index, collector = todo.get_nowait()
            except queue.Empty:
                return
            results[index] = run_collector(collector)

    threads = [
        threading.Thread(target=work, name=f"tcprio-bundle-{n}", daemon=True)
        for n in range(min(workers, len(collectors)))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        while not todo.empty():  # Ctrl-C: nothing new starts
            with contextlib.suppress(queue.Empty):
                todo.get_nowait()
        raise
    return [r for r in results if r is not None]


# --- the collectors --------------------------------------------------------------------------


class Context:
    """What several collectors share: the options, the namespaces, the Datadog settings."""

    def __init__(self, args: argparse.Namespace, discover: Callable[[], list[NetNamespace]]):
        self.args = args
        self.discover = discover
        self.namespaces: list[NetNamespace] | None = None  # None: discovery failed
        self._settings: DatadogSettings | None = None

    def datadog_files(self) -> list[Path]:
        from tcprio.datadog_config import DEFAULT_FILES

        dd = self.args.datadog_config
        return [Path(f) for f in dd] if dd else list(DEFAULT_FILES)

    def settings(self) -> DatadogSettings:
        """Resolved once, shared by the scan and the Datadog collector."""
        from tcprio.datadog_config import resolve_settings

        if self._settings is None:
            self._settings = resolve_settings(
                files=self.datadog_files(), scan_processes=not self.args.no_agent_process
            )
        return self._settings


def _namespace_json(ns: NetNamespace, folder: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = dataclasses.asdict(ns)
    if folder is not None:
        document["archive_folder"] = folder
    return document


def namespaces_collector(ctx: Context, folders: dict[tuple[int, int], str]) -> Collector:
    def collect() -> list[Item]:
        ctx.namespaces = ctx.discover()
        taken: set[str] = set()
        for ns in ctx.namespaces:
            folders[ns.key] = "namespaces/" + unique_name(safe_name(ns.name), taken)
        listing = [_namespace_json(ns, folders[ns.key]) for ns in ctx.namespaces]
        return [Item("namespaces.json", _json_bytes(listing))]

    return Collector("namespaces", collect)


def scan_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        from tcprio.report import render_text, scan_json
        from tcprio.scan import run_scan

        known = ctx.namespaces
        discover = ctx.discover if known is None else (lambda: list(known))
        scan = run_scan(discover=discover, settings=ctx.settings())
        items = [Item("scan.json", _json_bytes(scan_json(scan)))]
        items.append(Item("scan.txt", render_text(scan, color=False).encode()))
        return items

    return Collector("scan", collect)


def hooked_interfaces(qdiscs_json: bytes, links_json: bytes) -> list[tuple[str, tuple[str, ...]]]:
    """(interface, directions) to list filters on: those with a clsact (ingress and egress) or
    a legacy ingress qdisc (ingress); every interface when the qdisc list cannot be read."""
    found: dict[str, tuple[str, ...]] = {}
    try:
        for qdisc in json.loads(qdiscs_json or b"null"):
            kind, dev = qdisc.get("kind"), qdisc.get("dev")
            if kind == "clsact" and dev:
                found[dev] = ("ingress", "egress")
            elif kind == "ingress" and dev:
                found.setdefault(dev, ("ingress",))
        return sorted(found.items())
    except (ValueError, TypeError, AttributeError):
        pass
    links = json.loads(links_json)
    return sorted((link["ifname"], ("ingress", "egress")) for link in links)


def netns_collector(ns: NetNamespace, folder: str) -> Collector:
    def collect() -> list[Item]:
        from tcprio.kernel.namespaces import NamespaceGone, open_namespace

        g = Gather()
        g.add(f"{folder}/namespace.json", _json_bytes(_namespace_json(ns)))
        try:
            fd = open_namespace(ns)
        except NamespaceGone as exc:  # pods come and go: like the scan, not an error
            g.add(f"{folder}/vanished.txt", f"vanished before it could be read: {exc}\n")
            return g.done()
        except OSError as exc:
            g.fail(f"cannot open namespace {ns.name} ({ns.path}): {exc.strerror}")
            return g.done()
        try:
            _namespace_commands(g, (fd, ns.path), folder)
        finally:
            os.close(fd)
        return g.done()

    return Collector(f"netns-{folder.rpartition('/')[2]}", collect)


def _namespace_commands(g: Gather, netns: tuple[int, str], folder: str) -> None:
    links = g.command(f"{folder}/ip-link.json", ["ip", "-d", "-j", "link", "show"], netns)
    g.command(f"{folder}/ip-link.txt", ["ip", "-d", "link", "show"], netns)
    g.command(f"{folder}/tc-qdisc.txt", ["tc", "-s", "-d", "qdisc", "show"], netns)
    qdiscs = g.command(f"{folder}/tc-qdisc.json", ["tc", "-s", "-d", "-j", "qdisc", "show"], netns)
    try:
        hooks = hooked_interfaces(qdiscs.stdout if qdiscs.error is None else b"", links.stdout)
    except (ValueError, TypeError, KeyError) as exc:
        g.fail(f"cannot tell which interfaces have a clsact qdisc: {exc}")
        hooks = []
    taken: set[str] = set()
    for ifname, directions in hooks:
        safe_if = unique_name(safe_name(ifname), taken)
        for direction in directions:
            path = f"{folder}/tc-filter-{safe_if}-{direction}.txt"
            g.command(path, ["tc", "-s", "-d", "filter", "show", "dev", ifname, direction], netns)
    g.command(f"{folder}/bpftool-net.txt", ["bpftool", "net", "show"], netns)
    g.command(f"{folder}/bpftool-net.json", ["bpftool", "-j", "net", "show"], netns)


def bpf_collector() -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        for what in ("prog", "link"):
            g.command(f"bpf/bpftool-{what}.txt", ["bpftool", what, "show"])
            g.command(f"bpf/bpftool-{what}.json", ["bpftool", "-j", what, "show"])
        return g.done()

    return Collector("bpf", collect)


def _resolved(path: Path, root: Path = Path("/")) -> Path:
    """Where `path` really is, its symlinks resolved the way a process whose root is `root`
    sees them (a container's own /etc); ConfigReadError on a symlink loop."""
    from tcprio.datadog_config import resolve_in_root

    inside = os.path.abspath(path) if root == Path("/") else str(path)
    return resolve_in_root(root, inside)


def _read_config_file(path: Path, root: Path = Path("/")) -> str:
    """A configuration file's text (a regular file of at most 1 MiB, else ConfigReadError),
    opened by the kernel inside `root`: a link swapped in meanwhile cannot leave it."""
    from tcprio.datadog_config import read_small_file

    if root == Path("/"):
        return read_small_file(Path(os.path.abspath(path)))
    return read_small_file(Path(path), root=root)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _daemon_config_json(config: Any) -> dict[str, Any]:
    document = dataclasses.asdict(config)
    if document.get("basic_auth"):
        document["basic_auth"]["password"] = MASK  # read from password_file: never included
    return document


def tcprio_config_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        from tcprio.datadog_config import ConfigReadError
        from tcprio.service.config import ConfigError, load_config

        g = Gather()
        path = Path(ctx.args.config)
        status = "absent (the daemon uses its built-in defaults)"
        if _exists(path):
            try:
                g.add("tcprio/tcprio.yaml", redact_text(_read_config_file(path)))
                status = "included as tcprio/tcprio.yaml"
            except ConfigReadError as exc:
                status = f"unreadable: {exc}"
                g.fail(f"{path}: {exc}")
        effective: dict[str, Any] = {"file": str(path), "file_status": status}
        try:
            config = load_config(path, missing_ok=True)
            effective["config"] = _daemon_config_json(config)
        except ConfigError as exc:
            effective["config"] = None
            effective["problems"] = exc.problems
            g.fail("the configuration does not load:\n" + "\n".join(exc.problems))
        g.add("tcprio/effective-config.json", _json_bytes(effective))
        return g.done()

    return Collector("tcprio-config", collect)


def logs_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        argv = ["journalctl", "-u", "tcprio", "--no-pager", "-n", str(ctx.args.log_lines)]
        result = g.command("logs/journal-tcprio.txt", [*argv, "-o", "short-iso"])
        if result.error is None and "No journal files were found" in result.stderr:
            g.fail(f"{result.shown}: no journal on this node ({_first_line(result.stderr)})")
        return g.done()

    return Collector("logs", collect)


def _datadog_settings_json(settings: DatadogSettings) -> dict[str, Any]:
    from tcprio.report import datadog_json

    return datadog_json(settings)  # the same document as the "datadog" part of scan.json


@dataclasses.dataclass(frozen=True)
class _DatadogFile:
    path: Path  # as the agent names it
    folder: str  # where it goes in the archive
    root: Path = Path("/")  # the agent's root: /proc/<pid>/root for a running system-probe
    explicit: bool = False  # named with --datadog-config: absent is an error


def _datadog_files(ctx: Context) -> list[_DatadogFile]:
    """--datadog-config, else the usual files; plus each running system-probe's own file."""
    from tcprio.datadog_config import config_file_for, config_flag, find_system_probes

    named = ctx.args.datadog_config
    files = [_DatadogFile(Path(f), "datadog/files", explicit=True) for f in named or ()]
    if not named:
        files = [_DatadogFile(f, "datadog/files") for f in DATADOG_DEFAULT_FILES]
    if not ctx.args.no_agent_process:
        for proc in find_system_probes():
            path = config_file_for(config_flag(proc.argv))
            root = proc.root if path.startswith("/") else proc.proc_dir / "cwd"
            files.append(_DatadogFile(Path(path), f"datadog/process-{proc.pid}", root))
    return files


def _include_datadog_file(g: Gather, file: _DatadogFile) -> dict[str, Any]:
    from tcprio.datadog_config import ConfigReadError

    entry: dict[str, Any] = {"path": str(file.path)}
    if file.root != Path("/"):
        entry["read_through"] = str(file.root)
    try:
        real = _resolved(file.path, file.root)
        if not _exists(real):
            entry["status"] = "absent"
            if file.explicit:
                g.fail(f"{file.path}: does not exist")
            return entry
        text = _read_config_file(file.path, file.root)
    except ConfigReadError as exc:
        entry["status"] = f"unreadable: {exc}"
        g.fail(f"{file.path}: {exc}")
        return entry
    entry["archive_path"] = archive_path_for_file(file.folder, file.path)
    entry["status"] = "included"
    g.add(entry["archive_path"], redact_text(text))
    return entry


def datadog_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        try:
            g.add("datadog/settings.json", _json_bytes(_datadog_settings_json(ctx.settings())))
        except Exception as exc:
            g.fail(f"the effective settings: {type(exc).__name__}: {exc}")
        listing = [_include_datadog_file(g, file) for file in _datadog_files(ctx)]
        g.add("datadog/files.json", _json_bytes(listing))
        return g.done()

    return Collector("datadog", collect)


def kernel_config_sources(release: str | None = None) -> tuple[Path, ...]:
    return (Path(f"/boot/config-{release or platform.release()}"), Path("/proc/config.gz"))


def kernel_config_text(
    options: Iterable[str] = KERNEL_OPTIONS, sources: Sequence[Path] | None = None
) -> str:
    """The running kernel's configuration lines for `options`, from the first of `sources`
    that can be read; FileNotFoundError naming every source tried when none can."""
    sources = kernel_config_sources() if sources is None else sources
    for source in sources:
        try:
            raw = source.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw) if source.suffix == ".gz" else raw
        return _pick_options(text.decode("utf-8", "replace"), source, options)
    tried = " nor ".join(str(s) for s in sources)
    raise FileNotFoundError(f"no kernel configuration: neither {tried} can be read")


def _pick_options(text: str, source: Path, options: Iterable[str]) -> str:
    lines: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"(?:# )?(CONFIG_\w+)(?:=| is not set)", line):
            lines[m.group(1)] = line.strip()
    picked = [f"# from {source}"]
    picked += [lines.get(o, f"# {o}: not in this configuration") for o in options]
    return "\n".join(picked) + "\n"


def _sysctl_text() -> str:
    lines = []
    for name in SYSCTLS:
        path = Path("/proc/sys") / name.replace(".", "/")
        try:
            lines.append(f"{name} = {path.read_text().strip()}")
        except OSError as exc:
            lines.append(f"{name}: not readable ({exc.strerror})")
    return "\n".join(lines) + "\n"


def kernel_collector() -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        g.command("kernel/uname.txt", ["uname", "-a"])
        for path, source in (
            ("kernel/proc-version.txt", Path("/proc/version")),
            ("kernel/os-release.txt", Path("/etc/os-release")),
        ):
            try:
                g.add(path, source.read_bytes())
            except OSError as exc:
                g.fail(f"{source}: {exc.strerror}")
        try:
            g.add("kernel/config.txt", kernel_config_text())
        except (OSError, EOFError) as exc:  # absent, or a damaged config.gz
            g.fail(str(exc))
        g.add("kernel/sysctl.txt", _sysctl_text())
        return g.done()

    return Collector("kernel", collect)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bcc_version() -> str:
    try:
        module = importlib.import_module("bcc")
    except Exception as exc:  # ImportError, or libbcc failing to load
        return f"not importable ({type(exc).__name__}: {exc})"
    return str(getattr(module, "__version__", "unknown version"))


def versions_collector() -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        lines = [
            f"tcprio {__version__}",
            f"python {platform.python_version()} ({sys.executable})",
            *(f"{name} {_package_version(name)}" for name in PYTHON_PACKAGES),
            f"bcc {_bcc_version()}",
            "",
        ]
        for argv in TOOL_VERSIONS:
            result = g.command(None, argv)
            output = result.stdout.decode("utf-8", "replace").strip() or result.stderr.strip()
            lines.append(f"$ {result.shown}")
            lines.append(output if result.error is None else f"[failed: {result.error}]")
        g.add("versions.txt", "\n".join(lines) + "\n")
        return g.done()

    return Collector("versions", collect)


# --- assembling ------------------------------------------------------------------------------


def collect_bundle(ctx: Context, node: str, created: str) -> Bundle:
    readme = README.format(node=node, created=created).encode()
    members: list[Member] = [Member("README.txt", readme, "bundle")]
    outcomes: list[Outcome] = []

    def take(results: Iterable[tuple[list[Member], Outcome]]) -> None:
        for result_members, outcome in results:
            members.extend(result_members)
            outcomes.append(outcome)

    folders: dict[tuple[int, int], str] = {}
    take([run_collector(namespaces_collector(ctx, folders))])
    take([run_collector(scan_collector(ctx))])
    per_namespace = [netns_collector(ns, folders[ns.key]) for ns in ctx.namespaces or ()]
    take(run_collectors(per_namespace, workers=NETNS_WORKERS))
    singles = [
        bpf_collector(),
        tcprio_config_collector(ctx),
        logs_collector(ctx),
        datadog_collector(ctx),
        kernel_collector(),
        versions_collector(),
    ]
    take(run_collectors(singles))
    members = final_redaction(_unique_paths(members))
    manifest = _manifest(ctx.args, members, outcomes, node, created)
    return Bundle([manifest, *members], outcomes)


def _unique_paths(members: list[Member]) -> list[Member]:
    taken: set[str] = {"manifest.json"}
    unique = []
    for m in members:
        path = m.path
        if path in taken:
            stem, dot, ext = path.rpartition(".")
            base = stem if dot and "/" not in ext else path
            suffix = f".{ext}" if dot and "/" not in ext else ""
            n = 2
            while f"{base}-{n}{suffix}" in taken:
                n += 1
            path = f"{base}-{n}{suffix}"
        taken.add(path)
        unique.append(dataclasses.replace(m, path=path))
    return unique


def final_redaction(members: list[Member]) -> list[Member]:
    """Every member, whatever its collector, goes through the redaction once more."""
    return [
        dataclasses.replace(
            m,
            data=redact_bytes(m.data, is_json=m.path.endswith(".json")),
            command=redact_text(m.command) if m.command else None,
            stderr=redact_text(m.stderr) if m.stderr else None,
        )
        for m in members
    ]


def _manifest(
    args: argparse.Namespace,
    members: list[Member],
    outcomes: list[Outcome],
    node: str,
    created: str,
) -> Member:
    files = []
    for m in members:
        entry: dict[str, Any] = {"path": m.path, "size": len(m.data), "collector": m.collector}
        if m.command:
            entry["command"] = m.command
        if m.stderr:
            entry["stderr"] = m.stderr[:2000]
        files.append(entry)
    document = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "tcprio_version": __version__,
        "node": node,
        "kernel": platform.release(),
        "created_at": created,
        "options": {
            "config": args.config,
            "netns": args.netns or [],
            "datadog_config": args.datadog_config or [],
            "no_agent_process": bool(args.no_agent_process),
            "log_lines": args.log_lines,
        },
        "files": files,  # every member but this manifest
        "collectors": [
            {
                "name": o.collector,
                "ok": o.error is None,
                "error": redact_text(o.error) if o.error else None,
                "duration_seconds": round(o.duration_s, 3),
                "files": o.files,
            }
            for o in outcomes
        ],
    }
    data = redact_bytes(_json_bytes(document), is_json=True)
    return Member("manifest.json", data, "bundle")


# --- showing, asking, writing ----------------------------------------------------------------


def default_output(node: str, now: datetime) -> Path:
    return DEFAULT_FOLDER / f"tcprio-bundle-{safe_name(node)}-{now:%Y%m%dT%H%M%SZ}.tar.gz"


def output_path(requested: str | None, node: str, now: datetime) -> Path:
    """Where to write: --output (a folder gets the default file name), else /var/tmp/..."""
    default = default_output(node, now)
    if requested is None:
        return default
    path = Path(requested).absolute()  # the path printed at the end is one to copy
    return path / default.name if path.is_dir() else path


class NotWritable(Exception):
    pass


def check_writable(path: Path) -> None:
    """Fail early (before collecting and asking) when `path` cannot be written."""
    if _exists(path):
        raise NotWritable(f"{path} already exists: choose another --output")
    folder = path.parent
    if not folder.is_dir():
        raise NotWritable(f"cannot write {path}: {folder} is not an existing folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tcprio-bundle-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise NotWritable(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def _top_folder(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or "tcprio-bundle"
    return safe_name(name)


def write_archive(path: Path, bundle: Bundle, now: datetime) -> None:
    """Write the tar.gz to a temporary file in the same folder (mode 0600), then rename it:
    a failure, or Ctrl-C, leaves no half-written archive."""
    top = _top_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), 0o600)
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for member in bundle.members:
                    info = tarfile.TarInfo(f"{top}/{member.path}")
                    info.size = len(member.data)
                    info.mode = 0o600
                    info.mtime = int(now.timestamp())
                    info.uname = info.gname = "root"
                    tar.addfile(info, io.BytesIO(member.data))
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def listing(bundle: Bundle, full: bool) -> str:
    lines = [
        f"tcprio bundle: {len(bundle.members)} files, {human_size(bundle.total_size)} "
        "before compression, secrets redacted:"
    ]
    if full:
        width = max(len(human_size(len(m.data))) for m in bundle.members)
        lines += [f"  {human_size(len(m.data)):>{width}}  {m.path}" for m in bundle.members]
    for outcome in bundle.failed:
        error = _first_line(redact_text(outcome.error or ""), 160)
        lines.append(
            f"  ! {outcome.collector} failed: {error} (see errors/{outcome.collector}.txt)"
        )
    return "\n".join(lines) + "\n"


def ask(question: str) -> bool:
    """y / yes (any case) is yes; anything else, or end of input, is no."""
    sys.stdout.write(question)
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not answer:
        sys.stdout.write("\n")
    return answer.strip().lower() in ("y", "yes")


def run_bundle(args: argparse.Namespace, discover: Callable[[], list[NetNamespace]]) -> int:
    """Collect, show, ask (unless --yes), write. Exit status: 0 written, 1 declined, 2 cannot
    ask (not on a terminal, no --yes), 3 not written (the output, I/O), 130 interrupted."""
    try:
        return _run_bundle(args, discover)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\n{PROG}: interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # collectors are guarded: this is a bug, still one line
        print(f"{PROG}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN


def _run_bundle(args: argparse.Namespace, discover: Callable[[], list[NetNamespace]]) -> int:
    if not args.yes and not sys.stdin.isatty():
        print(
            f"{PROG}: not on a terminal and --yes not given: refusing to wait for a confirmation",
            file=sys.stderr,
        )
        return EXIT_CANNOT_PROMPT
    now = datetime.now(UTC).replace(microsecond=0)
    node = socket.gethostname()
    path = output_path(args.output, node, now)
    try:
        check_writable(path)
    except NotWritable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    print(f"{PROG}: collecting (read-only; nothing is uploaded)...", file=sys.stderr, flush=True)
    bundle = collect_bundle(Context(args, discover), node, now.isoformat())
    sys.stdout.write(listing(bundle, full=not args.yes))
    if not args.yes and not ask(f"Write this bundle to {path}? [y/N] "):
        print("Not written.")
        return EXIT_DECLINED
    try:
        write_archive(path, bundle, now)
    except OSError as exc:
        print(f"{PROG}: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    print(f"Bundle written: {path}")
    print(
        f"({human_size(path.stat().st_size)}, mode 0600. Nothing was uploaded: attach it to your "
        "support case yourself.)"
    )
    return EXIT_WRITTEN
