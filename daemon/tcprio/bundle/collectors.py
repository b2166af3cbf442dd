"""The collectors of the node's state: the network namespaces, tcprio's own scan, in each
namespace its links, qdiscs, filters and BPF attachments, the BPF programs and links, the
tcprio service's journal, the kernel, versions. Read-only: only `show` / `list` commands run
(inside a namespace through `nsenter --net`), and the scan is tcprio's own read-only scan."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tcprio import __version__
from tcprio.bundle.collect import Collector, Context, Gather, Item
from tcprio.bundle.commands import first_line
from tcprio.bundle.common import json_bytes, safe_name, unique_name
from tcprio.model import NetNamespace

KERNEL_OPTIONS = (
    "CONFIG_BPF", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_NET_CLS_BPF",
    "CONFIG_NET_CLS_ACT", "CONFIG_NET_SCH_INGRESS", "CONFIG_NET_XGRESS", "CONFIG_NET_CLS_U32",
    "CONFIG_NET_CLS_MATCHALL", "CONFIG_NET_CLS_FLOWER", "CONFIG_NET_ACT_GACT",
    "CONFIG_NET_ACT_MIRRED", "CONFIG_DEBUG_INFO_BTF", "CONFIG_KPROBES", "CONFIG_FPROBE",
    "CONFIG_FUNCTION_TRACER", "CONFIG_BPF_EVENTS", "CONFIG_NETKIT", "CONFIG_CGROUP_BPF",
)  # fmt: skip
SYSCTLS = (
    "net.core.bpf_jit_enable",
    "kernel.unprivileged_bpf_disabled",
    "kernel.bpf_stats_enabled",
)
PYTHON_PACKAGES = ("pyroute2", "prometheus_client", "PyYAML")
TOOL_VERSIONS = (
    ("tc", "-V"),
    ("ip", "-V"),
    ("bpftool", "version"),
    ("nsenter", "--version"),
)


def _namespace_json(ns: NetNamespace, folder: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = dataclasses.asdict(ns)
    if folder is not None:
        document["archive_folder"] = folder
    return document


def namespaces_collector(ctx: Context, folders: dict[tuple[int, int], str]) -> Collector:
    def collect() -> list[Item]:
        ctx.namespaces = ctx.discover()
        taken: set[str] = set()
        for ns in ctx.namespaces:
            folders[ns.key] = "namespaces/" + unique_name(safe_name(ns.name), taken)
        listing = [_namespace_json(ns, folders[ns.key]) for ns in ctx.namespaces]
        return [Item("namespaces.json", json_bytes(listing))]

    return Collector("namespaces", collect)


def scan_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        from tcprio.report import render_text, scan_json
        from tcprio.scan import run_scan

        known = ctx.namespaces
        discover = ctx.discover if known is None else (lambda: list(known))
        assume = bool(getattr(ctx.args, "assume_datadog", False))
        scan = run_scan(discover=discover, settings=ctx.settings(), assume_datadog=assume)
        items = [Item("scan.json", json_bytes(scan_json(scan)))]
        items.append(Item("scan.txt", render_text(scan, color=False, detail=True).encode()))
        return items

    return Collector("scan", collect)


def hooked_interfaces(qdiscs_json: bytes, links_json: bytes) -> list[tuple[str, tuple[str, ...]]]:
    """(interface, directions) to list filters on: those with a clsact (ingress and egress) or
    a legacy ingress qdisc (ingress); every interface when the qdisc list cannot be read."""
    found: dict[str, tuple[str, ...]] = {}
    try:
        for qdisc in json.loads(qdiscs_json or b"null"):
            kind, dev = qdisc.get("kind"), qdisc.get("dev")
            if kind == "clsact" and dev:
                found[dev] = ("ingress", "egress")
            elif kind == "ingress" and dev:
                found.setdefault(dev, ("ingress",))
        return sorted(found.items())
    except (ValueError, TypeError, AttributeError):
        pass
    links = json.loads(links_json)
    return sorted((link["ifname"], ("ingress", "egress")) for link in links)


def netns_collector(ns: NetNamespace, folder: str) -> Collector:
    def collect() -> list[Item]:
        from tcprio.kernel.namespaces import NamespaceGone, open_namespace

        g = Gather()
        g.add(f"{folder}/namespace.json", json_bytes(_namespace_json(ns)))
        try:
            fd = open_namespace(ns)
        except NamespaceGone as exc:  # pods come and go: like the scan, not an error
            g.add(f"{folder}/vanished.txt", f"vanished before it could be read: {exc}\n")
            return g.done()
        except OSError as exc:
            g.fail(f"cannot open namespace {ns.name} ({ns.path}): {exc.strerror}")
            return g.done()
        try:
            _namespace_commands(g, (fd, ns.path), folder)
        finally:
            os.close(fd)
        return g.done()

    return Collector(f"netns-{folder.rpartition('/')[2]}", collect)


def _namespace_commands(g: Gather, netns: tuple[int, str], folder: str) -> None:
    links = g.command(f"{folder}/ip-link.json", ["ip", "-d", "-j", "link", "show"], netns)
    g.command(f"{folder}/ip-link.txt", ["ip", "-d", "link", "show"], netns)
    g.command(f"{folder}/tc-qdisc.txt", ["tc", "-s", "-d", "qdisc", "show"], netns)
    qdiscs = g.command(f"{folder}/tc-qdisc.json", ["tc", "-s", "-d", "-j", "qdisc", "show"], netns)
    try:
        hooks = hooked_interfaces(qdiscs.stdout if qdiscs.error is None else b"", links.stdout)
    except (ValueError, TypeError, KeyError) as exc:
        g.fail(f"cannot tell which interfaces have a clsact qdisc: {exc}")
        hooks = []
    taken: set[str] = set()
    for ifname, directions in hooks:
        safe_if = unique_name(safe_name(ifname), taken)
        for direction in directions:
            path = f"{folder}/tc-filter-{safe_if}-{direction}.txt"
            g.command(path, ["tc", "-s", "-d", "filter", "show", "dev", ifname, direction], netns)
    g.command(f"{folder}/bpftool-net.txt", ["bpftool", "net", "show"], netns)
    g.command(f"{folder}/bpftool-net.json", ["bpftool", "-j", "net", "show"], netns)


def bpf_collector() -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        for what in ("prog", "link"):
            g.command(f"bpf/bpftool-{what}.txt", ["bpftool", what, "show"])
            g.command(f"bpf/bpftool-{what}.json", ["bpftool", "-j", what, "show"])
        return g.done()

    return Collector("bpf", collect)


def logs_collector(ctx: Context) -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        argv = ["journalctl", "-u", "tcprio", "--no-pager", "-n", str(ctx.args.log_lines)]
        result = g.command("logs/journal-tcprio.txt", [*argv, "-o", "short-iso"])
        if result.error is None and "No journal files were found" in result.stderr:
            g.fail(f"{result.shown}: no journal on this node ({first_line(result.stderr)})")
        return g.done()

    return Collector("logs", collect)


def kernel_config_sources(release: str | None = None) -> tuple[Path, ...]:
    return (Path(f"/boot/config-{release or platform.release()}"), Path("/proc/config.gz"))


def kernel_config_text(
    options: Iterable[str] = KERNEL_OPTIONS, sources: Sequence[Path] | None = None
) -> str:
    """The running kernel's configuration lines for `options`, from the first of `sources`
    that can be read; FileNotFoundError naming every source tried when none can."""
    sources = kernel_config_sources() if sources is None else sources
    for source in sources:
        try:
            raw = source.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw) if source.suffix == ".gz" else raw
        return _pick_options(text.decode("utf-8", "replace"), source, options)
    tried = " nor ".join(str(s) for s in sources)
    raise FileNotFoundError(f"no kernel configuration: neither {tried} can be read")


def _pick_options(text: str, source: Path, options: Iterable[str]) -> str:
    lines: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"(?:# )?(CONFIG_\w+)(?:=| is not set)", line):
            lines[m.group(1)] = line.strip()
    picked = [f"# from {source}"]
    picked += [lines.get(o, f"# {o}: not in this configuration") for o in options]
    return "\n".join(picked) + "\n"


def _sysctl_text() -> str:
    lines = []
    for name in SYSCTLS:
        path = Path("/proc/sys") / name.replace(".", "/")
        try:
            lines.append(f"{name} = {path.read_text().strip()}")
        except OSError as exc:
            lines.append(f"{name}: not readable ({exc.strerror})")
    return "\n".join(lines) + "\n"


def kernel_collector() -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        g.command("kernel/uname.txt", ["uname", "-a"])
        for path, source in (
            ("kernel/proc-version.txt", Path("/proc/version")),
            ("kernel/os-release.txt", Path("/etc/os-release")),
        ):
            try:
                g.add(path, source.read_bytes())
            except OSError as exc:
                g.fail(f"{source}: {exc.strerror}")
        try:
            g.add("kernel/config.txt", kernel_config_text())
        except (OSError, EOFError) as exc:  # absent, or a damaged config.gz
            g.fail(str(exc))
        g.add("kernel/sysctl.txt", _sysctl_text())
        return g.done()

    return Collector("kernel", collect)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bcc_version() -> str:
    try:
        module = importlib.import_module("bcc")
    except Exception as exc:  # ImportError, or libbcc failing to load
        return f"not importable ({type(exc).__name__}: {exc})"
    return str(getattr(module, "__version__", "unknown version"))


def versions_collector() -> Collector:
    def collect() -> list[Item]:
        g = Gather()
        lines = [
            f"tcprio {__version__}",
            f"python {platform.python_version()} ({sys.executable})",
            *(f"{name} {_package_version(name)}" for name in PYTHON_PACKAGES),
            f"bcc {_bcc_version()}",
            "",
        ]
        for argv in TOOL_VERSIONS:
            result = g.command(None, argv)
            output = result.stdout.decode("utf-8", "replace").strip() or result.stderr.strip()
            lines.append(f"$ {result.shown}")
            lines.append(output if result.error is None else f"[failed: {result.error}]")
        g.add("versions.txt", "\n".join(lines) + "\n")
        return g.done()

    return Collector("versions", collect)
