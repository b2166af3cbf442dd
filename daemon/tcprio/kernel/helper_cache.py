"""A per-boot cache of the kernel helper names read from /proc/kallsyms.

Reading and filtering kallsyms costs about 80 ms, a fifth of a scan of a 200-pod node, and gives
the same answer until the machine reboots or a module comes or goes. The names are kept in
/run/tcprio (a tmpfs: gone at reboot), keyed by the boot id and the loaded modules, readable by
root only (kernel addresses defeat KASLR). This is the only file `tcprio --scan` writes.
A cache that is missing, stale, unreadable or not root's own is ignored; failing to write one
is not an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

CACHE_DIR = Path("/run/tcprio")
CACHE_NAME = "kernel-helpers.json"
# Bumped whenever what is kept from kallsyms changes: an older file is then ignored.
CACHE_FORMAT = 2
MAX_CACHE_BYTES = 4 << 20


def kernel_fingerprint(proc: Path = Path("/proc")) -> str | None:
    """Boot id and loaded modules (name, size, address): what the names depend on."""
    try:
        boot_id = (proc / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    try:
        modules = (proc / "modules").read_text().splitlines()
    except FileNotFoundError:  # a kernel built without modules: nothing can come or go
        modules = []
    except OSError:
        return None
    # name size refcount deps state address: the refcount changes all the time, the rest not
    kept = sorted(" ".join(f[:2] + f[5:6]) for f in (line.split() for line in modules) if f)
    return hashlib.sha256("\n".join([boot_id, *kept]).encode()).hexdigest()


def _trusted(path: Path) -> bool:
    info = path.stat()
    return stat.S_ISREG(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o022


def read_cache(fingerprint: str, cache_dir: Path = CACHE_DIR) -> dict[int, str] | None:
    path = cache_dir / CACHE_NAME
    try:
        if not _trusted(path) or path.stat().st_size > MAX_CACHE_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    if data.get("format") != CACHE_FORMAT:
        return None
    helpers = data.get("helpers")
    if not isinstance(helpers, dict):
        return None
    try:
        return {int(imm): str(name) for imm, name in helpers.items()}
    except (TypeError, ValueError):
        return None


def write_cache(fingerprint: str, helpers: Mapping[int, str], cache_dir: Path = CACHE_DIR) -> None:
    with contextlib.suppress(OSError):
        cache_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = cache_dir / f".{CACHE_NAME}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "fingerprint": fingerprint, "helpers": helpers}, f)
        os.replace(tmp, cache_dir / CACHE_NAME)
