"""Plain data shared by every stage: discover -> enumerate -> analyse -> report.

Nothing here touches the kernel. The kernel layers (namespaces, tc, bpf) build these objects;
the analysis modules (verdicts, conflicts) take them in and hand findings out.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

ETH_P_ALL = 0x0003


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class HookKind(StrEnum):
    """Where a classifier hangs: a tcx link chain, or a filter on a clsact / ingress qdisc."""

    TCX = "tcx"
    CLSACT = "clsact"
    NETKIT = "netkit"  # a netkit device's program chain, run before the other device's ingress
    XDP = "xdp"  # a device's XDP program: runs on receive, before its tcx and clsact ingress


class VerdictClass(StrEnum):
    TRANSPARENT = "transparent"  # always lets the next classifier run
    TERMINAL = "terminal"  # may end the chain
    UNKNOWN = "unknown"  # could not be proven either way


# --- discovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetNamespace:
    """One network namespace of the node, deduplicated by (dev, inode)."""

    inode: int
    dev: int
    name: str  # readable: netns name, container / pod, "pid:<n>", or "host"
    path: str  # a path that opens it: /run/netns/x, /proc/<pid>/ns/net ...
    source: str  # "host", "named", "docker", "process"
    pid: int | None = None  # a process living in it, when found through /proc
    container: str | None = None
    pod: str | None = None  # the pod's name (or its UID when only that is known)
    pod_namespace: str | None = None  # the pod's Kubernetes namespace
    pod_uid: str | None = None
    netns: str | None = None  # the raw name of a named namespace (/run/netns/cni-...)
    named_by: str | None = None  # where the pod's name came from (a runtime bundle, a cgroup)

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.inode)

    def matches(self, pattern: str) -> bool:
        """Its name, or its raw netns name, matches the glob (`--netns`, the daemon's lists)."""
        names = (self.name, self.netns) if self.netns else (self.name,)
        return any(fnmatch.fnmatchcase(name, pattern) for name in names)


@dataclass(frozen=True)
class VendorVersion:
    """A product's version found on the node, and where it came from (a container image, a
    command-line flag)."""

    vendor: str
    version: str
    source: str


# --- enumeration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TcFilter:
    """One filter on a clsact (or legacy ingress) qdisc, as netlink reports it."""

    kind: str  # "bpf", "u32", ...
    chain: int
    priority: int
    handle: int
    protocol: int  # ethertype in host order; ETH_P_ALL (3) for "all"
    position: int  # index in the kernel's dump of this hook: the order the kernel runs them
    direct_action: bool | None = None  # cls_bpf only
    name: str | None = None  # cls_bpf TCA_BPF_NAME
    prog_id: int | None = None  # cls_bpf only
    tag: str | None = None  # cls_bpf program tag, 16 hex digits
    classid: int | None = None
    actions: tuple[str, ...] = ()  # kinds of the attached actions, in order ("mirred", ...)
    # cls_bpf with classic BPF (`tc filter ... bpf bytecode`): its instructions, as the kernel
    # dumps them (code, jt, jf, k); such a filter has no program id.
    classic_ops: tuple[tuple[int, int, int, int], ...] | None = None
    # Per action, in order: the verdicts it can return (its control: TC_ACT_PIPE for `pipe`,
    # TC_ACT_UNSPEC for `continue`, TC_ACT_STOLEN for a mirred redirect, ...); () for an
    # action whose verdict tcprio does not model. Empty when the actions were not read.
    action_controls: tuple[tuple[int, ...], ...] = ()
    # u32 only: whether a match runs the key's actions (TC_U32_TERMINAL: it has a classid or
    # actions); a key without it only descends into the hash table it links to, if any.
    u32_terminal: bool | None = None
    u32_link: int | None = None  # u32 only: the handle of the hash table a match descends into


@dataclass(frozen=True)
class TcxEntry:
    """One program on a tcx hook (kernel 6.6+), in execution order."""

    prog_id: int
    position: int
    link_id: int | None = None  # None when attached without a link (legacy BPF_PROG_ATTACH)


class NetkitChain(StrEnum):
    """The two program chains of a netkit pair (BPF_NETKIT_PRIMARY / BPF_NETKIT_PEER)."""

    PRIMARY = "primary"  # runs when the primary transmits: before the peer's ingress
    PEER = "peer"  # runs when the peer transmits: before the primary's ingress


@dataclass(frozen=True)
class NetkitDevice:
    """One end of a netkit pair (kernel 6.7+), as its link dump and BPF_PROG_QUERY show it.

    Both chains are read on the primary only (the kernel answers queries there alone)."""

    primary: bool
    peer_ifindex: int | None = None  # IFLA_LINK: the other end, in its own namespace
    peer_netnsid: int | None = None  # IFLA_LINK_NETNSID; None when both ends share a namespace
    mode: int | None = None  # NETKIT_L2 (0) or NETKIT_L3 (1)
    policy: int | None = None  # what this end's transmits get without programs: 0 pass, 2 drop
    peer_policy: int | None = None  # the same, for the other end
    primary_chain: tuple[TcxEntry, ...] = ()
    peer_chain: tuple[TcxEntry, ...] = ()
    error: str | None = None  # a chain that could not be read


@dataclass(frozen=True)
class XdpProgram:
    """An XDP program on a device (IFLA_XDP of the link dump), in the order a packet meets them:
    offloaded ("hw") first, then the driver's ("drv") or the generic one ("skb")."""

    prog_id: int
    mode: str  # "hw", "drv" or "skb"
    position: int = 0


@dataclass(frozen=True)
class HookInventory:
    """Everything that sees a packet on one interface in one direction."""

    direction: Direction
    qdisc: str | None  # "clsact", "ingress", or None when no such qdisc exists
    filters: tuple[TcFilter, ...] = ()
    tcx: tuple[TcxEntry, ...] = ()
    error: str | None = None  # a partial failure reading this hook
    block: int | None = None  # the shared filter block (`ingress_block N`) the hook runs, if any


@dataclass(frozen=True)
class Interface:
    ifindex: int
    name: str
    hooks: tuple[HookInventory, ...]
    kind: str | None = None  # link kind: "veth", "bridge", ...
    netkit: NetkitDevice | None = None  # a netkit device's pair and program chains
    xdp: tuple[XdpProgram, ...] = ()  # its XDP programs (they run before its ingress hooks)
    # veth only: the other end's ifindex (IFLA_LINK) and its namespace's id as this namespace
    # numbers it (IFLA_LINK_NETNSID; None when both ends share the namespace)
    peer_ifindex: int | None = None
    peer_netnsid: int | None = None


@dataclass(frozen=True)
class NamespaceInventory:
    namespace: NetNamespace
    interfaces: tuple[Interface, ...]
    error: str | None = None


@dataclass(frozen=True)
class Instruction:
    """One eBPF instruction, decoded from the kernel's translated (xlated) image."""

    code: int
    dst: int
    src: int
    off: int  # signed 16 bits
    imm: int  # signed 32 bits


_INSN = struct.Struct("<BBhi")  # code, dst | src << 4, off, imm


class RawInstructions(Sequence[Instruction]):
    """A program's instructions as the kernel hands them out (8 little-endian bytes each),
    decoded into `Instruction`s only when read one by one: the analysis reads `raw` directly,
    and a node's thousands of instructions per program need not become objects."""

    __slots__ = ("_decoded", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) % _INSN.size:
            raise ValueError(f"{len(raw)} bytes is not a whole number of eBPF instructions")
        self.raw = bytes(raw)
        self._decoded: tuple[Instruction, ...] | None = None

    def _all(self) -> tuple[Instruction, ...]:
        if self._decoded is None:
            self._decoded = tuple(
                Instruction(code=code, dst=regs & 0x0F, src=regs >> 4, off=off, imm=imm)
                for code, regs, off, imm in _INSN.iter_unpack(self.raw)
            )
        return self._decoded

    def __len__(self) -> int:
        return len(self.raw) // _INSN.size

    def __getitem__(self, index):  # type: ignore[override]
        return self._all()[index]

    def __iter__(self) -> Iterator[Instruction]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawInstructions):
            return self.raw == other.raw
        if isinstance(other, Sequence):
            return self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"RawInstructions({len(self)} instructions)"


