"""Reading files safely: regular files only, bounded, non-blocking, no pseudo file systems, and
inside a process's root (`openat2(RESOLVE_IN_ROOT)`) when one is given.

Every configuration file tcprio reads goes through here: the daemon's own, Datadog's (local or
through a system-probe's /proc/<pid>/root), the bundle's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections import deque
from pathlib import Path

from tcprio.inputs import ConfigReadError

MAX_FILE_BYTES = 1 << 20
MAX_SYMLINKS = 40


# --- reading files safely --------------------------------------------------------------------
#
# Policy, for the daemon's own configuration, the Datadog files and the files read through a
# system-probe's /proc/<pid>/root: symbolic links are followed (inside that root: a container's
# link to /etc/... names its own /etc, never the host's), and only a regular file on a real file
# system is read: a directory, a fifo, a socket or a device is refused before it is opened (so a
# fifo never blocks and no device is touched), so is a file on proc, sysfs and the other pseudo
# file systems (their sizes lie and some reads have effects), and reading stops after the limit.


PSEUDO_FILE_SYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
}
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (new syscalls are unified)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_openat2_works = True


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _file_system(fd: int) -> str | None:
    """The name of the pseudo file system `fd` is on; None for any other (or when unknown)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first word
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return PSEUDO_FILE_SYSTEMS.get(ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF)


def _openat2_in_root(root: Path, path: str) -> int:
    """An O_PATH fd on `path` resolved by the kernel inside `root` (RESOLVE_IN_ROOT: absolute
    links and `..` stop at `root`, no magic links), race-free. OSError(ENOSYS) when the kernel
    (< 5.6) or a seccomp filter refuses openat2."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        for _ in range(3):  # EAGAIN: a rename raced with the lookup
            fd = _libc.syscall(
                ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                ctypes.c_char_p(os.fsencode(path.lstrip("/") or ".")),
                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
            )  # fmt: skip
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                break
        raise OSError(err, os.strerror(err))
    finally:
        os.close(dirfd)


def _open_path(path: Path, root: Path | None) -> int:
    """An O_PATH fd (nothing is really opened: a fifo cannot block, a device is not touched)."""
    global _openat2_works
    if root is not None and _openat2_works:
        try:
            return _openat2_in_root(root, str(path))
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _openat2_works = False
    if root is not None:  # old kernel: resolve by hand, then refuse a link at the last step
        return os.open(resolve_in_root(root, str(path)), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _type_problem(info: os.stat_result, fs: str | None, limit: int) -> ConfigReadError | None:
    if stat.S_ISDIR(info.st_mode):
        return ConfigReadError("is a directory, not a file", "type")
    if not stat.S_ISREG(info.st_mode):
        return ConfigReadError("is not a regular file (fifo, socket or device)", "type")
    if fs is not None:
        return ConfigReadError(
            f"is on {fs}, a pseudo file system; only regular files on disk are read", "pseudo"
        )
    if info.st_size > limit:
        return ConfigReadError(
            f"is {info.st_size} bytes, more than the {limit} bytes allowed", "size",
            size=info.st_size,
        )  # fmt: skip
    return None


def _os_error(exc: OSError) -> ConfigReadError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ConfigReadError("not found", "missing")
    if exc.errno == errno.ELOOP:
        return ConfigReadError(f"more than {MAX_SYMLINKS} symbolic links (a loop?)", "loop")
    if exc.errno == errno.ENXIO:  # a socket
        return ConfigReadError("is not a regular file (fifo, socket or device)", "type")
    return ConfigReadError(f"cannot be read: {exc.strerror}", "io")


def read_up_to(fd: int, count: int) -> bytes:
    """At most `count` bytes from `fd`, reading until end of file or `count` (callers ask for one
    byte more than they allow, to tell a file at the limit from a larger one)."""
    chunks, size = [], 0
    while size < count:
        chunk = os.read(fd, count - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_bytes_checked(path: Path, limit: int = MAX_FILE_BYTES, root: Path | None = None) -> bytes:
    """The bytes of `path` (inside `root` when given) if it is a regular file on a real file
    system of at most `limit` bytes; ConfigReadError (one line, with its `kind`) otherwise."""
    if "\0" in str(path) or "\0" in str(root or ""):
        raise ConfigReadError("cannot be read: the path holds a NUL byte", "io")
    try:
        pfd = _open_path(path, root)
    except ConfigReadError:
        raise
    except OSError as exc:
        raise _os_error(exc) from None
    try:
        info = os.fstat(pfd)
        problem = _type_problem(info, _file_system(pfd), limit)
        if problem is not None:
            raise problem
        try:  # reopen the very inode the checks were made on
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_error(exc) from None
    finally:
        os.close(pfd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise ConfigReadError("changed while being read", "io")
        data = read_up_to(fd, limit + 1)
    except OSError as exc:
        raise ConfigReadError(f"cannot be read: {exc.strerror}", "io") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigReadError(f"is more than the {limit} bytes allowed", "size")
    return data


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def resolve_in_root(root: Path, path: str) -> Path:
    """Resolve `path` as the process whose root is `root` would, symlinks included, without ever
    leaving `root` (an absolute link target restarts at `root`, `..` stops at it)."""
    todo = deque(part for part in path.split("/") if part)
    done: list[str] = []
    links = 0
    while todo:
        part = todo.popleft()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        info = lstat_or_none(here)
        if info is None or not stat.S_ISLNK(info.st_mode):
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise ConfigReadError(f"more than {MAX_SYMLINKS} symbolic links (a loop?)", "loop")
        try:
            target = os.readlink(here)
        except OSError as exc:  # replaced meanwhile
            raise _os_error(exc) from None
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed([p for p in target.split("/") if p]))
    return root.joinpath(*done)


def read_small_file(path: Path, root: Path | None = None) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES (`path` inside `root` when given,
    never leaving it); ConfigReadError otherwise."""
    data = read_bytes_checked(path, MAX_FILE_BYTES, root)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigReadError(f"is not valid UTF-8 (byte {exc.start})", "text") from None


def stat_in_root(root: Path, path: str) -> os.stat_result:
    """The stat of `path` (symbolic links followed) as the process whose root is `root` sees
    it, never leaving `root`; OSError or ConfigReadError when it cannot be reached."""
    fd = _open_path(Path(path), root)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def resolve_plain(root: Path, path: str) -> Path:
    return root.joinpath(*(part for part in path.split("/") if part))


# --- /proc files -----------------------------------------------------------------------------


def read_proc_bytes(path: Path, limit: int) -> tuple[bytes, bool]:
    """(at most `limit` bytes of a /proc file, whether there was more). OSError when it cannot
    be read (the process is gone...); a fifo or a device (a fake or lying /proc) is an OSError
    too, found without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = read_up_to(fd, limit + 1)
    finally:
        os.close(fd)
    return data[:limit], len(data) > limit
