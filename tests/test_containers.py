"""Pods and versions found without flags, on scenes shaped like what containerd and CRI-O leave on
a node: bundle folders with their OCI spec (config.json), pinned network namespaces made for
real, processes in cgroups named like the runtimes' (when this machine lets the tests make one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tcprio.kernel.containers import (
    SANDBOX,
    ContainerRoots,
    NodeContainers,
    bundle_from_spec,
    read_containers,
)
from tcprio.kernel.namespaces import discover_namespaces, name_pods, parse_cgroup
from tcprio.kernel.versions import find_versions, image_version, split_image
from tcprio.model import NetNamespace
from tcprio.report import render_text, scan_json
from tcprio.scan import enumerate_namespaces, run_scan, veth_peers
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns
from tests.test_cli import schema
from tests.test_scan_kernel import datadog_settings
from tests.timing import wait_until

# --- scenes ----------------------------------------------------------------------------------


def _hex_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


class Scene:
    """Runtime state roots in a temporary folder, as containerd and CRI-O lay them out."""

    def __init__(self, base: Path) -> None:
        self.roots = ContainerRoots(containerd=base / "containerd", crio=base / "crio")

    @staticmethod
    def _spec(annotations: dict[str, str], netns_path: str | None) -> dict:
        network: dict[str, str] = {"type": "network"}
        if netns_path is not None:
            network["path"] = netns_path
        return {
            "ociVersion": "1.1.0",
            "process": {"args": ["/pause"]},
            "annotations": annotations,
            "linux": {"namespaces": [{"type": "pid"}, network, {"type": "mount"}]},
        }

    def _write(self, folder: Path, spec: dict) -> Path:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(spec))
        return folder / "config.json"

    def containerd_sandbox(
        self, pod_ns: str, pod: str, uid: str, netns_path: str | None, sandbox_id: str = ""
    ) -> str:
        sandbox_id = sandbox_id or _hex_id()
        annotations = {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": sandbox_id,
            "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.sandbox-namespace": pod_ns,
            "io.kubernetes.cri.sandbox-uid": uid,
            "io.kubernetes.cri.sandbox-log-directory": f"/var/log/pods/{pod_ns}_{pod}_{uid}",
        }
        assert self.roots.containerd is not None
        self._write(
            self.roots.containerd / "k8s.io" / sandbox_id, self._spec(annotations, netns_path)
        )
        return sandbox_id

    def containerd_container(
        self, sandbox_id: str, pod_ns: str, pod: str, uid: str, name: str, image: str
    ) -> str:
        container_id = _hex_id()
        annotations = {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": name,
            "io.kubernetes.cri.image-name": image,
            "io.kubernetes.cri.sandbox-id": sandbox_id,
            "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.sandbox-namespace": pod_ns,
            "io.kubernetes.cri.sandbox-uid": uid,
        }
        assert self.roots.containerd is not None
        # a container joins its sandbox's namespace through a process's path
        spec = self._spec(annotations, "/proc/1/ns/net")
        self._write(self.roots.containerd / "k8s.io" / container_id, spec)
        return container_id

    def crio_sandbox(self, pod_ns: str, pod: str, uid: str, netns_path: str) -> str:
        sandbox_id = _hex_id()
        labels = {
            "io.kubernetes.pod.name": pod,
            "io.kubernetes.pod.namespace": pod_ns,
            "io.kubernetes.pod.uid": uid,
        }
        annotations = {
            "io.kubernetes.cri-o.ContainerType": "sandbox",
            "io.kubernetes.cri-o.SandboxID": sandbox_id,
            "io.kubernetes.cri-o.ContainerID": sandbox_id,
            "io.kubernetes.cri-o.KubeName": pod,
            "io.kubernetes.cri-o.Namespace": pod_ns,
            "io.kubernetes.cri-o.Name": f"k8s_{pod}_{pod_ns}_{uid}_0",
            "io.kubernetes.cri-o.Labels": json.dumps(labels),
            "io.kubernetes.cri-o.HostNetwork": "false",
            "io.container.manager": "cri-o",
        }
        assert self.roots.crio is not None
        self._write(self.roots.crio / sandbox_id / "userdata", self._spec(annotations, netns_path))
        return sandbox_id

    def crio_container(
        self, sandbox_id: str, pod_ns: str, pod: str, uid: str, name: str, image: str
    ) -> str:
        container_id = _hex_id()
        labels = {
            "io.kubernetes.container.name": name,
            "io.kubernetes.pod.name": pod,
            "io.kubernetes.pod.namespace": pod_ns,
            "io.kubernetes.pod.uid": uid,
        }
        annotations = {
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.cri-o.SandboxID": sandbox_id,
            "io.kubernetes.cri-o.ImageName": image,
            "io.kubernetes.cri-o.Labels": json.dumps(labels),
        }
        assert self.roots.crio is not None
        self._write(self.roots.crio / container_id / "userdata", self._spec(annotations, None))
        return container_id


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


# --- bundles ---------------------------------------------------------------------------------


def test_containerd_and_crio_bundles_are_read(scene: Scene) -> None:
    uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("shop", "web-1", uid_a, "/var/run/netns/cni-1234")
    container = scene.containerd_container(
        sandbox, "shop", "web-1", uid_a, "nginx", "docker.io/library/nginx:1.27"
    )
    crio_sandbox = scene.crio_sandbox("kube-system", "dns-0", uid_b, "/var/run/netns/5678")
    crio_container = scene.crio_container(
        crio_sandbox, "kube-system", "dns-0", uid_b, "coredns", "registry.k8s.io/coredns:v1.11.1"
    )
    found = read_containers(scene.roots)
    assert found.notes == ()
    by_id = found.by_id
    assert by_id[sandbox].kind == SANDBOX and by_id[sandbox].pod == "shop/web-1"
    assert by_id[sandbox].netns_path == "/var/run/netns/cni-1234"
    assert by_id[sandbox].runtime == "containerd" and by_id[sandbox].pod_uid == uid_a
    assert by_id[container].image == "docker.io/library/nginx:1.27"
    assert by_id[container].container_name == "nginx"
    assert found.sandbox_of(by_id[container]) == by_id[sandbox]
    assert by_id[crio_sandbox].runtime == "cri-o" and by_id[crio_sandbox].pod == "kube-system/dns-0"
    assert by_id[crio_sandbox].netns_path == "/var/run/netns/5678"
    assert by_id[crio_container].container_name == "coredns"
    assert by_id[crio_container].image == "registry.k8s.io/coredns:v1.11.1"
    assert found.sandbox_of(by_id[crio_container]) == by_id[crio_sandbox]


def test_missing_roots_give_nothing(tmp_path: Path) -> None:
    found = read_containers(ContainerRoots(tmp_path / "no-containerd", tmp_path / "no-crio"))
    assert found.bundles == () and found.notes == ()


def _bad_bundle(scene: Scene, name: str, write) -> None:
    assert scene.roots.containerd is not None
    folder = scene.roots.containerd / "k8s.io" / name
    folder.mkdir(parents=True)
    write(folder / "config.json")


BAD_CONFIGS = {
    "corrupt": (lambda p: p.write_text('{"annotations": {'), "is not valid JSON"),
    "not-an-object": (lambda p: p.write_text("[1, 2]"), "is not a JSON object"),
    "deep": (lambda p: p.write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    "huge": (lambda p: p.write_bytes(b" " * (2 << 20)), "bytes allowed"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe{}"), "not valid UTF-8"),
    "loop": (lambda p: os.symlink(p.name, p), "symbolic links"),
    "fifo": (lambda p: os.mkfifo(p), "not a regular file"),
    "folder": (lambda p: p.mkdir(), "is a directory"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_a_bad_config_json_is_one_note(scene: Scene, kind: str) -> None:
    write, message = BAD_CONFIGS[kind]
    _bad_bundle(scene, f"bad-{kind}", write)
    good = scene.containerd_sandbox("a", "web", str(uuid.uuid4()), "/var/run/netns/cni-x")
    found = read_containers(scene.roots)
    assert [b.id for b in found.bundles] == [good]
    assert len(found.notes) == 1, found.notes
    assert message in found.notes[0] and "\n" not in found.notes[0]
    assert found.notes[0].startswith(f"containerd bundle bad-{kind}: ")


def test_each_root_is_bounded_on_its_own(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    import tcprio.kernel.containers as containers

    monkeypatch.setattr(containers, "MAX_BUNDLES", 1)
    for pod in ("a", "b"):
        scene.containerd_sandbox("x", pod, str(uuid.uuid4()), None)
    scene.crio_sandbox("x", "c", str(uuid.uuid4()), "/var/run/netns/c")
    found = read_containers(scene.roots)
    assert sorted(b.runtime for b in found.bundles) == ["containerd", "cri-o"]


def test_junk_annotations_are_ignored() -> None:
    spec = {
        "annotations": {
            "io.kubernetes.cri.container-type": ["sandbox"],
            "io.kubernetes.cri.sandbox-name": "web\n\x1b[31m",
            "io.kubernetes.cri.sandbox-namespace": 42,
        },
        "linux": {"namespaces": "network"},
    }
    bundle = bundle_from_spec(spec, "x", "containerd", "/x/config.json")
    assert not isinstance(bundle, str)
    assert bundle.kind == "" and bundle.pod_namespace is None and bundle.netns_path is None
    assert bundle.pod_name is not None and "\n" not in bundle.pod_name
    crio = bundle_from_spec(
        {"annotations": {"io.kubernetes.cri-o.Labels": "{not json"}}, "y", "cri-o", "/y"
    )
    assert not isinstance(crio, str) and crio.pod_name is None


def test_rereading_parses_only_new_bundles(scene: Scene) -> None:
    first = scene.containerd_sandbox("a", "web", str(uuid.uuid4()), "/var/run/netns/cni-1")
    read_containers(scene.roots)
    assert scene.roots.containerd is not None
    path = scene.roots.containerd / "k8s.io" / first / "config.json"
    os.chmod(path, 0)  # root reads it anyway; what tells a reread is that nothing changed
    again = read_containers(scene.roots)
    assert [b.id for b in again.bundles] == [first]
    shutil.rmtree(path.parent)
    assert read_containers(scene.roots).bundles == ()


# --- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, repository, version",
    [
        ("quay.io/cilium/cilium:v1.16.3@sha256:" + "ab" * 32, "quay.io/cilium/cilium", "1.16.3"),
        ("localhost:5000/cilium/cilium:v1.9.18", "localhost:5000/cilium/cilium", "1.9.18"),
        ("gcr.io/datadoghq/agent:7.52.1-jmx", "gcr.io/datadoghq/agent", "7.52.1-jmx"),
        ("docker.io/calico/node:latest", "docker.io/calico/node", None),
        ("grafana/beyla@sha256:" + "cd" * 32, "grafana/beyla", None),
        ("otel/ebpf-instrument:v0.13.0", "otel/ebpf-instrument", "0.13.0"),
        ("retina-agent", "retina-agent", None),
    ],
)
def test_image_version(image: str, repository: str, version: str | None) -> None:
    assert split_image(image)[0] == repository
    assert image_version(image) == version


# --- pods ------------------------------------------------------------------------------------


def _discovered(scene: Scene, *names: str) -> dict[str, NetNamespace]:
    """The test namespaces `names` (raw netns names) as discovery names them."""
    found = discover_namespaces(containers=read_containers(scene.roots))
    return {ns.netns: ns for ns in found if ns.netns in names}  # type: ignore[misc]


def test_containerd_pods_are_named_and_kept_apart(scene: Scene) -> None:
    with netns("cni-a") as a, netns("cni-b") as b, netns("plain") as plain:
        uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
        # containerd writes /var/run/netns/...: /var/run is /run, the file is the same one
        scene.containerd_sandbox("a", "web", uid_a, f"/var/run/netns/{a.name}")
        scene.containerd_sandbox("b", "web", uid_b, a.path.replace(a.name, b.name))
        found = _discovered(scene, a.name, b.name, plain.name)
    assert found[a.name].name == "pod:a/web" and found[b.name].name == "pod:b/web"
    assert (found[a.name].pod, found[a.name].pod_namespace, found[a.name].pod_uid) == (
        "web",
        "a",
        uid_a,
    )
    assert found[b.name].pod_uid == uid_b
    assert "containerd bundle" in (found[a.name].named_by or "")
    assert found[plain.name].name == plain.name and found[plain.name].pod is None


def test_crio_pods_are_named(scene: Scene) -> None:
    with netns("crio") as pod:
        uid = str(uuid.uuid4())
        sandbox = scene.crio_sandbox("kube-system", "coredns-5d78c9869d-abcde", uid, pod.path)
        scene.crio_container(
            sandbox, "kube-system", "coredns-5d78c9869d-abcde", uid, "coredns", "coredns:v1.11.1"
        )
        found = {ns.netns: ns for ns in discover_namespaces(roots=scene.roots)}
    assert found[pod.name].name == "pod:kube-system/coredns-5d78c9869d-abcde"
    assert found[pod.name].pod_uid == uid and found[pod.name].netns == pod.name
    assert (found[pod.name].named_by or "").startswith("cri-o bundle ")


def test_a_sandbox_pointing_at_a_gone_namespace_names_nothing(scene: Scene) -> None:
    scene.containerd_sandbox("a", "gone", str(uuid.uuid4()), "/run/netns/tcpriot-never-made")
    with netns("alive") as alive:
        found = _discovered(scene, alive.name)
    assert found[alive.name].name == alive.name


def test_two_namespaces_of_one_pod_get_distinct_names(scene: Scene) -> None:
    """A pod being recreated: the old sandbox's namespace is not gone yet."""
    uid = str(uuid.uuid4())
    with netns("old") as old, netns("new") as new:
        scene.containerd_sandbox("a", "web", uid, old.path)
        scene.containerd_sandbox("a", "web", uid, new.path)
        found = _discovered(scene, old.name, new.name)
    assert found[old.name].name == f"pod:a/web ({old.name})"
    assert found[new.name].name == f"pod:a/web ({new.name})"


