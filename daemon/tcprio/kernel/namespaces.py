"""Discover the node's network namespaces, and run code inside one of them.

A namespace is found through the host's own (pid 1), the named ones (bind mounts in
/run/netns, /var/run/netns, /var/run/docker/netns) and every process's /proc/<pid>/ns/net;
it is identified by the (device, inode) of its nsfs file, so each is listed once.

Entering a namespace uses setns(2) on the calling thread only: sockets created inside stay
bound to that namespace, and bpf(2) calls resolve interface indexes there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tcprio.kernel.containers import Bundle, ContainerRoots, NodeContainers, read_containers
from tcprio.model import NetNamespace

CLONE_NEWNET = 0x40000000
NAMED_NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"), Path("/var/run/docker/netns"))

_libc = ctypes.CDLL(None, use_errno=True)

_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER_ID = re.compile(r"(?:^|[/-])(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})")


class NamespaceGone(Exception):
    """The namespace vanished (or its path now names another one) before we could enter it."""


@dataclass(frozen=True)
class CgroupIdentity:
    container: str | None
    pod_uid: str | None


def parse_cgroup(text: str) -> CgroupIdentity:
    """Container id and pod UID from a /proc/<pid>/cgroup (cgroup v1 or v2, cgroupfs or systemd)."""
    container = pod = None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        if pod is None and (m := _POD_UID.search(path)):
            pod = m.group(1).replace("_", "-")
        if container is None and (m := _CONTAINER_ID.search(path)):
            container = m.group(1)
    return CgroupIdentity(container, pod)


def _nsfs_key(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _namespace_key(path: str | Path, nsfs: int | None) -> tuple[int, int] | None:
    """The (dev, ino) of a namespace file; None when it is gone or is not a namespace at all
    (a /proc that lies: a plain file, a directory, a fifo where ns/net should be)."""
    key = _nsfs_key(path)
    if key is None or (nsfs is not None and key[0] != nsfs):
        return None
    return key


def _proc_namespace_key(path: str, nsfs: int | None) -> tuple[int, int] | None:
    """`_namespace_key` of a process's ns/net, at half the cost where it can: procfs shows the
    namespace's inode in the link's text ("net:[4026531840]") without the nsfs lookup a stat
    does, and every namespace file lives on the one nsfs. Anything else (a /proc that is not
    procfs) gets the full check."""
    if nsfs is not None:
        try:
            text = os.readlink(path)
        except (OSError, ValueError):
            return None
        if text.startswith("net:[") and text.endswith("]") and text[5:-1].isdigit():
            return (nsfs, int(text[5:-1]))
    return _namespace_key(path, nsfs)


def _read_bytes(path: Path, limit: int) -> bytes | None:
    """At most `limit` bytes of a /proc file; None when it cannot be read (the process is gone)
    or is not a regular file (a fake or lying /proc: a fifo must not block, a device is not
    read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _printable(text: str, limit: int = 256) -> str:
    """A name built from what a process says about itself: one line, bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text[:limit]


def _read_text(path: Path, limit: int = 65536) -> str:
    data = _read_bytes(path, limit)
    return data.decode("utf-8", "replace") if data is not None else ""


def _hostname_from_environ(proc_dir: Path) -> str | None:
    """Kubernetes sets HOSTNAME to the pod name in every container's environment."""
    data = _read_bytes(proc_dir / "environ", 1 << 20)
    if data is None:
        return None
    for entry in data.split(b"\0"):
        if entry.startswith(b"HOSTNAME="):
            return _printable(entry[9:].decode("utf-8", "replace")) or None
    return None


def _cgroup_naming(identity: CgroupIdentity, pod_name: str | None) -> str | None:
    if identity.pod_uid is None:
        return None
    return "cgroup pod UID, HOSTNAME" if pod_name else "cgroup pod UID"


def _process_namespace(proc_dir: Path, nsfs: int | None = None) -> NetNamespace | None:
    pid = int(proc_dir.name)
    key = _namespace_key(proc_dir / "ns" / "net", nsfs)
    if key is None:
        return None
    identity = parse_cgroup(_read_text(proc_dir / "cgroup"))
    comm = _printable(_read_text(proc_dir / "comm", 64).strip(), 64)
    pod_name = _hostname_from_environ(proc_dir) if identity.pod_uid else None
    if identity.pod_uid:
        name = f"pod:{pod_name or identity.pod_uid}"
    elif identity.container:
        name = f"container:{identity.container[:12]}"
    else:
        name = f"pid:{pid}" + (f" ({comm})" if comm else "")
    return NetNamespace(
        inode=key[1],
        dev=key[0],
        name=name,
        path=str(proc_dir / "ns" / "net"),
        source="process",
        pid=pid,
        container=identity.container,
        pod=pod_name or identity.pod_uid,
        pod_uid=identity.pod_uid,
        named_by=_cgroup_naming(identity, pod_name),
    )


def nsfs_device() -> int | None:
    """The device number of nsfs, the file system behind every namespace file."""
    key = _nsfs_key("/proc/thread-self/ns/net")
    return key[0] if key else None


def _distinct_folders(dirs: Iterable[Path]) -> Iterator[tuple[Path, list[str], os.stat_result]]:
    """Each existing folder of `dirs` with its sorted entries and its stat, once per folder:
    /var/run is usually a link to /run, and its netns folder need not be read twice."""
    seen: set[tuple[int, int]] = set()
    for folder in dirs:
        try:
            st = os.stat(folder)
        except (OSError, ValueError):
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            yield folder, sorted(os.listdir(folder)), st
        except OSError:
            continue


# A netns folder's namespaces, kept while the folder is unchanged (the same files, and its
# mtime, which moves with every file created or removed): a node with hundreds of pinned pod
# namespaces need not stat each of them at every sweep. Kept only when every file was a
# namespace (a file `ip netns add` has not mounted yet is looked at again), when the folder had
# not changed for a second (timestamps are coarse: two changes in one tick show one mtime), and
# for at most NAMED_CACHE_TTL_S (a namespace mounted over another's file changes no mtime).
NAMED_CACHE_TTL_S = 60.0
QUIET_FOLDER_NS = 1_000_000_000
_named_cache: dict[tuple[int, int], tuple[int, tuple[str, ...], float, tuple[NetNamespace, ...]]]
_named_cache = {}


def _folder_namespaces(folder: Path, entries: list[str], nsfs: int | None) -> list[NetNamespace]:
    source = "docker" if "docker" in folder.parts else "named"
    found = []
    for entry in entries:
        path = f"{folder}/{entry}"
        key = _nsfs_key(path)
        if key is None or (nsfs is not None and key[0] != nsfs):
            continue
        found.append(NetNamespace(
            inode=key[1], dev=key[0], name=entry, path=path, source=source, netns=entry
        ))  # fmt: skip
    return found


def _named_namespaces(dirs: Iterable[Path]) -> Iterator[NetNamespace]:
    """Bind-mounted namespace files. `ip netns add` creates the file before it mounts the
    namespace on it: a file that is not on nsfs yet is skipped (the next sweep finds it)."""
    nsfs = nsfs_device()
    now = time.monotonic()
    for folder, entries, st in _distinct_folders(dirs):
        ident, names = (st.st_dev, st.st_ino), tuple(entries)
        cached = _named_cache.get(ident)
        fresh = cached is not None and now - cached[2] < NAMED_CACHE_TTL_S
        if fresh and cached[:2] == (st.st_mtime_ns, names):  # type: ignore[index]
            yield from cached[3]  # type: ignore[index]
            continue
        found = _folder_namespaces(folder, entries, nsfs)
        quiet = time.time_ns() - st.st_mtime_ns > QUIET_FOLDER_NS
        if len(found) == len(entries) and quiet:
            _named_cache[ident] = (st.st_mtime_ns, names, now, tuple(found))
        else:
            _named_cache.pop(ident, None)
        yield from found


def unmounted_named_files(dirs: Iterable[Path]) -> list[Path]:
    """Files in the netns folders that are not namespaces yet: `ip netns add` is half-way."""
    nsfs = nsfs_device()
    found = []
    for folder, entries, _ in _distinct_folders(dirs):
        for entry in entries:
            key = _nsfs_key(folder / entry)
            if key is None or (nsfs is not None and key[0] != nsfs):
                found.append(folder / entry)
    return found


def _pids(proc: Path) -> list[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isascii() and n.isdigit() and len(n) < 12)


def _host_namespace(proc: Path, nsfs: int | None = None) -> NetNamespace | None:
    """pid 1's namespace; where pid 1 hides it (a sandbox), the one tcprio runs in.

    tcprio runs in the host's network namespace (a systemd service, or a hostNetwork pod).
    """
    for path, source in (
        (proc / "1" / "ns" / "net", "host"),
        (proc / "self" / "ns" / "net", "self"),
    ):
        key = _namespace_key(path, nsfs)
        if key is not None:
            pid = 1 if source == "host" else os.getpid()
            return NetNamespace(
                inode=key[1], dev=key[0], name="host", path=str(path), source=source, pid=pid
            )
    return None


def discover_namespaces(
    proc: Path = Path("/proc"),
    named_dirs: Iterable[Path] = NAMED_NETNS_DIRS,
    containers: NodeContainers | None = None,
    roots: ContainerRoots | None = None,
) -> list[NetNamespace]:
    """Every network namespace of the node: host first, then named ones, then the rest by pid;
    a pod's named by its pod (`containers`: the runtimes' bundles, read from `roots` when
    not given)."""
    containers = containers if containers is not None else read_containers(roots)
    return name_pods(_discover(proc, named_dirs), containers, proc)


def _discover(proc: Path, named_dirs: Iterable[Path]) -> list[NetNamespace]:
    found: dict[tuple[int, int], NetNamespace] = {}
    nsfs = nsfs_device()
    host = _host_namespace(proc, nsfs)
    if host is not None:
        found[host.key] = host
    for ns in _named_namespaces(named_dirs):
        found.setdefault(ns.key, ns)
    # One readlink per process, on a plain string path: a node runs thousands of processes
    # and the daemon sweeps them every few seconds (pathlib would cost more than the call).
    root = str(proc)
    for pid in _pids(proc):
        key = _proc_namespace_key(f"{root}/{pid}/ns/net", nsfs)
        if key is None:
            continue
        known = found.get(key)
        if known is not None:
            if known.pid is None:  # a named namespace: remember a process living in it
                found[key] = replace(known, pid=pid)
            continue
        ns = _process_namespace(proc / str(pid), nsfs)
        if ns is not None:
            found[ns.key] = ns
    return list(found.values())


# --- pods ------------------------------------------------------------------------------------
#
# containerd and CRI-O pin each pod's network namespace on a file (/var/run/netns/cni-<uuid>)
# that the pod sandbox's OCI spec names. A namespace is a pod's when that file is the namespace
# (same device and inode), or else when a process inside it belongs to a container of the pod
# (its cgroup holds the container id or the pod UID).


def _canonical(path: str) -> str:
    path = os.path.normpath(path)
    return "/run/" + path.removeprefix("/var/run/") if path.startswith("/var/run/") else path


def _sandboxes_by_netns(containers: NodeContainers) -> dict[object, Bundle]:
    """(dev, inode) and canonical path of each sandbox's pinned namespace -> the sandbox."""
    found: dict[object, Bundle] = {}
    for sandbox in containers.sandboxes:
        path = sandbox.netns_path
        if not path or not path.startswith("/") or path.startswith("/proc/"):
            continue  # none, or a process's (/proc/self/ns/net would be tcprio's own)
        found.setdefault(_canonical(path), sandbox)
        key = _nsfs_key(path)
        if key is not None:
            found.setdefault(key, sandbox)
    return found


def _pod_of_identity(identity: CgroupIdentity, containers: NodeContainers) -> Bundle | None:
    bundle = containers.by_id.get(identity.container or "")
    if bundle is not None:
        sandbox = containers.sandbox_of(bundle)
        return sandbox if sandbox is not None else bundle if bundle.pod_name else None
    return containers.sandbox_by_uid.get(identity.pod_uid or "")


def _as_pod(ns: NetNamespace, bundle: Bundle, how: str) -> NetNamespace:
    return replace(
        ns,
        name=f"pod:{bundle.pod}",
        pod=bundle.pod_name,
        pod_namespace=bundle.pod_namespace,
        pod_uid=bundle.pod_uid or ns.pod_uid,
        named_by=f"{bundle.label}: {how}",
    )


def _identity_inside(ns: NetNamespace, proc: Path) -> CgroupIdentity | None:
    """The container and pod of a process in `ns` (for a named one: the one found in it)."""
    if ns.source == "process":
        return CgroupIdentity(ns.container, ns.pod_uid)
    if ns.pid is not None and ns.source not in ("host", "self"):
        return parse_cgroup(_read_text(proc / str(ns.pid) / "cgroup"))
    return None


def _named_pod(
    ns: NetNamespace, containers: NodeContainers, by_netns: dict, proc: Path
) -> NetNamespace:
    if ns.source in ("host", "self"):  # a hostNetwork pod shares it: it stays the host's
        return ns
    sandbox = by_netns.get(ns.key) or by_netns.get(_canonical(ns.path))
    if sandbox is not None and sandbox.pod_name:
        return _as_pod(ns, sandbox, "the pod sandbox's network namespace")
    identity = _identity_inside(ns, proc)
    if identity is None:
        return ns
    ns = replace(ns, container=ns.container or identity.container)
    bundle = _pod_of_identity(identity, containers)
    if bundle is not None and bundle.pod_name:
        return _as_pod(ns, bundle, "the cgroup of a process inside")
    if ns.source == "process" or not identity.pod_uid:
        return ns  # a process's namespace is named from its cgroup and HOSTNAME already
    pod_name = _hostname_from_environ(proc / str(ns.pid))
    return replace(
        ns,
        name=f"pod:{pod_name or identity.pod_uid}",
        pod=pod_name or identity.pod_uid,
        pod_uid=identity.pod_uid,
        named_by=_cgroup_naming(identity, pod_name),
    )


def _unique_names(namespaces: list[NetNamespace]) -> list[NetNamespace]:
    """Names are the report's keys: two pods' namespaces with one name (a pod being recreated,
    two pods with one HOSTNAME) each get their pinned file's name or their inode appended."""
    counts: dict[str, int] = {}
    for ns in namespaces:
        counts[ns.name] = counts.get(ns.name, 0) + 1
    return [
        replace(ns, name=f"{ns.name} ({ns.netns or f'inode {ns.inode}'})")
        if counts[ns.name] > 1 and ns.source not in ("host", "self")
        else ns
        for ns in namespaces
    ]


def name_pods(
    namespaces: list[NetNamespace], containers: NodeContainers, proc: Path = Path("/proc")
) -> list[NetNamespace]:
    """`namespaces` with each pod's named `pod:<kubernetes namespace>/<pod name>` (the raw
    pinned name stays in `netns`), each name unique."""
    by_netns = _sandboxes_by_netns(containers)
    namespaces = [_named_pod(ns, containers, by_netns, proc) for ns in namespaces]
    return _unique_names(namespaces)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def open_namespace(ns: NetNamespace) -> int:
    """An fd on the namespace, checked to still be the same one (pids get reused)."""
    try:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError) as exc:
        raise NamespaceGone(f"{ns.name}: {ns.path} is gone") from exc
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ns.key:
        os.close(fd)
        raise NamespaceGone(f"{ns.name}: {ns.path} now names another namespace")
    return fd


@contextlib.contextmanager
def _entered_fd(open_target: Callable[[], int]) -> Iterator[None]:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = open_target()
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def entered(ns: NetNamespace) -> contextlib.AbstractContextManager[None]:
    """Run the body with the calling thread inside `ns`; always come back home."""
    return _entered_fd(lambda: open_namespace(ns))


def entered_path(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """Like `entered`, for a namespace known only by a path (/run/netns/<name>)."""
    return _entered_fd(lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))


def current_namespace_key() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)
