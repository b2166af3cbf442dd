"""One full scan of the node: discover -> enumerate -> analyse. Reporting lives in report.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tcprio.analysis import semantics, vendors
from tcprio.analysis.classic_bpf import analyse_classic
from tcprio.analysis.conflicts import DatadogTarget, HookClassifiers, analyse
from tcprio.analysis.datadog_presence import decide_presence
from tcprio.analysis.netkit import NetkitPlacement, PlacedChain, chain_program_ids, place_chains
from tcprio.analysis.remedies import attach_remedies, incompatibility_notes
from tcprio.analysis.shadowing import ObserverRule, find_shadowings
from tcprio.analysis.verdicts import AnalysisLimits, SharedVerdicts, analyse_program
from tcprio.datadog import resolve_settings
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.btf import running_kernel_skb_cb_area
from tcprio.kernel.containers import NodeContainers, read_containers
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.kernel.programs import ProgramCatalogue, collect_programs
from tcprio.kernel.tc_inventory import peer_namespaces, read_namespace
from tcprio.kernel.versions import find_versions
from tcprio.model import (
    Classifier,
    ClassifierVerdict,
    DatadogPresence,
    DatadogSettings,
    Direction,
    HookInventory,
    HookKind,
    NamespaceInventory,
    NetNamespace,
    PresenceState,
    ProgramInfo,
    ProgramVerdicts,
    ScanResult,
    TcFilter,
    TcxEntry,
    VendorVersion,
    VerdictClass,
    XdpProgram,
)


@dataclass
class Scan:
    """Everything one scan found, for the report and the JSON output."""

    inventories: list[NamespaceInventory]
    catalogue: ProgramCatalogue
    verdicts: dict[int, ProgramVerdicts]
    datadog: DatadogSettings
    result: ScanResult
    vanished: list[str] = field(default_factory=list)  # namespaces gone mid-scan
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    versions: dict[str, VendorVersion] = field(default_factory=dict)  # vendor -> its version
    # (namespace key, ifindex) of a host-side veth -> the namespace its other end is in
    peers: dict[tuple[tuple[int, int], int], NetNamespace] = field(default_factory=dict)


def enumerate_namespaces(
    namespaces: Iterable[NetNamespace],
) -> tuple[list[NamespaceInventory], list[str]]:
    inventories, vanished = [], []
    for ns in namespaces:
        inventory = read_namespace(ns)
        if inventory is None:
            vanished.append(ns.name)
        else:
            inventories.append(inventory)
    return inventories, vanished


def attached_program_ids(inventories: Iterable[NamespaceInventory]) -> list[int]:
    ids: list[int] = []
    for inventory in inventories:
        for interface in inventory.interfaces:
            ids.extend(x.prog_id for x in interface.xdp)
            for hook in interface.hooks:
                ids.extend(f.prog_id for f in hook.filters if f.prog_id is not None)
                ids.extend(t.prog_id for t in hook.tcx)
    ids.extend(chain_program_ids(inventories))
    return ids


class ProgramCache:
    """Program infos and verdicts kept between analyses.

    A loaded program never changes, so its info is kept by id (ids are not reused). Its
    verdict also depends on the prog arrays its tail calls go through, which do change: a
    verdict is reused only while those arrays hold the same programs.
    """

    def __init__(self, limits: AnalysisLimits | None = None, share: bool = True) -> None:
        self.limits = limits or AnalysisLimits()
        self.infos: dict[int, ProgramInfo] = {}
        self._verdicts: dict[int, tuple[tuple, ProgramVerdicts]] = {}
        self._helper_names: Mapping[int, str] | None = None
        # one analysis for programs that differ only in constants (share=False: the bench's
        # baseline)
        self.shared = SharedVerdicts(enabled=share)

    def catalogue(self, roots: Iterable[int]) -> ProgramCatalogue:
        catalogue = collect_programs(roots, known=self.infos)
        self.infos = dict(catalogue.programs)  # forget programs no longer reachable
        return catalogue

    def _helpers(self) -> Mapping[int, str]:
        if self._helper_names is None:  # ~150 ms reading /proc/kallsyms: only when needed
            self._helper_names = bpf_syscalls.helper_symbols()
        return self._helper_names

    @staticmethod
    def ctx_cb() -> tuple[int, int] | None:
        """Where a tc program's skb->cb[] lies in the running kernel (its BTF, read once)."""
        return running_kernel_skb_cb_area()

    def missing(self, catalogue: ProgramCatalogue, roots: Iterable[int]) -> list[int]:
        """The roots without a verdict for what their prog arrays hold now."""
        found = []
        for prog_id in dict.fromkeys(roots):
            if prog_id not in catalogue.programs:
                continue
            cached = self._verdicts.get(prog_id)
            if cached is None or cached[0] != tail_call_state(prog_id, catalogue):
                found.append(prog_id)
        return found

    def analyse(
        self, catalogue: ProgramCatalogue, roots: Iterable[int]
    ) -> dict[int, tuple[tuple, ProgramVerdicts]]:
        """Verdicts of `roots`, each with the prog-array state it holds for. Pure analysis: the
        daemon runs it on its analysis thread (nothing else uses `shared` meanwhile)."""
        helpers = self._helpers()
        ctx_cb = self.ctx_cb()
        analysed = {}
        for prog_id in roots:
            verdict = self.shared.verdicts(
                prog_id, catalogue.programs, catalogue.maps,
                lambda root, masks, progs, maps: analyse_program(
                    root, progs, maps, helpers, self.limits, masks, ctx_cb
                ),
            )  # fmt: skip
            analysed[prog_id] = (tail_call_state(prog_id, catalogue), verdict)
        return analysed

    def store(self, analysed: Mapping[int, tuple[tuple, ProgramVerdicts]]) -> None:
        self._verdicts.update(analysed)

    def verdicts(
        self, catalogue: ProgramCatalogue, roots: Iterable[int]
    ) -> dict[int, ProgramVerdicts]:
        """Every root's verdict, analysing what is missing; forgets roots not asked for."""
        roots = [prog_id for prog_id in dict.fromkeys(roots) if prog_id in catalogue.programs]
        self.store(self.analyse(catalogue, self.missing(catalogue, roots)))
        self._verdicts = {prog_id: self._verdicts[prog_id] for prog_id in roots}
        return {prog_id: self._verdicts[prog_id][1] for prog_id in roots}