def test_host_is_never_a_pod(scene: Scene) -> None:
    """A hostNetwork pod's sandbox names no pinned namespace, or a process's."""
    scene.containerd_sandbox("kube-system", "cilium-x", str(uuid.uuid4()), "/proc/1/ns/net")
    found = discover_namespaces(containers=read_containers(scene.roots))
    assert found[0].name == "host"


def test_process_namespace_maps_to_its_pod_by_cgroup_text(scene: Scene) -> None:
    """Recorded cgroup lines of a containerd container (systemd driver) and a CRI-O one."""
    uid = str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("a", "api", uid, None)
    container = scene.containerd_container(sandbox, "a", "api", uid, "app", "app:1")
    containers = read_containers(scene.roots)
    pod_slice = f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
    scope = f"cri-containerd-{container}.scope"
    text = f"0::/kubepods.slice/kubepods-besteffort.slice/{pod_slice}/{scope}\n"
    identity = parse_cgroup(text)
    ns = NetNamespace(
        inode=1, dev=1, name="pod:x", path="/proc/99/ns/net", source="process", pid=99,
        container=identity.container, pod=None, pod_uid=identity.pod_uid,
    )  # fmt: skip
    [named] = name_pods([ns], containers)
    assert named.name == "pod:a/api" and named.named_by is not None
    # CRI-O, cgroupfs driver: the pod UID alone still finds the sandbox
    other = _hex_id()
    crio = parse_cgroup(f"12:pids:/kubepods/besteffort/pod{uid}/crio-{other}.scope\n")
    assert crio.container == other
    unknown = NetNamespace(
        inode=2, dev=1, name="pod:x2", path="/proc/98/ns/net", source="process", pid=98,
        container=crio.container, pod_uid=crio.pod_uid,
    )  # fmt: skip
    assert name_pods([unknown], containers)[0].name == "pod:a/api"


