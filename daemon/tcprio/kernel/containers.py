"""The node's containers as their runtimes leave them on disk: containerd's and CRI-O's OCI
bundles (each a folder with the runtime spec, `config.json`, whose annotations name the pod).

- containerd (CRI plugin, runtime v2 shims): `<root>/<containerd namespace>/<id>/config.json`,
  root `/run/containerd/io.containerd.runtime.v2.task` (k3s and RKE2:
  `/run/k3s/containerd/io.containerd.runtime.v2.task`), annotations `io.kubernetes.cri.*`
  (container-type, sandbox-id, sandbox-name, sandbox-namespace, sandbox-uid, container-name,
  image-name).
- CRI-O: `<root>/<id>/userdata/config.json`, root `/run/containers/storage/overlay-containers`,
  annotations `io.kubernetes.cri-o.*` (ContainerType, SandboxID, ImageName, KubeName,
  Namespace, Labels) and the pod's labels (`io.kubernetes.pod.name`, `.namespace`, `.uid`,
  `io.kubernetes.container.name`).

A sandbox's spec names its network namespace (`linux.namespaces`, type `network`): the file the
runtime pinned it on (`/var/run/netns/cni-<uuid>` for containerd, `/var/run/netns/<uuid>` for
CRI-O). Read-only; every file read is bounded (`kernel/files.py`), and a bundle that cannot be
used costs one note, never the scan. Parsed bundles are kept by their file's identity (a spec
never changes once written), so a rescan lists the folders and parses only new ones.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tcprio.inputs import ConfigReadError, label_of
from tcprio.kernel.files import read_small_file

CONTAINERD_ROOT = Path("/run/containerd/io.containerd.runtime.v2.task")
CRIO_ROOT = Path("/run/containers/storage/overlay-containers")
K3S_CONTAINERD_ROOT = Path("/run/k3s/containerd/io.containerd.runtime.v2.task")  # k3s, RKE2
MAX_BUNDLES = 20000  # per runtime root: more is not a node, and the scan must stay bounded
MAX_VALUE = 512  # characters kept of one annotation value
SANDBOX, CONTAINER = "sandbox", "container"


@dataclass(frozen=True)
class ContainerRoots:
    """Where the runtimes keep their bundles (None: do not look); the tests point them at a
    scene in a temporary folder."""

    containerd: Path | None = CONTAINERD_ROOT
    crio: Path | None = CRIO_ROOT
    more_containerd: tuple[Path, ...] = ()  # containerd's layout elsewhere (k3s, RKE2)
    more_crio: tuple[Path, ...] = ()

    @classmethod
    def of(cls, containerd: tuple[Path, ...], crio: tuple[Path, ...]) -> ContainerRoots:
        """Roots from two lists of folders (the daemon's configuration)."""
        return cls(containerd=None, crio=None, more_containerd=containerd, more_crio=crio)


DEFAULT_ROOTS = ContainerRoots.of((CONTAINERD_ROOT, K3S_CONTAINERD_ROOT), (CRIO_ROOT,))


@dataclass(frozen=True)
class Bundle:
    """One container or pod sandbox, as its runtime's OCI bundle describes it."""

    id: str
    runtime: str  # "containerd" or "cri-o"
    kind: str  # "sandbox", "container" or "" (not a Kubernetes container)
    path: str  # its config.json
    sandbox_id: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    container_name: str | None = None
    image: str | None = None
    netns_path: str | None = None  # the network namespace it joins (sandboxes: the pinned one)

    @property
    def pod(self) -> str | None:
        """`<kubernetes namespace>/<pod name>`, or the pod name alone when that is all."""
        if not self.pod_name:
            return None
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_namespace else self.pod_name

    @property
    def label(self) -> str:
        return f"{self.runtime} bundle {self.id[:12]}"


@dataclass
class NodeContainers:
    """Every bundle found, with the indexes pod naming and version lookup need."""

    bundles: tuple[Bundle, ...] = ()
    notes: tuple[str, ...] = ()  # bundles that could not be used, one line each
    by_id: dict[str, Bundle] = field(default_factory=dict)
    sandbox_by_uid: dict[str, Bundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {b.id: b for b in self.bundles}
        self.sandbox_by_uid = {
            b.pod_uid: b for b in self.bundles if b.kind == SANDBOX and b.pod_uid
        }

    @property
    def sandboxes(self) -> list[Bundle]:
        return [b for b in self.bundles if b.kind == SANDBOX]

    def sandbox_of(self, bundle: Bundle) -> Bundle | None:
        """The pod sandbox a container belongs to (itself for a sandbox)."""
        if bundle.kind == SANDBOX:
            return bundle
        found = self.by_id.get(bundle.sandbox_id or "")
        if found is None and bundle.pod_uid:
            found = self.sandbox_by_uid.get(bundle.pod_uid)
        return found


# --- annotations -----------------------------------------------------------------------------

_CONTAINERD = {
    "kind": ("io.kubernetes.cri.container-type",),
    "sandbox_id": ("io.kubernetes.cri.sandbox-id",),
    "pod_namespace": ("io.kubernetes.cri.sandbox-namespace",),
    "pod_name": ("io.kubernetes.cri.sandbox-name",),
    "pod_uid": ("io.kubernetes.cri.sandbox-uid",),
    "container_name": ("io.kubernetes.cri.container-name",),
    "image": ("io.kubernetes.cri.image-name",),
}
_CRIO = {
    "kind": ("io.kubernetes.cri-o.ContainerType",),
    "sandbox_id": ("io.kubernetes.cri-o.SandboxID",),
    "pod_namespace": ("io.kubernetes.pod.namespace", "io.kubernetes.cri-o.Namespace"),
    "pod_name": ("io.kubernetes.pod.name", "io.kubernetes.cri-o.KubeName"),
    "pod_uid": ("io.kubernetes.pod.uid",),
    "container_name": ("io.kubernetes.container.name",),
    "image": ("io.kubernetes.cri-o.ImageName", "io.kubernetes.cri-o.Image"),
}
CRIO_LABELS = "io.kubernetes.cri-o.Labels"  # the pod's labels, as one JSON object


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return label_of(value, MAX_VALUE)


def _crio_labels(annotations: Mapping[str, object]) -> dict[str, object]:
    raw = annotations.get(CRIO_LABELS)
    if not isinstance(raw, str) or len(raw) > 1 << 16:
        return {}
    try:
        labels = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return labels if isinstance(labels, dict) else {}


def _network_path(spec: Mapping[str, object]) -> str | None:
    linux = spec.get("linux")
    spaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for entry in spaces if isinstance(spaces, list) else ():
        if isinstance(entry, dict) and entry.get("type") == "network":
            return _text(entry.get("path"))
    return None


def bundle_from_spec(spec: object, bundle_id: str, runtime: str, path: str) -> Bundle | str:
    """A Bundle from a parsed config.json; a one-line problem when it is not a runtime spec."""
    if not isinstance(spec, dict):
        return f"{runtime} bundle {label_of(bundle_id, 80)}: {path} is not a JSON object"
    annotations = spec.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    keys = _CONTAINERD if runtime == "containerd" else _CRIO
    labels = _crio_labels(annotations) if runtime == "cri-o" else {}
    values: dict[str, str | None] = {}
    for name, candidates in keys.items():
        values[name] = next(
            (v for k in candidates if (v := _text(annotations.get(k)) or _text(labels.get(k)))),
            None,
        )
    kind = values.pop("kind") or ""
    return Bundle(
        id=bundle_id,
        runtime=runtime,
        kind=kind if kind in (SANDBOX, CONTAINER) else "",
        path=path,
        netns_path=_network_path(spec),
        **values,
    )


# --- reading the runtime roots ---------------------------------------------------------------

FileKey = tuple[int, int, int, int]  # dev, inode, mtime (ns), size
_cache: dict[str, tuple[FileKey, Bundle | str]] = {}
_cache_lock = threading.Lock()


def _listing(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _containerd_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    for namespace in _listing(root):  # containerd's own namespaces: k8s.io, moby, ...
        for bundle_id in _listing(root / namespace):
            yield "containerd", bundle_id, root / namespace / bundle_id / "config.json"


def _crio_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    for bundle_id in _listing(root):
        yield "cri-o", bundle_id, root / bundle_id / "userdata" / "config.json"


def _bundle_files(roots: ContainerRoots) -> Iterator[tuple[str, str, Path]]:
    """(runtime, id, config.json path) of every bundle folder under the roots, at most
    MAX_BUNDLES per root."""
    containerd = (roots.containerd, *roots.more_containerd)
    for root in containerd:
        if root is not None:
            yield from itertools.islice(_containerd_files(root), MAX_BUNDLES)
    for root in (roots.crio, *roots.more_crio):
        if root is not None:
            yield from itertools.islice(_crio_files(root), MAX_BUNDLES)


def _file_key(path: Path) -> FileKey | OSError | None:
    """The identity of a config.json; None when there is none (a bundle being made or
    removed), the error when it cannot be looked at (a link loop: worth a note)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return exc if isinstance(exc, OSError) else None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _parse(runtime: str, bundle_id: str, path: Path) -> Bundle | str:
    where = f"{runtime} bundle {label_of(bundle_id, 80)}"
    try:
        text = read_small_file(path)
    except ConfigReadError as exc:
        return f"{where}: {label_of(str(path))} {exc}"
    try:
        spec = json.loads(text)
    except ValueError as exc:
        return f"{where}: {label_of(str(path))} is not valid JSON ({label_of(str(exc), 120)})"
    except RecursionError:
        return f"{where}: {label_of(str(path))} is nested too deeply"
    return bundle_from_spec(spec, bundle_id, runtime, str(path))


def read_containers(roots: ContainerRoots | None = None) -> NodeContainers:
    """Every bundle under `roots` (the runtimes' defaults when None). A folder without a
    config.json (a bundle being created or deleted) is skipped silently; one that cannot be
    read or parsed gives a note."""
    roots = roots if roots is not None else DEFAULT_ROOTS
    bundles: list[Bundle] = []
    notes: list[str] = []
    fresh: dict[str, tuple[FileKey, Bundle | str]] = {}
    for runtime, bundle_id, path in _bundle_files(roots):
        key = _file_key(path)
        if key is None:
            continue
        if isinstance(key, OSError):  # reading says what is wrong with it, in one line
            notes.append(_parse(runtime, bundle_id, path))  # type: ignore[arg-type]
            continue
        cached = _cache.get(str(path))
        found = cached[1] if cached is not None and cached[0] == key else None
        if found is None:
            found = _parse(runtime, bundle_id, path)
        fresh[str(path)] = (key, found)
        (bundles if isinstance(found, Bundle) else notes).append(found)  # type: ignore[arg-type]
    with _cache_lock:
        if len(_cache) > 4 * MAX_BUNDLES:  # roots come and go (the tests' scenes)
            _cache.clear()
        _cache.update(fresh)
        for stale in [p for p in _cache if p not in fresh and _under(p, roots)]:
            del _cache[stale]
    return NodeContainers(tuple(bundles), tuple(notes))


def _under(path: str, roots: ContainerRoots) -> bool:
    folders = (roots.containerd, roots.crio, *roots.more_containerd, *roots.more_crio)
    return any(r is not None and path.startswith(str(r) + "/") for r in folders)
