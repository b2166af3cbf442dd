"""deploy/container/Containerfile, built and run for real with podman (Debian 12's).

Opt-in: it builds an image and reads Debian's archive. Measured here (2 CPUs): 27 s with the
Debian base already imported and no layer cached, 58 s from nothing (debootstrap included),
17 s with podman's layers cached. Run it with

    TCPRIO_IMAGE_TEST=1 .venv/bin/python -m pytest tests/test_container_image.py -q

It needs podman (`apt-get install podman runc debootstrap`). No registry is needed: the base is
TCPRIO_IMAGE_BASE if set, else localhost/tcprio-base:bookworm, made when missing by
`debootstrap --variant=minbase bookworm` and `podman import`; tcprio's dependencies are
downloaded on the host (its pip configuration, its CA certificates) into the context's wheels/
and installed with PIP_NO_INDEX=1.

The container then runs as deploy/kubernetes/daemonset.yaml runs it: the host's PID and
network namespaces, every capability dropped but the DaemonSet's, a read-only root, its
hostPath folders read-only and its emptyDirs as tmpfs: `tcprio scan --format json` must see the
host's namespace and a test namespace with its classifiers, and `tcprio serve` with the
DaemonSet's own arguments must become ready and serve its metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tcprio.model import Direction
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import free_port
from tests.timing import wait_until

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
IGNOREFILE = ROOT / "deploy" / "container" / "Containerfile.dockerignore"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
BASE = os.environ.get("TCPRIO_IMAGE_BASE", "localhost/tcprio-base:bookworm")
IMAGE = "localhost/tcprio:test"
PODMAN = shutil.which("podman")
E = Direction.EGRESS
BUILD_GUARD_S = 600  # debootstrap and a build without cache: about 1 min here, 10x
RUN_GUARD_S = 120

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TCPRIO_IMAGE_TEST") != "1",
        reason="builds a container image (about 30 s, 1 min the first time): TCPRIO_IMAGE_TEST=1",
    ),
    pytest.mark.skipif(
        PODMAN is None, reason="podman not installed (apt-get install podman runc debootstrap)"
    ),
]


def _has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << bit))
    return False


def podman_options() -> list[str]:
    """What this machine needs besides podman's defaults.

    - crun (podman's default runtime) refuses hosts with cgroups in hybrid mode (v1 controllers
      and a v2 hierarchy at /sys/fs/cgroup/unified, as here); runc runs there.
    - podman raises RLIMIT_NOFILE and RLIMIT_NPROC for the container, which fails without
      CAP_SYS_RESOURCE (a sandboxed root, as here): ask for modest limits instead.
    """
    options = []
    if shutil.which("runc"):
        options.append("--runtime=runc")
    return options


def ulimits() -> list[str]:
    if _has_capability(24):  # CAP_SYS_RESOURCE
        return []
    return ["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"]


def podman(*args: str, timeout: float = RUN_GUARD_S, check: bool = True, **kw):
    assert PODMAN is not None
    out = subprocess.run(
        [PODMAN, *podman_options(), *args], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def ensure_base(tmp_path: Path) -> None:
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    if shutil.which("debootstrap") is None:
        pytest.skip(f"no base image {BASE} and no debootstrap to make it (apt-get install it)")
    rootfs = tmp_path / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
         "http://deb.debian.org/debian"],
        check=True, capture_output=True, timeout=BUILD_GUARD_S,
    )  # fmt: skip
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman("import", "--change", 'CMD ["/bin/bash"]', "-", BASE, stdin=tar.stdout,
           timeout=BUILD_GUARD_S)  # fmt: skip
    assert tar.wait() == 0


def build_context(tmp_path: Path) -> Path:
    """What the Containerfile needs from the repository, and the dependencies as wheels."""
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    for name in ("daemon", "bpf"):
        shutil.copytree(ROOT / name, context / name, ignore=ignore)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["build-system"]["requires"], "wheel", *project["project"]["dependencies"]]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--python-version=3.11", "--platform=manylinux2014_x86_64", "--platform=any",
         "-d", str(context / "wheels"), *wanted],
        check=True, capture_output=True, timeout=RUN_GUARD_S,
    )  # fmt: skip
    return context


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    tmp_path = tmp_path_factory.mktemp("image")
    ensure_base(tmp_path)
    context = build_context(tmp_path)
    podman(
        "build", *ulimits(), f"--build-arg=BASE={BASE}", "--build-arg=PIP_NO_INDEX=1",
        "-f", str(CONTAINERFILE), f"--ignorefile={IGNOREFILE}", "-t", IMAGE, str(context),
        timeout=BUILD_GUARD_S,
    )  # fmt: skip
    return IMAGE


def as_the_daemonset_runs_it() -> list[str]:
    """podman options for the DaemonSet's pod: host namespaces, capabilities, read-only root,
    its hostPath folders read-only (those this machine has), its emptyDirs as tmpfs."""
    pod = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    container = pod["containers"][0]
    security = container["securityContext"]
    options = ["--pid=host", "--network=host", "--read-only", *ulimits()]
    options += [f"--cap-drop={c}" for c in security["capabilities"]["drop"]]
    options += [f"--cap-add={c}" for c in security["capabilities"]["add"]]
    options.append("--security-opt=apparmor=unconfined")  # appArmorProfile: Unconfined
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            options.append(f"--tmpfs={mount['mountPath']}")
        elif "hostPath" in volume and Path(volume["hostPath"]["path"]).is_dir():
            flags = "ro,rslave" if mount.get("mountPropagation") == "HostToContainer" else "ro"
            options.append(f"--volume={volume['hostPath']['path']}:{mount['mountPath']}:{flags}")
    return options


def test_the_image_scans_the_hosts_namespaces(image, classifier_programs):
    with netns("d-image") as ns:
        veth_in_one(ns, "i0", "i1")
        add_clsact(ns, "i0")
        attach_filter(ns, "i0", E, 10, "classifier_egress")
        attach_filter(ns, "i0", E, 1, "term_ok")
        out = podman(
            "run", "--rm", *as_the_daemonset_runs_it(), image,
            "tcprio", "scan", "--format", "json", "--netns", "host", "--netns", ns.name,
            check=False,
        )  # fmt: skip
    assert out.returncode == 2, out.stderr  # a critical conflict: exit status 2
    report = json.loads(out.stdout)
    assert report["schema"] == "tcprio.scan"
    found = {n["name"]: n for n in report["namespaces"]}
    assert found["host"]["inode"] == os.stat("/proc/self/ns/net").st_ino
    assert "lo" in {i["name"] for i in found["host"]["interfaces"]}
    assert ns.name in found, "a named namespace of the host (/run/netns)"
    assert [c["severity"] for c in report["conflicts"]] == ["critical"]
    assert report["conflicts"][0]["interface"] == "i0"


@contextlib.contextmanager
def serving(image: str, port: int) -> Iterator[str]:
    """The DaemonSet's command and arguments (on another port), its ConfigMap's file at
    /etc/tcprio/tcprio.yaml."""
    container = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]["containers"][0]
    args = [
        f"--web.listen-address=127.0.0.1:{port}" if a.startswith("--web.listen-address") else a
        for a in container["args"]
    ]
    config = ROOT / "deploy" / "kubernetes" / "tcprio.yaml"
    name = f"tcprio-test-{os.getpid()}"
    podman(
        "run", "--detach", "--name", name, *as_the_daemonset_runs_it(),
        f"--volume={config}:/etc/tcprio/tcprio.yaml:ro", image, *container["command"], *args,
    )  # fmt: skip
    try:
        yield name
    finally:
        podman("rm", "--force", "--time=10", name, check=False)


def test_the_image_serves_like_the_daemonset(image):
    port = free_port()
    with serving(image, port) as name:

        def ready() -> bool:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r,
            ):
                return r.status == 200
            state = podman("inspect", "--format={{.State.Running}}", name).stdout.strip()
            assert state == "true", podman("logs", name, check=False).stderr
            return False

        wait_until(ready, "the container's daemon never became ready", RUN_GUARD_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    assert "tcprio_build_info{" in text and "tcprio_namespaces_watched" in text
