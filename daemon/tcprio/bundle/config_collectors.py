"""The collectors of configuration: tcprio's own file and its effective configuration; the
effective Datadog network settings and the Datadog configuration files, each read the way
the agent sees it (a running system-probe's own file, through its root). Secrets are
redacted as they are read."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from tcprio.bundle.collect import Collector, Context, Gather, Item
from tcprio.bundle.common import archive_path_for_file, exists, json_bytes
from tcprio.bundle.redact import MASK, redact_text
from tcprio.model import DatadogSettings

DATADOG_DEFAULT_FILES = (
    Path("/etc/datadog-agent/system-probe.yaml"),
    Path("/etc/datadog-agent/security-agent.yaml"),
    Path("/etc/datadog-agent/datadog.yaml"),
)


def _resolved(path: Path, root: Path = Path("/")) -> Path:
    """Where `path` really is, its symlinks resolved the way a process whose root is `root`
    sees them (a container's own /etc); ConfigReadError on a symlink loop."""
    from tcprio.kernel.files import resolve_in_root

    inside = os.path.abspath(path) if root == Path("/") else str(path)
    return resolve_in_root(root, inside)


def _read_config_file(path: Path, root: Path = Path("/")) -> str:
    """A configuration file's text (a regular file of at most 1 MiB, else ConfigReadError),
    opened by the kernel inside `root`: a link swapped in meanwhile cannot leave it."""
    from tcprio.kernel.files import read_small_file

    if root == Path("/"):
        return read_small_file(Path(os.path.abspath(path)))
    return read_small_file(Path(path), root=root)


def _daemon_config_json(config: Any) -> dict[str, Any]:
    document = dataclasses.asdict(config)
    if document.get("basic_auth"):
        document["basic_auth"]["password"] = MASK  # read from password_file: never included
    if document.get("web") and document["web"].get("basic_auth_users"):  # bcrypt hashes
        document["web"]["basic_auth_users"] = [
            [user, MASK] for user, _ in document["web"]["basic_auth_users"]
        ]
    return document


def tcprio_config_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        from tcprio.inputs import ConfigReadError
        from tcprio.service.config import ConfigError, load_config

        g = Gather()
        path = Path(ctx.args.config)
        status = "absent (the daemon uses its built-in defaults)"
        if exists(path):
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
        g.add("tcprio/effective-config.json", json_bytes(effective))
        return g.done()

    return Collector("tcprio-config", collect)


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
    from tcprio.kernel.datadog_agent import config_file_for, config_flag, find_system_probes

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
    from tcprio.inputs import ConfigReadError

    entry: dict[str, Any] = {"path": str(file.path)}
    if file.root != Path("/"):
        entry["read_through"] = str(file.root)
    try:
        real = _resolved(file.path, file.root)
        if not exists(real):
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
            g.add("datadog/settings.json", json_bytes(_datadog_settings_json(ctx.settings())))
        except Exception as exc:
            g.fail(f"the effective settings: {type(exc).__name__}: {exc}")
        listing = [_include_datadog_file(g, file) for file in _datadog_files(ctx)]
        g.add("datadog/files.json", json_bytes(listing))
        return g.done()

    return Collector("datadog", collect)
