"""Namespace discovery against the real kernel, cross-checked with lsns."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio.kernel.namespaces import (
    NamespaceGone,
    current_namespace_key,
    discover_namespaces,
    entered,
    parse_cgroup,
)
from tests.kernel import netns
from tests.timing import wait_until

CONTAINER = "a" * 8 + "0123456789abcdef" * 3 + "b" * 8
POD = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def test_parse_cgroup_v2_systemd_kubernetes():
    pod = POD.replace("-", "_")
    text = (
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{pod}.slice/cri-containerd-{CONTAINER}.scope\n"
    )
    identity = parse_cgroup(text)
    assert identity.pod_uid == POD
    assert identity.container == CONTAINER


def test_parse_cgroup_v1_cgroupfs_and_docker():
    v1 = f"12:pids:/kubepods/besteffort/pod{POD}/{CONTAINER}\n11:cpu:/\n"
    assert parse_cgroup(v1) == parse_cgroup(v1.replace("12:pids", "3:memory"))
    assert parse_cgroup(v1).pod_uid == POD and parse_cgroup(v1).container == CONTAINER
    docker = f"0::/system.slice/docker-{CONTAINER}.scope\n"
    assert parse_cgroup(docker).container == CONTAINER and parse_cgroup(docker).pod_uid is None
    assert parse_cgroup("0::/\n").container is None


def running_sleep_in(pid: int, netns_inode: int) -> bool:
    """Whether process `pid` is `sleep` (exec'd) in the network namespace `netns_inode`."""
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    return comm == "sleep" and os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode


@contextlib.contextmanager
def process_in_new_netns(env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A `sleep` in a fresh, unnamed network namespace (unshare -n)."""
    proc = subprocess.Popen(["unshare", "-n", "sleep", "60"], env=env)
    try:
        host = os.stat("/proc/self/ns/net").st_ino
        wait_until(
            lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino != host,
            "unshare never switched namespace",
            poll_s=0.01,
        )
        yield proc
    finally:
        proc.kill()
        proc.wait()


def lsns_net_inodes() -> set[int]:
    out = subprocess.run(
        ["lsns", "-t", "net", "-J", "-o", "NS"], capture_output=True, text=True, check=True
    )
    return {int(row["ns"]) for row in json.loads(out.stdout)["namespaces"]}


def test_discovery_finds_host_named_and_unnamed_namespaces_once_each():
    with netns("disc") as named, process_in_new_netns() as proc:
        in_named = subprocess.Popen(["ip", "netns", "exec", named.name, "sleep", "60"])
        try:
            # both have become `sleep`: in the named namespace, in the new one
            named_inode = os.stat(named.path).st_ino
            wait_until(lambda: running_sleep_in(in_named.pid, named_inode), "ip netns exec")
            new_inode = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
            wait_until(lambda: running_sleep_in(proc.pid, new_inode), "unshare -n sleep")
            found = discover_namespaces()
        finally:
            in_named.kill()
            in_named.wait()
    keys = [ns.key for ns in found]
    assert len(keys) == len(set(keys)), "a namespace was listed twice"
    assert found[0].name == "host" and found[0].key == current_namespace_key()
    by_name = {ns.name: ns for ns in found}
    assert by_name[named.name].source == "named"
    assert by_name[named.name].pid == in_named.pid
    unnamed = [ns for ns in found if ns.pid == proc.pid]
    assert len(unnamed) == 1
    assert unnamed[0].name == f"pid:{proc.pid} (sleep)"
    assert unnamed[0].source == "process"


def test_discovery_agrees_with_lsns():
    with netns("lsns"), process_in_new_netns():
        ours = {ns.inode for ns in discover_namespaces()}
        theirs = lsns_net_inodes()
    # lsns lists namespaces that have a process; we also list named ones with no process.
    assert theirs <= ours


def _writable_cgroup_root() -> Path | None:
    for root in (
        Path("/sys/fs/cgroup/unified"),
        Path("/sys/fs/cgroup"),
        Path("/sys/fs/cgroup/pids"),
    ):
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None


def test_pod_namespace_is_named_after_the_pod():
    root = _writable_cgroup_root()
    if root is None:
        pytest.skip("no writable cgroup hierarchy on this machine to place a pod-like process")
    pod_uid = str(uuid.uuid4())
    group = root / f"tcpriot-kubepods-{os.getpid()}" / f"pod{pod_uid}" / CONTAINER
    group.mkdir(parents=True)
    try:
        env = {"PATH": os.environ["PATH"], "HOSTNAME": "web-7f9c"}
        with process_in_new_netns(env) as proc:
            (group / "cgroup.procs").write_text(str(proc.pid))
            found = [ns for ns in discover_namespaces() if ns.pid == proc.pid]
            (root / "cgroup.procs").write_text(str(proc.pid))  # back out before rmdir
    finally:
        for folder in (group, group.parent, group.parent.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()
    assert len(found) == 1
    assert found[0].name == "pod:web-7f9c"
    assert found[0].pod == "web-7f9c"
    assert found[0].container == CONTAINER


def test_entered_switches_only_this_thread_and_always_comes_back():
    home = current_namespace_key()
    with netns("enter") as ns:
        target = next(n for n in discover_namespaces() if n.name == ns.name)
        with entered(target):
            assert current_namespace_key() == target.key
        assert current_namespace_key() == home
        with pytest.raises(RuntimeError), entered(target):
            raise RuntimeError("boom")
        assert current_namespace_key() == home


def test_entering_a_vanished_namespace_raises_namespace_gone():
    with netns("gone") as ns:
        target = next(n for n in discover_namespaces() if n.name == ns.name)
    with pytest.raises(NamespaceGone), entered(target):
        pass


def test_a_reused_path_naming_another_namespace_is_refused():
    with netns("reuse") as ns:
        target = next(n for n in discover_namespaces() if n.name == ns.name)
    with netns("reuse") as other:
        impostor = type(target)(**{**target.__dict__, "path": other.path})
        with pytest.raises(NamespaceGone, match="another namespace"), entered(impostor):
            pass


def _named_in(folder: Path) -> dict[str, int]:
    from tcprio.kernel.namespaces import _named_namespaces

    return {ns.name: ns.inode for ns in _named_namespaces([folder])}


def test_a_quiet_netns_folder_is_read_from_memory_and_any_new_file_at_once(tmp_path):
    """The sweep keeps a quiet folder's namespaces (no stat of each pinned file every 10 s),
    and still sees a file added or removed at once, whatever the folder's mtime says."""
    folder = tmp_path / "netns"
    folder.mkdir()
    with netns("nc-a") as a, netns("nc-b") as b, contextlib.ExitStack() as mounts:
        inode = {n.name: os.stat(f"/run/netns/{n.name}").st_ino for n in (a, b)}

        def pin(name: str, target: str) -> None:
            (folder / name).touch()
            subprocess.run(["mount", "--bind", f"/run/netns/{target}", str(folder / name)],
                           check=True)  # fmt: skip
            mounts.callback(subprocess.run, ["umount", str(folder / name)], check=False)

        pin("x", a.name)
        os.utime(folder, ns=(0, 0))  # quiet for long: cacheable
        assert _named_in(folder) == {"x": inode[a.name]}
        # A namespace mounted over the same file changes nothing a cheap check sees: the
        # cache answers (until NAMED_CACHE_TTL_S), which shows it was used.
        subprocess.run(["umount", str(folder / "x")], check=True)
        subprocess.run(["mount", "--bind", f"/run/netns/{b.name}", str(folder / "x")], check=True)
        os.utime(folder, ns=(0, 0))
        assert _named_in(folder) == {"x": inode[a.name]}
        # A new file, even with the same mtime: read again at once, and right.
        pin("y", a.name)
        os.utime(folder, ns=(0, 0))
        assert _named_in(folder) == {"x": inode[b.name], "y": inode[a.name]}