@dataclass(frozen=True)
class ProgramInfo:
    """What BPF_OBJ_GET_INFO_BY_FD says of one program."""

    id: int
    name: str
    tag: str  # 16 hex digits
    type: int
    type_name: str
    load_time_ns: int  # since boot
    map_ids: tuple[int, ...]
    # None when the kernel would not show them; RawInstructions when read from the kernel
    insns: Sequence[Instruction] | None
    run_cnt: int = 0
    run_time_ns: int = 0
    created_by_uid: int = 0
    btf_id: int = 0
    error: str | None = None  # why insns are missing, when they are
    full_name: str | None = None  # main function's BTF name (name is cut to 15 chars); None: no BTF
    # freplace links: (first instruction of the replaced global function, the BPF_PROG_TYPE_EXT
    # program that runs instead), sorted; the offset is -1 when the function could not be placed
    # (its BTF id is not in the program's func_info). Set by the catalogue: links come and go.
    replaced_functions: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class MapInfo:
    """What BPF_OBJ_GET_INFO_BY_FD says of one map; prog arrays carry their current slots."""

    id: int
    type: int
    type_name: str
    name: str
    key_size: int
    value_size: int
    max_entries: int
    prog_array: dict[int, int] | None = None  # slot index -> program id, for prog arrays
    prog_array_read: int | None = None  # slots read, when not all were (a huge prog array)


