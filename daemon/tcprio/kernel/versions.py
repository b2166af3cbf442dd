"""The versions of the node's network products (Cilium, Calico, Retina, Beyla / OBI, the Datadog
agent), found without flags: each product's running process, its container (the container id in
its cgroup -> the runtime's bundle, `kernel/containers.py`) and the version in that container's
image tag (`quay.io/cilium/cilium:v1.16.3@sha256:...` -> 1.16.3).

Only processes whose command name is one of the products' are looked at (one small read of
`/proc/<pid>/comm` each, and only on a node where a runtime left bundles); a generic command name
(`agent`, Retina's `controller`) counts only when its image is the product's. Read-only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tcprio.inputs import label_of
from tcprio.kernel.containers import Bundle, NodeContainers
from tcprio.kernel.files import read_proc_bytes
from tcprio.kernel.namespaces import parse_cgroup
from tcprio.model import VendorVersion


@dataclass(frozen=True)
class VendorProcess:
    """How a product's agent shows on a node: its command names, its image repositories."""

    vendor: str
    commands: frozenset[str]  # /proc/<pid>/comm (15 characters at most)
    image: re.Pattern[str]  # searched in the image's repository (no tag, no digest), lowercase
    generic: frozenset[str] = frozenset()  # commands that count only with the product's image


VENDOR_PROCESSES = (
    VendorProcess("Cilium", frozenset({"cilium-agent"}), re.compile(r"(^|/)cilium(-ci|-dev)?$")),
    VendorProcess(
        "Calico",
        frozenset({"calico-node", "calico-felix"}),
        re.compile(r"(^|/)(calico/node|calico-node)$"),
    ),
    VendorProcess(
        "Retina",
        frozenset({"retina-agent", "controller"}),
        re.compile(r"(^|/)retina-agent$"),
        generic=frozenset({"controller"}),  # the agent image runs /retina/controller
    ),
    VendorProcess("Beyla", frozenset({"beyla"}), re.compile(r"(^|/)beyla$")),
    VendorProcess(
        "OBI",
        frozenset({"ebpf-instrument", "obi"}),
        re.compile(r"(^|/)(ebpf-instrument|obi)$"),
    ),
    VendorProcess(
        "Datadog",
        frozenset({"system-probe", "agent", "security-agent"}),
        re.compile(r"datadog[^/]*/(agent|datadog-agent)$|(^|/)datadog-agent$"),
        generic=frozenset({"agent"}),
    ),
)
_COMMANDS = frozenset().union(*(v.commands for v in VENDOR_PROCESSES))
_TAG_VERSION = re.compile(r"v?(\d+\.\d+(?:\.\d+)*(?:[-+][0-9A-Za-z.+-]{1,64})?)")


def split_image(image: str) -> tuple[str, str | None]:
    """(repository, tag) of an image reference; the digest is dropped, the tag may be None.
    `quay.io/cilium/cilium:v1.16.3@sha256:...` -> ("quay.io/cilium/cilium", "v1.16.3")."""
    ref = image.strip().split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    name, _, tag = last.partition(":")
    repository = f"{head}/{name}" if head else name
    return repository.lower(), tag or None


def image_version(image: str) -> str | None:
    """The version an image's tag names (`v1.16.3` -> 1.16.3, `7.52.1-jmx` -> 7.52.1-jmx);
    None for `latest`, a digest alone or any tag that is not a version."""
    tag = split_image(image)[1]
    match = _TAG_VERSION.fullmatch(tag) if tag else None
    return match.group(1) if match else None


@dataclass
class FoundVersions:
    versions: dict[str, VendorVersion] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _vendor_of(command: str, bundle: Bundle) -> VendorProcess | None:
    repository = split_image(bundle.image or "")[0]
    for rule in VENDOR_PROCESSES:
        if command not in rule.commands:
            continue
        if rule.image.search(repository) or command not in rule.generic:
            return rule
    return None


def cgroup_container(proc: Path, pid: int) -> str | None:
    try:
        data, _ = read_proc_bytes(proc / str(pid) / "cgroup", 65536)
    except OSError:
        return None
    return parse_cgroup(data.decode("utf-8", "replace")).container


def _command(proc: Path, pid: int) -> str | None:
    try:
        data, _ = read_proc_bytes(proc / str(pid) / "comm", 64)
    except OSError:
        return None
    return data.decode("utf-8", "replace").strip()


def _pids(proc: Path) -> Iterable[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isascii() and n.isdigit() and len(n) < 12)


ContainerOf = Callable[[int], str | None]  # pid -> the id of the container it runs in


def find_versions(
    containers: NodeContainers,
    proc: Path = Path("/proc"),
    container_of: ContainerOf | None = None,
) -> FoundVersions:
    """Each product's version, from the image of the container its process runs in (the first
    process found per product wins; another version of the same product gives a note)."""
    found = FoundVersions()
    if not containers.bundles:
        return found  # no runtime state on this node: nothing to take a version from
    lookup = container_of or (lambda pid: cgroup_container(proc, pid))
    for pid in _pids(proc):
        command = _command(proc, pid)
        if command not in _COMMANDS:
            continue
        bundle = containers.by_id.get(lookup(pid) or "")
        rule = _vendor_of(command, bundle) if bundle is not None else None
        if bundle is None or rule is None:
            continue
        _add(found, rule.vendor, command, pid, bundle)
    return found


def _add(found: FoundVersions, vendor: str, command: str, pid: int, bundle: Bundle) -> None:
    image = label_of(bundle.image or "", 200)
    version = image_version(bundle.image or "")
    if version is None:
        if not any(n.startswith(f"{vendor}: ") for n in found.notes):  # once per product
            found.notes.append(
                f"{vendor}: {command} (pid {pid}) runs image {image or '(unknown)'}, whose tag "
                f"names no version ({bundle.label})"
            )
        return
    known = found.versions.get(vendor)
    source = f"container image {image} ({bundle.label})"
    if known is None:
        found.versions[vendor] = VendorVersion(vendor, version, source)
    elif known.version != version:
        note = f"{vendor}: another version runs too: {version} from {source}"
        if note not in found.notes:
            found.notes.append(note)