# --- real processes in runtime-shaped cgroups -------------------------------------------------


def _cgroup_root() -> Path | None:
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        v2 = (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists()
        if v2 and os.access(root, os.W_OK):
            return root
    return None


@contextlib.contextmanager
def in_container_cgroup(pid: int, container_id: str) -> Iterator[None]:
    """`pid` moved into a cgroup named like containerd's (systemd driver); moved back after."""
    root = _cgroup_root()
    if root is None:
        pytest.skip("no writable cgroup v2 hierarchy here to place a container-like process")
    group = root / f"tcpriot-{os.getpid()}-{uuid.uuid4().hex[:8]}.slice"
    scope = group / f"cri-containerd-{container_id}.scope"
    scope.mkdir(parents=True)
    try:
        (scope / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):
            (root / "cgroup.procs").write_text(str(pid))
        for folder in (scope, group):
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def process_named(command: str, tmp: Path, ns: TestNetns | None = None) -> Iterator[int]:
    """A `sleep` whose command name is `command` (a copy of the binary), optionally inside a
    test namespace; killed after."""
    binary = tmp / command
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    argv = [str(binary), "60"]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns.name, *argv]
    proc = subprocess.Popen(argv)
    try:
        wait_until(
            lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == command,
            f"{command} never started",
            poll_s=0.01,
        )
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_process_in_a_container_cgroup_names_its_namespace(scene: Scene, tmp_path: Path) -> None:
    """An unpinned namespace (no sandbox file) named by the cgroup of the process in it."""
    uid = str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("b", "worker", uid, None)
    container = scene.containerd_container(sandbox, "b", "worker", uid, "app", "app:1")
    proc = subprocess.Popen(["unshare", "-n", "sleep", "60"])
    try:
        host = os.stat("/proc/self/ns/net").st_ino
        wait_until(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino != host, "unshare -n")
        with in_container_cgroup(proc.pid, container):
            found = discover_namespaces(containers=read_containers(scene.roots))
    finally:
        proc.kill()
        proc.wait()
    [ns] = [n for n in found if n.pid == proc.pid]
    assert ns.name == "pod:b/worker" and ns.container == container
    assert "cgroup" in (ns.named_by or "")