# --- verdict analysis ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitPath:
    """One way a program can finish, with the raw values r0 may hold there."""

    pc: int  # instruction index of the exit, in the program named by prog_id
    prog_id: int
    values: frozenset[int] | None  # raw 32-bit signed return values; None = unknown
    note: str = ""  # how it got there: "tail call to prog 12 (map 4 slot 0)", "bpf_redirect()"
    # When values is None: values r0 is known to hold here on some paths (`return TC_ACT_SHOT`
    # funnelled into the same exit as a verdict read from a map).
    may_return: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ProgramVerdicts:
    """The result of the static analysis of one program (following its tail calls)."""

    prog_id: int
    values: frozenset[int] | None  # union over every exit; None when any exit is unknown
    exits: tuple[ExitPath, ...]
    unknown_reasons: tuple[str, ...] = ()
    work: int = 0  # units of work the analysis took (AnalysisLimits.max_work), 0 when shared

    @property
    def known_values(self) -> frozenset[int]:
        """What the exits whose values are known can return: when `values` is None, a program
        can still be shown to return a chain-ending code at one exit it reaches."""
        if self.values is not None:
            return self.values
        return frozenset().union(
            *(e.values if e.values is not None else e.may_return for e in self.exits)
        )


@dataclass(frozen=True)
class ClassifierVerdict:
    """What the kernel does with what a classifier returns, on its hook."""

    verdict_class: VerdictClass
    terminal_actions: tuple[str, ...] = ()  # e.g. ("TC_ACT_OK", "TC_ACT_REDIRECT")
    reason: str = ""


# --- Datadog configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One effective setting with where it came from ("default", "file:...", "env:...")."""

    value: object
    source: str


@dataclass(frozen=True)
class DatadogSettings:
    enabled: Setting
    classifier_priority: Setting
    classifier_handle: Setting
    ingress_enabled: Setting | None = None
    agent_version: str | None = None
    agent_version_source: str | None = None
    notes: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # bad input that was ignored, one line each
    wp_enabled: Setting | None = None  # runtime_security_config.enabled (Workload Protection)
    # Where the settings come from: "process" (a verified system-probe), "files" (local config
    # files or install found), "none" (nothing of Datadog's found: defaults only).
    found: str = "none"
    found_evidence: tuple[str, ...] = ()  # one line each: the process taken, the files read
    raw_packet_enabled: Setting | None = None  # network.raw_packet.enabled
    raw_classifier_handle: Setting | None = None  # network.raw_classifier_handle