def tail_call_state(prog_id: int, catalogue: ProgramCatalogue) -> tuple:
    """The contents of every prog array reachable from `prog_id`, and the freplace links of every
    program reached (as (-program id, its replaced functions)), as a comparable key."""
    state: list[tuple] = []
    pending, seen_progs, seen_maps = [prog_id], set(), set()
    while pending:
        current = pending.pop()
        if current in seen_progs or current not in catalogue.programs:
            continue
        seen_progs.add(current)
        replaced = catalogue.programs[current].replaced_functions
        if replaced:
            state.append((-current, replaced))
            pending.extend(ext for _off, ext in replaced)
        for map_id in catalogue.programs[current].map_ids:
            info = catalogue.maps.get(map_id)
            if map_id in seen_maps or info is None or info.prog_array is None:
                continue
            seen_maps.add(map_id)
            state.append((map_id, tuple(sorted(info.prog_array.items()))))
            pending.extend(info.prog_array.values())
    return tuple(sorted(state))


def _unknown(reason: str) -> ClassifierVerdict:
    return ClassifierVerdict(VerdictClass.UNKNOWN, reason=reason)


def _program_verdicts(
    prog_id: int | None, verdicts: Mapping[int, ProgramVerdicts], catalogue: ProgramCatalogue
) -> ProgramVerdicts | str:
    """The program's analysis, or a string saying why it was not read."""
    if prog_id is None:
        return "the kernel did not report the filter's program id"
    if prog_id not in verdicts:
        return catalogue.errors.get(prog_id, f"program {prog_id} vanished during the scan")
    return verdicts[prog_id]


def filter_verdict(
    f: TcFilter, verdicts: Mapping[int, ProgramVerdicts], catalogue: ProgramCatalogue
) -> ClassifierVerdict:
    if f.kind != "bpf":
        return semantics.classify_non_bpf_filter(
            f.kind, f.actions, f.action_controls, f.u32_terminal, f.u32_link
        )
    if f.classic_ops is not None:
        return _classic_verdict(f)
    analysed = _program_verdicts(f.prog_id, verdicts, catalogue)
    if isinstance(analysed, str):
        return _unknown(analysed)
    values, partial = analysed.values, analysed.known_values
    if f.direct_action:
        return semantics.classify_clsact_direct_action(values, partial)
    return semantics.classify_clsact_classid(values, f.actions, partial, f.action_controls)


