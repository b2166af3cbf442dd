"""The effective Datadog Workload Protection network settings on this node, each labelled with
its source: `kernel/datadog_agent.py` finds them, `analysis/datadog_settings.py` (whose docstring
says what system-probe does with the keys) applies the agent's precedence.

When a `system-probe` process runs on the node, its own environment (/proc/<pid>/environ) and its
own config file, read through /proc/<pid>/root, are the truth. Otherwise the local files and the
given environment are used. Bad input never raises: it becomes one line in `errors` and the value
falls back to the next source.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
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
from tcprio.kernel.containers import NodeContainers
from tcprio.kernel.datadog_agent import (
    DEFAULT_FILES,
    DEFAULT_INSTALL_DIR,
    SECURITY_AGENT_FILE,
    AgentProcess,
    Verification,
    find_system_probes,
    load_config,
    process_config_path,
    process_install_dirs,
    read_agent_version,
    read_environ,
    verify_process,
)
from tcprio.kernel.files import resolve_plain
from tcprio.model import DatadogSettings, Setting

Verifier = Callable[[AgentProcess], Verification]


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


@dataclass(frozen=True)
class Local:
    """The local files' settings, and what of Datadog's was found on the node (one line each)."""

    resolved: Resolved
    wp_enabled: Setting
    found: tuple[str, ...]


def _resolve_local(
    files: Sequence[Path], environ: Mapping[str, str], host_root: Path, log: Log
) -> Local:
    probe_docs, agent_docs = _load_local(files, log)
    version = read_agent_version(host_root, [DEFAULT_INSTALL_DIR])
    resolved = resolve(ConfigView(tuple(probe_docs), environ), version, log)
    wp = resolved.settings["wp_enabled"]
    if agent_docs:
        agent_wp = resolve_wp_enabled(ConfigView(tuple(agent_docs), environ), log)
        log.notes.append(
            f"Workload Protection for security-agent ({WP_ENABLED_KEY}): "
            f"{show(agent_wp.value)} ({agent_wp.source})"
        )
        wp = agent_wp if wp.source == "default" else wp
    found = [f"Datadog config file {doc.label} found" for doc in (*probe_docs, *agent_docs)]
    if version is not None:
        found.append(f"Datadog agent {version[0]} installed ({version[1]})")
    return Local(resolved, wp, tuple(found))


COMPARED = ("enabled", "classifier_priority", "classifier_handle", "ingress_enabled")


def _describe(pid: int, resolved: Resolved) -> str:
    parts = ", ".join(f"{name}={show(resolved.settings[name].value)}" for name in COMPARED)
    return f"pid {pid}: {parts}"


def _detecting(resolved: Resolved) -> bool:
    """Its Workload Protection and network detection are both on."""
    s = resolved.settings
    return s["wp_enabled"].value is True and s["enabled"].value is True


def _verified(procs: Sequence[AgentProcess], verify: Verifier, log: Log) -> list[Verification]:
    """The candidates that are Datadog's; one note for each one that is not."""
    verified = []
    for proc in procs:
        check = verify(proc)
        if check.verified:
            verified.append(check)
        else:
            log.notes.append(
                f"{proc.prefix}not taken as Datadog's system-probe: {check.reason}; its "
                "settings are not used"
            )
    return verified


def _choose(
    results: list[tuple[Verification, Resolved]],
) -> tuple[list[tuple[Verification, Resolved]], str]:
    """The verified processes with the one reported first, and one line saying why: the
    lowest pid among those running detection, else the lowest pid."""
    ordered = sorted(results, key=lambda r: (not _detecting(r[1]), r[0].process.pid))
    check, resolved = ordered[0]
    if len(results) == 1:
        why = "the only verified system-probe"
    elif _detecting(resolved):
        why = f"of {len(results)} verified, the lowest pid with network detection running"
    else:
        why = f"of {len(results)} verified, the lowest pid (none runs network detection)"
    return ordered, f"system-probe pid {check.process.pid} taken ({why}): {check.reason}"


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
    verify: Verifier | None = None,
    containers: NodeContainers | None = None,
) -> DatadogSettings:
    """The settings the running agent uses, each labelled with its source.

    A running system-probe process that is verified to be Datadog's (`verify`, see
    `kernel.datadog_agent.verify_process`: its environment and config file) is the truth; one
    that is not is named in a note and never used. Without one, `files` and `environ` (default:
    this process's environment) are used. `host_root` is where the locally installed agent's
    version manifest is looked for; `only_pids` limits the process scan (tests, or a caller that
    already picked the process). `containers`: the runtimes' bundles, whose image names can
    prove an agent container (read from their default places when needed and None).
    """
    if verify is None:
        verify = functools.partial(verify_process, containers=containers)
    log = Log()
    env = os.environ if environ is None else environ
    procs = find_system_probes(proc_root, only_pids) if scan_processes else []
    verified = _verified(procs, verify, log)
    results = [(check, res) for check in verified if (res := _resolve_process(check.process, log))]
    if results:
        results, taken = _choose(results)
        resolved = results[0][1]
        log.notes.insert(
            0,
            f"source of truth: {len(results)} running system-probe process(es), "
            f"pid {', '.join(str(c.process.pid) for c, _ in results)} (local files and this "
            "environment are not used); " + taken,
        )
        _note_disagreement([(c.process, r) for c, r in results], log)
        settings = _settings(resolved, log, resolved.settings["wp_enabled"])
        found, evidence = "process", (taken,)
    else:
        local = _resolve_local(files, env, host_root, log)
        resolved = local.resolved
        log.notes.insert(
            0, "no verified system-probe running: using the local files and environment"
        )
        found, evidence = ("files" if local.found else "none"), local.found
        settings = _settings(resolved, log, local.wp_enabled)
    note_wp(resolved, log)
    note_ingress(resolved, log)
    notes = tuple(dict.fromkeys(log.notes))
    return replace(settings, notes=notes, found=found, found_evidence=evidence)


def _settings(resolved: Resolved, log: Log, wp_enabled: Setting) -> DatadogSettings:
    s = resolved.settings
    return DatadogSettings(
        wp_enabled=wp_enabled,
        enabled=s["enabled"],
        classifier_priority=s["classifier_priority"],
        classifier_handle=s["classifier_handle"],
        ingress_enabled=s["ingress_enabled"],
        raw_packet_enabled=s["raw_packet_enabled"],
        raw_classifier_handle=s["raw_classifier_handle"],
        agent_version=resolved.version,
        agent_version_source=resolved.version_source,
        notes=tuple(dict.fromkeys(log.notes)),
        errors=tuple(dict.fromkeys(log.errors)),
    )
