"""Make Debian's BCC able to compile sched_cls programs on a kernel that ships no headers.

BCC compiles C at run time against kernel headers, looked for where BCC users expect them:
BCC_KERNEL_SOURCE when set, else /lib/modules/$(uname -r)/build. Debian splits a kernel's headers
into a `-common` tree (/lib/modules/$(uname -r)/source) and an `-amd64` tree (`build`, which has
no include/linux); BCC finds that pair itself (with `build` and `source` both there it compiles in
`source` and adds `build`'s generated headers), so BCC_KERNEL_SOURCE is left alone then. A kernel
without headers of its own (the development VM) borrows the newest Debian pair under /usr/src:
BCC_KERNEL_SOURCE wants one folder, so we build a symlink farm of both trees and point it there.
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


MODULES_ROOT = Path("/lib/modules")


def _running_kernel_build_dir(modules: Path = MODULES_ROOT) -> Path | None:
    """/lib/modules/$(uname -r)/build when it is a whole header tree (include/linux in it)."""
    build = modules / platform.release() / "build"
    return build if (build / "include" / "linux").is_dir() else None


def _running_kernel_split_trees(modules: Path = MODULES_ROOT) -> tuple[Path, Path] | None:
    """(source, build) of the running kernel when its headers are split Debian's way."""
    kernel = modules / platform.release()
    source, build = (kernel / "source").resolve(), (kernel / "build").resolve()
    if (source / "include" / "linux").is_dir() and (build / "include").is_dir():
        return source, build
    return None


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


def running_kernel_headers() -> Path | None:
    """The running kernel's own headers where BCC looks by itself (the tree with include/linux),
    or None."""
    build = _running_kernel_build_dir()
    if build is not None:
        return build
    split = _running_kernel_split_trees()
    return split[0] if split is not None else None


def kernel_source_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """A folder BCC can use as BCC_KERNEL_SOURCE, creating the symlink farm when needed."""
    build = _running_kernel_build_dir()
    if build is not None:
        return build
    trees = _running_kernel_split_trees() or _debian_header_trees()
    if trees is None:
        raise HeadersMissing(
            f"no kernel headers for {platform.release()} and no Debian header trees in "
            f"{HEADERS_ROOT}: install linux-headers-amd64"
        )
    return _farm_for(trees, cache)


def _farm_for(trees: tuple[Path, Path], cache: Path) -> Path:
    common, arch = trees
    farm = cache / arch.name
    if not (farm / "include" / "linux").is_dir() or not (farm / "arch").is_dir():
        _build_farm(common, arch, farm)
    return farm


def prepare_bcc_environment(cache: Path = DEFAULT_CACHE) -> Path:
    """Set BCC_KERNEL_SOURCE (unless the caller already did, or BCC finds the running kernel's
    headers itself) and return the folder in use (the one with include/linux)."""
    preset = os.environ.get("BCC_KERNEL_SOURCE")
    if preset:
        return Path(preset)
    own = running_kernel_headers()
    if own is not None:
        return own
    folder = kernel_source_dir(cache)
    os.environ["BCC_KERNEL_SOURCE"] = str(folder)
    return folder
