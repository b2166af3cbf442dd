"""Make Debian's BCC able to compile sched_cls programs on a kernel that ships no headers.

BCC compiles C at run time against kernel headers. Debian's `linux-headers-amd64` splits them
into a `-common` and an `-amd64` tree; BCC wants one folder, so we build a symlink farm of both
(see shared platform notes) and point BCC_KERNEL_SOURCE at it.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

HEADERS_ROOT = Path("/usr/src")
DEFAULT_CACHE = Path("/var/cache/tcprio/kernel-headers")


class HeadersMissing(RuntimeError):
    """No usable kernel headers: BCC cannot compile programs on this machine."""


def _running_kernel_build_dir() -> Path | None:
    build = Path("/lib/modules") / platform.release() / "build"
    return build if (build / "include").is_dir() else None


def _debian_header_trees() -> tuple[Path, Path] | None:
    """The newest (-common, -amd64) pair of Debian header trees under /usr/src."""
    arch_trees = sorted(HEADERS_ROOT.glob("linux-headers-*-amd64"))
    for arch_tree in reversed(arch_trees):
        common = arch_tree.with_name(arch_tree.name.removesuffix("-amd64") + "-common")
        if common.is_dir():
            return common, arch_tree
    return None


def _build_farm(common: Path, arch: Path, farm: Path) -> None:
    tmp = farm.with_name(farm.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for tree in (common, arch):
        for src in tree.rglob("*"):
            if src.is_dir() and not src.is_symlink():
                continue
            dst = tmp / src.relative_to(tree)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src.resolve() if src.is_symlink() else src)
    shutil.rmtree(farm, ignore_errors=True)
    tmp.rename(farm)


def kernel_source_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """A folder BCC can use as BCC_KERNEL_SOURCE, creating the symlink farm when needed."""
    build = _running_kernel_build_dir()
    if build is not None:
        return build
    trees = _debian_header_trees()
    if trees is None:
        raise HeadersMissing(
            f"no kernel headers for {platform.release()} and no Debian header trees in "
            f"{HEADERS_ROOT}: install linux-headers-amd64"
        )
    common, arch = trees
    farm = cache / arch.name
    if not (farm / "include" / "linux").is_dir() or not (farm / "arch").is_dir():
        _build_farm(common, arch, farm)
    return farm


def prepare_bcc_environment(cache: Path = DEFAULT_CACHE) -> Path:
    """Set BCC_KERNEL_SOURCE (unless the caller already did) and return the folder in use."""
    preset = os.environ.get("BCC_KERNEL_SOURCE")
    if preset:
        return Path(preset)
    folder = kernel_source_dir(cache)
    os.environ["BCC_KERNEL_SOURCE"] = str(folder)
    return folder