def _classic_verdict(f: TcFilter) -> ClassifierVerdict:
    """Classic bytecode runs in class-id mode: 0 is no match, anything else ends the chain."""
    returns = analyse_classic(f.classic_ops or ())
    values = returns.values if returns.complete else None
    verdict = semantics.classify_clsact_classid(
        values, f.actions, returns.values, f.action_controls
    )
    if verdict.verdict_class is VerdictClass.UNKNOWN and returns.unknown:
        return _unknown("classic BPF: " + "; ".join(returns.unknown))
    return replace(verdict, reason="classic BPF: " + verdict.reason)


def tcx_verdict(
    entry: TcxEntry, verdicts: Mapping[int, ProgramVerdicts], catalogue: ProgramCatalogue
) -> ClassifierVerdict:
    analysed = _program_verdicts(entry.prog_id, verdicts, catalogue)
    if isinstance(analysed, str):
        return _unknown(analysed)
    return semantics.classify_tcx(analysed.values, analysed.known_values)


def _program_classifier(
    hook: HookKind,
    prog_id: int,
    position: int,
    classify: Callable[..., ClassifierVerdict],
    verdicts: Mapping[int, ProgramVerdicts],
    catalogue: ProgramCatalogue,
    **extra: Any,
) -> Classifier:
    """A program that runs on its own (not a tc filter), judged by `classify`."""
    program = catalogue.programs.get(prog_id)
    prog_name = display_name(program)
    vendor, _, evidence = _identity(prog_name, None)
    analysed = _program_verdicts(prog_id, verdicts, catalogue)
    verdict = (
        _unknown(analysed)
        if isinstance(analysed, str)
        else classify(analysed.values, analysed.known_values)
    )
    return Classifier(
        hook=hook,
        position=position,
        prog_id=prog_id,
        name=prog_name or f"prog {prog_id}",
        vendor=vendor,
        verdict=verdict,
        vendor_evidence=evidence,
        **extra,
    )


def netkit_classifier(
    entry: TcxEntry,
    chain: PlacedChain,
    verdicts: Mapping[int, ProgramVerdicts],
    catalogue: ProgramCatalogue,
) -> Classifier:
    return _program_classifier(
        HookKind.NETKIT, entry.prog_id, entry.position, semantics.classify_netkit, verdicts,
        catalogue, link_id=entry.link_id, netkit_chain=chain.label,
    )  # fmt: skip


def xdp_classifier(
    entry: XdpProgram, verdicts: Mapping[int, ProgramVerdicts], catalogue: ProgramCatalogue
) -> Classifier:
    """A device's XDP program, as the first classifier of its ingress hook."""
    return _program_classifier(
        HookKind.XDP, entry.prog_id, entry.position, semantics.classify_xdp, verdicts,
        catalogue, xdp_mode=entry.mode,
    )  # fmt: skip


def _identity(prog_name: str | None, filter_name: str | None) -> tuple[str | None, bool, str]:
    """(vendor, whether it is Datadog's classifier, the evidence)."""
    found = vendors.identify_with_evidence(prog_name, filter_name)
    if found is None:
        return None, False, ""
    rule, evidence = found
    return rule.name, rule.datadog_classifier, evidence


def display_name(program: ProgramInfo | None) -> str | None:
    """The full name from BTF when the program has one; the kernel keeps only 15 characters."""
    if program is None:
        return None
    return program.full_name or program.name


def filter_classifier(
    f: TcFilter, verdicts: Mapping[int, ProgramVerdicts], catalogue: ProgramCatalogue
) -> Classifier:
    program = catalogue.programs.get(f.prog_id) if f.prog_id is not None else None
    prog_name = display_name(program)
    vendor, is_datadog, evidence = _identity(prog_name, f.name)
    return Classifier(
        hook=HookKind.CLSACT,
        position=f.position,
        prog_id=f.prog_id,
        name=prog_name or f.name or f.kind,
        vendor=vendor,
        verdict=filter_verdict(f, verdicts, catalogue),
        priority=f.priority,
        handle=f.handle,
        chain=f.chain,
        kind=f.kind,
        protocol=f.protocol,
        direct_action=f.direct_action,
        filter_name=f.name,
        is_datadog=is_datadog,
        vendor_evidence=evidence,
    )


def tcx_classifier(
    entry: TcxEntry, verdicts: Mapping[int, ProgramVerdicts], catalogue: ProgramCatalogue
) -> Classifier:
    program = catalogue.programs.get(entry.prog_id)
    prog_name = display_name(program)
    vendor, _, evidence = _identity(prog_name, None)
    return Classifier(
        hook=HookKind.TCX,
        position=entry.position,
        prog_id=entry.prog_id,
        name=prog_name or f"prog {entry.prog_id}",
        vendor=vendor,
        verdict=tcx_verdict(entry, verdicts, catalogue),
        kind="bpf",
        link_id=entry.link_id,
        vendor_evidence=evidence,
    )


