"""What the modules of `tcprio bundle` share: archive file names (safe, unique, for a file
of the node), JSON as bytes, human sizes, whether a path exists."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


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


def json_bytes(document: object) -> bytes:
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


def exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()