# --- versions --------------------------------------------------------------------------------


def _cilium_pod(scene: Scene, image: str) -> str:
    uid = str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("kube-system", "cilium-abcde", uid, None)
    return scene.containerd_container(
        sandbox, "kube-system", "cilium-abcde", uid, "cilium-agent", image
    )


def test_version_from_the_image_of_the_process_container(scene: Scene, tmp_path: Path) -> None:
    container = _cilium_pod(scene, "quay.io/cilium/cilium:v1.16.3@sha256:" + "ab" * 32)
    containers = read_containers(scene.roots)
    with process_named("cilium-agent", tmp_path) as pid:
        found = find_versions(containers, container_of=lambda p: container if p == pid else None)
    cilium = found.versions["Cilium"]
    assert cilium.version == "1.16.3"
    assert cilium.source == (
        f"container image quay.io/cilium/cilium:v1.16.3@sha256:{'ab' * 32} "
        f"(containerd bundle {container[:12]})"
    )


def test_version_through_a_real_cgroup(scene: Scene, tmp_path: Path) -> None:
    container = _cilium_pod(scene, "quay.io/cilium/cilium:v1.16.3")
    containers = read_containers(scene.roots)
    with process_named("cilium-agent", tmp_path) as pid, in_container_cgroup(pid, container):
        found = find_versions(containers)
    assert found.versions["Cilium"].version == "1.16.3"
    assert found.versions["Cilium"].source == (
        f"container image quay.io/cilium/cilium:v1.16.3 (containerd bundle {container[:12]})"
    )