def hook_classifiers(
    ns_name: str,
    ifname: str,
    hook: HookInventory,
    verdicts: Mapping[int, ProgramVerdicts],
    catalogue: ProgramCatalogue,
    netkit: PlacedChain | None = None,
    xdp: Sequence[XdpProgram] = (),
) -> HookClassifiers:
    """`netkit`: the netkit chain that runs before this (ingress) hook, if any; `xdp`: the
    device's XDP programs (they run on receive, before its ingress hooks)."""
    found = [xdp_classifier(x, verdicts, catalogue) for x in xdp]
    found += [tcx_classifier(t, verdicts, catalogue) for t in hook.tcx]
    found += [filter_classifier(f, verdicts, catalogue) for f in hook.filters]
    if hook.block is not None:  # the same filters run on every hook bound to the block
        found = [replace(c, block=hook.block) if c.hook is HookKind.CLSACT else c for c in found]
    if netkit is not None:
        found += [netkit_classifier(e, netkit, verdicts, catalogue) for e in netkit.entries]
    return HookClassifiers(ns_name, ifname, hook.direction, tuple(found))


def all_hooks(
    inventories: Iterable[NamespaceInventory],
    verdicts: Mapping[int, ProgramVerdicts],
    catalogue: ProgramCatalogue,
    placement: NetkitPlacement | None = None,
) -> list[HookClassifiers]:
    """Every hook with a classifier; `placement` says which netkit chain precedes an ingress."""
    before = placement.before_ingress if placement is not None else {}
    hooks = []
    for inventory in inventories:
        for interface in inventory.interfaces:
            for hook in interface.hooks:
                netkit, xdp = None, ()
                if hook.direction is Direction.INGRESS:
                    netkit = before.get((inventory.namespace.key, interface.ifindex))
                    xdp = interface.xdp
                if hook.filters or hook.tcx or netkit or xdp:
                    hooks.append(
                        hook_classifiers(
                            inventory.namespace.name, interface.name, hook, verdicts, catalogue,
                            netkit, xdp,
                        )
                    )  # fmt: skip
    return hooks


def datadog_target(
    settings: DatadogSettings, presence: DatadogPresence | None = None
) -> DatadogTarget:
    """Where Datadog's classifier goes; without `presence`, whether it runs is what the
    settings' network.enabled says."""
    directions = {Direction.EGRESS}
    ingress = settings.ingress_enabled
    if ingress is None or bool(ingress.value):
        directions.add(Direction.INGRESS)
    return DatadogTarget(
        priority=int(settings.classifier_priority.value),  # type: ignore[call-overload]
        enabled=presence.runs if presence is not None else bool(settings.enabled.value),
        directions=frozenset(directions),
        presence=presence,
    )


def observed_hooks(result: ScanResult) -> dict[str, frozenset[HookKind]]:
    """Vendor -> the hooks its programs were seen on."""
    seen: dict[str, set[HookKind]] = {}
    for hook in result.hooks:
        for c in hook.classifiers:
            if c.vendor:
                seen.setdefault(c.vendor, set()).add(c.hook)
    return {vendor: frozenset(hooks) for vendor, hooks in seen.items()}


def vendor_versions_with(
    versions: Mapping[str, VendorVersion] | None, cilium_version: str | None
) -> dict[str, VendorVersion]:
    """The vendors' versions found on the node; `--cilium-version` overrides Cilium's."""
    found = dict(versions or {})
    if cilium_version:
        found["Cilium"] = VendorVersion("Cilium", cilium_version, "--cilium-version")
    return found


DATADOG_CONFIGURED = frozenset(
    {PresenceState.ACTIVE, PresenceState.ASSUMED, PresenceState.CONFIGURED}
)


@dataclass
class NodeAnalysis:
    """What the analysis stage makes of a set of inventories."""

    catalogue: ProgramCatalogue
    verdicts: dict[int, ProgramVerdicts]
    result: ScanResult


