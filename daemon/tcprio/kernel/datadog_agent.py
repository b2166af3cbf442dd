"""The Datadog agent on this node: its running `system-probe` processes (command line,
executable, environment, read through /proc), its config files (read within a root) and the
version of its install.

Raw data only: which setting wins is `tcprio.analysis.datadog_settings`, and `tcprio.datadog`
joins the two.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from tcprio.inputs import (
    ConfigDoc,
    ConfigReadError,
    Log,
    label_of,
    one_line,
    parse_version,
    parse_yaml_mapping,
)
from tcprio.kernel.containers import NodeContainers, read_containers
from tcprio.kernel.files import (
    lstat_or_none,
    read_proc_bytes,
    read_small_file,
    resolve_in_root,
    resolve_plain,
    stat_in_root,
)
from tcprio.kernel.versions import cgroup_container, split_image

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
PROCESS_NAME = "system-probe"


# --- config files ----------------------------------------------------------------------------


def load_config(root: Path, path: str, label: str, log: Log, prefix: str = "") -> ConfigDoc | None:
    """Read `path` as seen from `root`. Missing: a note. Unusable: one error line. Either way
    None, so the file contributes nothing. `prefix` names the process it belongs to."""
    label = label_of(label)
    try:
        real = resolve_in_root(root, path)
        if lstat_or_none(real) is None:
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


def _inside(root: Path, real: Path) -> str:
    rel = real.relative_to(root)
    return "/" + str(rel) if str(rel) != "." else "/"


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
        if not cmdline:  # gone meanwhile, a zombie, or in the middle of an exec: next time
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


def process_config_path(proc: AgentProcess) -> tuple[Path, str]:
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


# --- agent version ---------------------------------------------------------------------------


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


# --- is a system-probe Datadog's? ------------------------------------------------------------

EXE_SUFFIX = f"/embedded/bin/{PROCESS_NAME}"


def is_agent_image(image: str) -> bool:
    """Datadog's agent image (gcr.io/datadoghq/agent, datadog/agent, public.ecr.aws/datadog/agent
    and mirrors of them), by its repository's last two parts."""
    parts = split_image(image)[0].split("/")
    return len(parts) >= 2 and parts[-2] in ("datadog", "datadoghq") and parts[-1] == "agent"


@dataclass(frozen=True)
class Verification:
    """Whether a process named system-probe is Datadog's own, and why, in one line."""

    process: AgentProcess
    verified: bool
    reason: str
    install_dir: str | None = None
    config_path: str | None = None


def effective_uid(proc_dir: Path) -> int | None:
    """The effective uid from /proc/<pid>/status (as seen from tcprio's user namespace)."""
    text = _read_proc_text(proc_dir / "status") or ""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                return int(fields[2])
    return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _executable_problem(proc: AgentProcess) -> str | None:
    """None when the running executable is <install>/embedded/bin/system-probe in its root."""
    if proc.exe is None:
        return "its executable cannot be read"
    if not proc.exe.endswith(EXE_SUFFIX):
        return f"its executable {one_line(proc.exe)} is not <install>{EXE_SUFFIX}"
    try:
        running = os.stat(proc.proc_dir / "exe")
        on_disk = stat_in_root(proc.root, proc.exe)
    except (OSError, ConfigReadError):
        return f"its executable {one_line(proc.exe)} is gone from its file system"
    if not _same_file(running, on_disk):
        return f"its executable {one_line(proc.exe)} was replaced since it started"
    return None


def container_image(proc: AgentProcess, containers: NodeContainers | None = None) -> str | None:
    """The image of the container the process runs in: the container id in its cgroup, then
    that container's bundle (containerd or CRI-O, `kernel/containers.py`). None outside one."""
    container = cgroup_container(proc.proc_dir.parent, proc.pid)
    if container is None:
        return None
    containers = containers if containers is not None else read_containers()
    bundle = containers.by_id.get(container)
    return bundle.image if bundle is not None else None


def _install_proof(
    proc: AgentProcess, install_dir: str, containers: NodeContainers | None
) -> str | None:
    """One line naming what shows a Datadog install, or None."""
    found = read_agent_version(proc.root, [install_dir])
    if found is not None:
        version, _ = found
        return f"Datadog agent {version} installed in {one_line(install_dir)}"
    image = container_image(proc, containers)
    if image and is_agent_image(image):
        return f"container image {one_line(image)}"
    return None


def verify_process(proc: AgentProcess, containers: NodeContainers | None = None) -> Verification:
    """Datadog's own system-probe: the running executable is <install>/embedded/bin/system-probe
    of a Datadog install (its version manifest in the process's root, or a Datadog agent image
    for the container it runs in, from `containers`), it runs as root
    (effective uid 0) and its config file can be read."""
    problem = _executable_problem(proc)
    if problem:
        return Verification(proc, False, problem)
    install_dir = (proc.exe or "").removesuffix(EXE_SUFFIX) or "/"
    proof = _install_proof(proc, install_dir, containers)
    if proof is None:
        return Verification(
            proc, False,
            f"no Datadog install (version manifest) in {install_dir}, and no Datadog agent image",
        )  # fmt: skip
    uid = effective_uid(proc.proc_dir)
    if uid != 0:
        shown = "unknown" if uid is None else str(uid)
        return Verification(proc, False, f"it runs as uid {shown}, not root")
    base, path = process_config_path(proc)
    label = label_of(str(resolve_plain(base, path)))
    own = Log()
    if load_config(base, path, label, own) is None:
        why = (own.errors or own.notes or ["unknown"])[-1].removeprefix(f"{label}: ")
        why = why.removesuffix("; skipped").removesuffix("; ignored")
        return Verification(proc, False, f"its config file {label} cannot be used ({why})")
    return Verification(
        proc, True, f"{one_line(proc.exe or '')}, {proof}, uid 0, config {label}",
        install_dir, label,
    )  # fmt: skip