def test_generic_command_counts_only_with_its_product_image(scene: Scene, tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("kube-system", "retina-x", uid, None)
    retina = scene.containerd_container(
        sandbox,
        "kube-system",
        "retina-x",
        uid,
        "retina",
        "ghcr.io/microsoft/retina/retina-agent:v1.2.3",
    )
    other = scene.containerd_container(
        sandbox, "kube-system", "retina-x", uid, "c", "acme/controller:2.0"
    )
    containers = read_containers(scene.roots)
    with process_named("controller", tmp_path) as pid:
        found = find_versions(containers, container_of=lambda p: retina if p == pid else None)
        assert found.versions["Retina"].version == "1.2.3"
        found = find_versions(containers, container_of=lambda p: other if p == pid else None)
        assert "Retina" not in found.versions


def test_no_version_in_the_tag_is_a_note(scene: Scene, tmp_path: Path) -> None:
    container = _cilium_pod(scene, "quay.io/cilium/cilium:latest")
    containers = read_containers(scene.roots)
    with process_named("cilium-agent", tmp_path) as pid:
        found = find_versions(containers, container_of=lambda p: container if p == pid else None)
    assert found.versions == {}
    assert len(found.notes) == 1 and "names no version" in found.notes[0]


def test_no_bundles_no_walk() -> None:
    assert find_versions(NodeContainers()).versions == {}


def test_scan_reports_versions_and_the_flag_overrides(scene: Scene, tmp_path: Path) -> None:
    container = _cilium_pod(scene, "quay.io/cilium/cilium:v1.9.18")
    containers = read_containers(scene.roots)
    with process_named("cilium-agent", tmp_path) as pid, in_container_cgroup(pid, container):
        scan = run_scan(discover=list, settings=datadog_settings(), containers=containers)
        flagged = run_scan(
            discover=list, settings=datadog_settings(), containers=containers,
            cilium_version="1.16.0",
        )  # fmt: skip
    assert scan.versions["Cilium"].version == "1.9.18"
    assert scan_json(scan)["versions"]["Cilium"] == {
        "version": "1.9.18",
        "source": "container image quay.io/cilium/cilium:v1.9.18 "
        f"(containerd bundle {container[:12]})",
    }
    text = render_text(scan, detail=True)
    assert "Cilium 1.9.18  (container image quay.io/cilium/cilium:v1.9.18" in text
    assert "versions found: Cilium 1.9.18" in render_text(scan)  # the first screen names it
    jsonschema.validate(scan_json(scan), schema())
    assert flagged.versions["Cilium"].version == "1.16.0"
    assert flagged.versions["Cilium"].source == "--cilium-version"


def test_found_versions_feed_the_incompatibility_check(scene: Scene, tmp_path: Path) -> None:
    """Cilium 1.9 and agent 7.37 (both from their containers' images), no flag: the known
    incompatible pair is reported."""
    cilium = _cilium_pod(scene, "quay.io/cilium/cilium:v1.9.18")
    uid = str(uuid.uuid4())
    sandbox = scene.containerd_sandbox("datadog", "datadog-x1", uid, None)
    agent = scene.containerd_container(
        sandbox, "datadog", "datadog-x1", uid, "system-probe", "gcr.io/datadoghq/agent:7.37.0"
    )
    containers = read_containers(scene.roots)
    with contextlib.ExitStack() as stack:
        for command, container in (("cilium-agent", cilium), ("system-probe", agent)):
            pid = stack.enter_context(process_named(command, tmp_path))
            stack.enter_context(in_container_cgroup(pid, container))
        scan = run_scan(discover=list, settings=datadog_settings(), containers=containers)
    assert scan.versions["Datadog"].version == "7.37.0"
    assert scan.datadog.agent_version == "7.37.0"
    assert (scan.datadog.agent_version_source or "").startswith("container image gcr.io/")
    [note] = [n for n in scan.result.notes if n.startswith("Cilium 1.9.18")]
    assert "with Datadog agent 7.37.0" in note and f"containerd bundle {cilium[:12]}" in note


# --- veth peers ------------------------------------------------------------------------------


def test_host_side_veth_shows_the_pod_behind_it(scene: Scene) -> None:
    """A namespace playing the host, a pod's pinned namespace, a veth between them."""
    with netns("node") as node, netns("cni-pod") as pod:
        uid = str(uuid.uuid4())
        scene.containerd_sandbox("shop", "web", uid, pod.path)
        node.ip("link", "add", "lxc0abc", "type", "veth", "peer", "name", "eth0", "netns", pod.name)
        node.ip("link", "set", "lxc0abc", "up")
        add_clsact(node, "lxc0abc")
        attach_filter(node, "lxc0abc", "egress", 1, "pass_unspec")
        found = discover_namespaces(containers=read_containers(scene.roots))
        chosen = [ns for ns in found if ns.netns in (node.name, pod.name)]
        inventories, _ = enumerate_namespaces(chosen)
        home = next(ns.key for ns in chosen if ns.netns == node.name)
        peers = veth_peers(inventories, home=home)
        scan = run_scan(discover=lambda: chosen, settings=datadog_settings(), vendor_versions={})
        scan.peers = peers
        host_if = node.ifindex("lxc0abc")
    assert peers[(home, host_if)].name == "pod:shop/web"
    doc = scan_json(scan)
    [node_doc] = [n for n in doc["namespaces"] if n["netns"] == node.name]
    [lxc] = [i for i in node_doc["interfaces"] if i["name"] == "lxc0abc"]
    assert lxc["peer_pod"] == "shop/web" and lxc["peer_namespace"] == "pod:shop/web"
    assert lxc["peer_netnsid"] is not None
    [pod_doc] = [n for n in doc["namespaces"] if n["netns"] == pod.name]
    assert pod_doc["name"] == "pod:shop/web" and pod_doc["pod_namespace"] == "shop"
    assert "lxc0abc egress  (peer in pod:shop/web)" in render_text(scan, detail=True)
    jsonschema.validate(doc, schema())


def test_netns_option_matches_the_pod_name_or_the_raw_name() -> None:
    ns = NetNamespace(
        inode=1, dev=1, name="pod:a/web", path="/run/netns/cni-1", source="named", netns="cni-1"
    )
    assert ns.matches("pod:a/*") and ns.matches("cni-*") and not ns.matches("pod:b/*")