def analyse_node(
    inventories: list[NamespaceInventory],
    datadog: DatadogSettings,
    cache: ProgramCache | None = None,
    cilium_version: str | None = None,
    observers: Sequence[ObserverRule] = (),
    catalogue: ProgramCatalogue | None = None,
    assume_datadog: bool = False,
    vendor_versions: Mapping[str, VendorVersion] | None = None,
    datadog_seen_before: str | None = None,
) -> NodeAnalysis:
    """Programs, verdicts, conflicts and remedies for the given inventories, and every other
    classifier hidden (`observers`: those the daemon's configuration names). Conflicts keep
    their severity only where Datadog's detection is active, or `assume_datadog`;
    `datadog_seen_before` says when the daemon last saw Datadog's classifiers attached.

    `cache` keeps program infos and verdicts between calls (the daemon); without it every
    program is read and analysed afresh (a one-shot scan).
    """
    cache = cache if cache is not None else ProgramCache()
    roots = attached_program_ids(inventories)
    catalogue = catalogue if catalogue is not None else cache.catalogue(roots)
    verdicts = cache.verdicts(catalogue, roots)
    placement = place_chains(inventories)
    hooks = all_hooks(inventories, verdicts, catalogue, placement)
    presence = decide_presence(datadog, hooks, assume_datadog, datadog_seen_before)
    result = analyse(hooks, datadog_target(datadog, presence))
    result = attach_remedies(result, datadog)
    result.notes.extend(placement.notes)
    result.notes.extend(
        incompatibility_notes(
            datadog,
            vendor_versions_with(vendor_versions, cilium_version),
            observed_hooks(result),
            kernel_release=os.uname().release,
            datadog_configured=presence.state in DATADOG_CONFIGURED,
        )
    )
    result.shadowings = find_shadowings(result.hooks, observers)
    return NodeAnalysis(catalogue, verdicts, result)


def inventory_errors(inventories: Iterable[NamespaceInventory]) -> list[str]:
    return [f"{inv.namespace.name}: {inv.error}" for inv in inventories if inv.error]


def run_scan(
    discover: Callable[[], list[NetNamespace]] = discover_namespaces,
    settings: DatadogSettings | None = None,
    cilium_version: str | None = None,
    observers: Sequence[ObserverRule] = (),
    assume_datadog: bool = False,
    vendor_versions: Mapping[str, VendorVersion] | None = None,
    containers: NodeContainers | None = None,
) -> Scan:
    """`vendor_versions`: None to find them on the node, from `containers` (the runtimes'
    bundles, read from their default places when None; the command line reads them once for
    both `discover` and this)."""
    started = time.monotonic()
    inventories, vanished = enumerate_namespaces(discover())
    notes: list[str] = []
    if vendor_versions is None:
        containers = containers if containers is not None else read_containers()
        found = find_versions(containers)
        vendor_versions, notes = found.versions, found.notes
    datadog = settings if settings is not None else resolve_settings()
    datadog = _with_agent_version(datadog, vendor_versions)
    node = analyse_node(
        inventories, datadog, cilium_version=cilium_version, observers=observers,
        assume_datadog=assume_datadog, vendor_versions=vendor_versions,
    )  # fmt: skip
    node.result.notes.extend(notes)
    return Scan(
        inventories=inventories,
        catalogue=node.catalogue,
        verdicts=node.verdicts,
        datadog=datadog,
        result=node.result,
        vanished=vanished,
        errors=inventory_errors(inventories) + list(containers.notes if containers else ()),
        duration_s=time.monotonic() - started,
        versions=vendor_versions_with(vendor_versions, cilium_version),
        peers=veth_peers(inventories),
    )


def veth_peers(
    inventories: Sequence[NamespaceInventory], home: tuple[int, int] | None = None
) -> dict[tuple[tuple[int, int], int], NetNamespace]:
    """(namespace key, ifindex) of each host-side veth -> the namespace of its other end (a
    pod's), from the veth's IFLA_LINK_NETNSID and the ids the host gives the namespaces.
    `home`: the key of the namespace playing the host (default: the host's)."""
    host = next(
        (
            i
            for i in inventories
            if (i.namespace.key == home if home else i.namespace.source in ("host", "self"))
        ),
        None,
    )
    if host is None or not any(i.peer_netnsid is not None for i in host.interfaces):
        return {}
    others = [i.namespace for i in inventories if i is not host]
    by_nsid = peer_namespaces(host.namespace, others)
    return {
        (host.namespace.key, i.ifindex): by_nsid[i.peer_netnsid]
        for i in host.interfaces
        if i.peer_netnsid is not None and i.peer_netnsid in by_nsid
    }


def _with_agent_version(
    datadog: DatadogSettings, versions: Mapping[str, VendorVersion]
) -> DatadogSettings:
    """The agent's version from its container's image when the settings found none."""
    found = versions.get("Datadog")
    if datadog.agent_version is not None or found is None:
        return datadog
    return replace(datadog, agent_version=found.version, agent_version_source=found.source)