class PresenceState(StrEnum):
    """Whether Datadog's network detection runs on the node (see analysis/datadog_presence)."""

    ACTIVE = "active"
    ASSUMED = "assumed"
    DISABLED = "disabled"
    CONFIGURED = "configured"
    ABSENT = "absent"


@dataclass(frozen=True)
class DatadogPresence:
    state: PresenceState
    evidence: tuple[str, ...] = ()  # one line each, the main one first

    @property
    def runs(self) -> bool:
        """Conflicts keep their severity only when detection runs (or is assumed to)."""
        return self.state in (PresenceState.ACTIVE, PresenceState.ASSUMED)


# --- conflicts -------------------------------------------------------------------------------


class Severity(StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Classifier:
    """One classifier on one hook, ready for the conflict analysis."""

    hook: HookKind
    position: int  # order in which it sees a packet on its hook, 0 first
    prog_id: int | None
    name: str  # program name, or filter name, or kind
    vendor: str | None
    verdict: ClassifierVerdict
    priority: int | None = None  # clsact only
    handle: int | None = None  # clsact only
    chain: int = 0
    kind: str = "bpf"
    protocol: int = ETH_P_ALL
    direct_action: bool | None = None
    filter_name: str | None = None
    link_id: int | None = None
    is_datadog: bool = False
    vendor_evidence: str = ""  # the names that identified the vendor, one line
    block: int | None = None  # the shared filter block it is on (it runs on every hook bound)
    # netkit only: whose chain it is, e.g. "peer chain of nk0" (the primary device's name)
    netkit_chain: str | None = None
    xdp_mode: str | None = None  # xdp only: "skb", "drv" or "hw"


@dataclass(frozen=True)
class Remedy:
    summary: str
    system_probe_yaml: str = ""
    helm_values: str = ""
    environment: str = ""
    extra: tuple[str, ...] = ()
    operator_values: str = ""  # Datadog Operator: the DatadogAgent resource's lines


@dataclass(frozen=True)
class Conflict:
    namespace: str
    interface: str
    direction: Direction
    severity: Severity
    blocker: Classifier
    datadog_priority: int
    datadog_attached: bool
    message: str
    recommended_priority: int | None = None
    remedies: tuple[Remedy, ...] = ()


@dataclass(frozen=True)
class HookReport:
    """A hook's classifiers in the order they see a packet, and what stands in Datadog's way."""

    namespace: str
    interface: str
    direction: Direction
    classifiers: tuple[Classifier, ...]
    conflicts: tuple[Conflict, ...] = ()
    notes: tuple[str, ...] = ()


# --- shadowing: every other classifier a classifier before it can hide ----------------------


class ShadowKind(StrEnum):
    OBSERVER_HIDDEN = "observer_hidden"  # an observer (Retina, Beyla, a configured one) hidden
    POLICY_BYPASS = "policy_bypass"  # a CNI's policy program behind one that returns TC_ACT_OK
    HIDDEN = "hidden"  # any other classifier hidden


@dataclass(frozen=True)
class Shadowing:
    """A classifier (not Datadog's: that is a Conflict) that one before it on its hook may hide."""

    namespace: str
    interface: str
    direction: Direction
    kind: ShadowKind
    severity: Severity
    hidden: Classifier
    blocker: Classifier  # the earliest classifier that may hide it
    message: str
    hidden_label: str = ""  # who the hidden one is: its vendor, or a configured observer's name
    other_blockers: int = 0  # further classifiers before it that may hide it too


@dataclass
class ScanResult:
    hooks: list[HookReport] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    recommended_priority: int | None = None
    recommendation_note: str = ""
    notes: list[str] = field(default_factory=list)
    shadowings: list[Shadowing] = field(default_factory=list)
    datadog_presence: DatadogPresence = field(
        default_factory=lambda: DatadogPresence(PresenceState.ASSUMED, ("not decided",))
    )


HookKey = tuple[str, str, str]  # namespace, interface, direction


@dataclass(frozen=True)
class RunStats:
    """A program's BPF run statistics (`run_cnt`, `run_time_ns`, kept while stats are enabled)."""

    run_cnt: int
    run_time_ns: int
