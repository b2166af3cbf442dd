"""The effective Datadog Workload Protection network settings on this node, each labelled with
its source: `kernel/datadog_agent.py` finds them, `analysis/datadog_settings.py` (whose docstring
says what system-probe does with the keys) applies the agent's precedence.

When a `system-probe` process runs on the node, its own environment (/proc/<pid>/environ) and its
own config file, read through /proc/<pid>/root, are the truth. Otherwise the local files and the
given environment are used. Bad input never raises: it becomes one line in `errors` and the value
falls back to the next source.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from tcprio.analysis.datadog_settings import (
    WP_ENABLED_KEY,
    ConfigView,
    Resolved,
    note_ingress,
    note_wp,
    resolve,
    resolve_wp_enabled,
    show,
)
from tcprio.inputs import ConfigDoc, Log, label_of
from tcprio.kernel.datadog_agent import (
    DEFAULT_FILES,
    DEFAULT_INSTALL_DIR,
    SECURITY_AGENT_FILE,
    AgentProcess,
    find_system_probes,
    load_config,
    process_config_path,
    process_install_dirs,
    read_agent_version,
    read_environ,
)
from tcprio.kernel.files import resolve_plain
from tcprio.model import DatadogSettings


def process_view(proc: AgentProcess, log: Log) -> ConfigView:
    base, path = process_config_path(proc)
    label = label_of(str(resolve_plain(base, path)))
    doc = load_config(base, path, label, log, proc.prefix)
    docs = (doc,) if doc else ()
    return ConfigView(docs, read_environ(proc, log), proc.prefix)


# --- putting it together ---------------------------------------------------------------------


def _resolve_process(proc: AgentProcess, log: Log) -> Resolved | None:
    """The process's settings; None when it exited meanwhile (not an error: what it said while
    it was going away is dropped)."""
    own = Log()
    version = read_agent_version(proc.root, process_install_dirs(proc))
    resolved = resolve(process_view(proc, own), version, own)
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
    resolved = resolve(ConfigView(tuple(probe_docs), environ), version, log)
    if agent_docs:
        wp = resolve_wp_enabled(ConfigView(tuple(agent_docs), environ), log)
        log.notes.append(
            f"Workload Protection for security-agent ({WP_ENABLED_KEY}): "
            f"{show(wp.value)} ({wp.source})"
        )
    return resolved


COMPARED = ("enabled", "classifier_priority", "classifier_handle", "ingress_enabled")


def _describe(pid: int, resolved: Resolved) -> str:
    parts = ", ".join(f"{name}={show(resolved.settings[name].value)}" for name in COMPARED)
    return f"pid {pid}: {parts}"


def _note_disagreement(results: list[tuple[AgentProcess, Resolved]], log: Log) -> None:
    first = results[0][1].settings
    if all(all(r.settings[n].value == first[n].value for n in COMPARED) for _, r in results):
        return
    detail = "; ".join(_describe(proc.pid, res) for proc, res in results)
    log.notes.append(
        f"system-probe processes disagree (pid {results[0][0].pid} is reported): {detail}"
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
    note_wp(resolved, log)
    note_ingress(resolved, log)
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
