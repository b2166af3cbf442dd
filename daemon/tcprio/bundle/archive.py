"""Assembling `tcprio bundle`'s archive and writing it. The collectors run (the namespaces
first, each namespace's own on a few threads), every member gets a unique path and goes
through the redaction once more (defence in depth), `manifest.json` lists them all. The
archive is built in memory, then written to a temporary name next to its destination and
renamed."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import platform
import tarfile
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from tcprio import __version__
from tcprio.bundle.collect import Context, Member, Outcome, run_collector, run_collectors
from tcprio.bundle.collectors import (
    bpf_collector,
    kernel_collector,
    logs_collector,
    namespaces_collector,
    netns_collector,
    scan_collector,
    versions_collector,
)
from tcprio.bundle.common import json_bytes, safe_name
from tcprio.bundle.config_collectors import datadog_collector, tcprio_config_collector
from tcprio.bundle.redact import redact_bytes, redact_text

SCHEMA_NAME = "tcprio.bundle"
SCHEMA_VERSION = 1
NETNS_WORKERS = 4

README = """\
tcprio support bundle
=====================

Made by `tcprio bundle` on {node} at {created}. Nothing was uploaded: whoever holds this file
decides where it goes. Secrets are redacted: values of keys naming a key, token, password,
secret or credential, 32/40-hex-digit keys, bearer tokens and URL passwords read `********`.

manifest.json           every file (path, size, collector, command), every collector (ok or
                        its error, duration)
errors/<collector>.txt  why a collector failed (the bundle is written anyway)
scan.json, scan.txt     tcprio's scan of the node (the scan JSON and the --detail text report)
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
    data = redact_bytes(json_bytes(document), is_json=True)
    return Member("manifest.json", data, "bundle")


# --- writing ---------------------------------------------------------------------------------


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
