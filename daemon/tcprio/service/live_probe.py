"""The live verdict probe: counts what cls_bpf classifiers return on real traffic.

`LiveProbe.start()` compiles bpf/verdict_probe.c with BCC, loads it and attaches it in the first
way the kernel allows (see `ProbeMode`); `counts()` reads the counts, `close()` frees everything.
When the kernel allows none, `start()` says so in a `ProbeStatus` (one sentence), never raises.
`probe_support()` answers the same question without compiling anything.

What each mode counts is written down in bpf/verdict_probe.c. In short:
- `fexit` / `kretprobe` (on the kernel's `cls_bpf_classify`): per (netns, ifindex, direction,
  priority), the result cls_bpf hands to tc for the whole priority, after direct-action
  mapping: -1 when every program there let the packet go on, else the verdict that ended the
  chain (0 OK, 2 SHOT, 4 STOLEN, 7 REDIRECT, 8 TRAP). tcx programs are not seen.
- `fexit-prog` (fexit on each target program): the program's raw return value (42, 3, -1 ...)
  per (netns, ifindex, direction, program id); the priority comes from the `ProbeTarget`s.

Kernel structure offsets are read from the running kernel's BTF (/sys/kernel/btf/vmlinux), not
from the (older) headers BCC compiles against. Where cls_bpf is a module (distribution kernels),
cls_bpf_classify is in the module's BTF (/sys/kernel/btf/cls_bpf), and fexit on it names that BTF
object (attach_btf_obj_fd) besides the function's id in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gzip
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bcc_support import HeadersMissing, prepare_bcc_environment
from tcprio.kernel.bpf_syscalls import BPF_TRACE_FEXIT, BpfCmd, BpfError, main_func_btf_id
from tcprio.kernel.btf import KIND_FUNC, Btf, BtfLookupError, split_func_id
from tcprio.model import Direction

VERDICT_PROBE_C = Path(__file__).resolve().parents[3] / "bpf" / "verdict_probe.c"
KERNEL_BTF_DIR = Path("/sys/kernel/btf")
VMLINUX_BTF = KERNEL_BTF_DIR / "vmlinux"
CLS_BPF_MODULE = "cls_bpf"
KPROBE_PMU_TYPE = Path("/sys/bus/event_source/devices/kprobe/type")
KERNEL_CONFIG = Path("/proc/config.gz")
CLASSIFY_FUNC = "cls_bpf_classify"

COUNT_MAP = "verdict_counts"
MISS_MAP = "verdict_misses"
TARGET_PROG_ID_MARK = 0x5EC1D0A1  # bpf/verdict_probe.c
WHERE_DIRECTION = {0: Direction.EGRESS, 1: Direction.INGRESS}  # 2: not a clsact hook


class ProbeMode(StrEnum):
    FEXIT = "fexit"  # fexit on cls_bpf_classify
    KRETPROBE = "kretprobe"  # kprobe + kretprobe on cls_bpf_classify
    FEXIT_PROG = "fexit-prog"  # fexit on each target classifier program
    NONE = "none"


DEFAULT_MODES: tuple[ProbeMode, ...] = (ProbeMode.FEXIT, ProbeMode.KRETPROBE, ProbeMode.FEXIT_PROG)


@dataclass(frozen=True)
class AttachAttempt:
    """One way of hooking that was tried, and what the kernel answered (None: it worked)."""

    mode: ProbeMode
    error: str | None


@dataclass(frozen=True)
class ProbeStatus:
    available: bool
    mode: ProbeMode
    reason: str  # one sentence
    attempts: tuple[AttachAttempt, ...] = ()


@dataclass(frozen=True)
class VerdictKey:
    netns_inode: int
    ifindex: int
    priority: int | None  # None: fexit-prog mode and the target's priority is not known
    direction: Direction | None  # None: not a clsact / ingress hook (classful qdisc, unknown)
    retval: int
    chain: int | None = None  # tc chain index; None in fexit-prog mode
    prog_id: int | None = None  # fexit-prog mode only


@dataclass(frozen=True)
class ProbeTarget:
    """A classifier program to hook in fexit-prog mode, and where it hangs when known.

    The program is hooked once whatever the location; the location only lets `counts()` put a
    priority on what the program returned on that interface and direction."""

    prog_id: int
    priority: int | None = None
    netns_inode: int | None = None
    ifindex: int | None = None
    direction: Direction | None = None


# --- kernel BTF: structure offsets and function ids -----------------------------------------


class LayoutError(Exception):
    """The kernel's BTF lacks a type or field the probe needs."""


@dataclass(frozen=True)
class KernelLayout:
    """What the probe needs to know about this kernel's structures, from its BTF."""

    skb_dev: int
    skb_tc_flags: int  # byte holding the tc_at_ingress bit
    tc_at_ingress_mask: int
    dev_ifindex: int
    dev_net: int
    net_inum: int
    tp_prio: int
    tp_chain: int
    chain_index: int
    chain_block: int
    block_q: int
    qdisc_handle: int

    def cflags(self) -> list[str]:
        defines = {
            "OFF_SKB_DEV": self.skb_dev,
            "OFF_SKB_TC_FLAGS": self.skb_tc_flags,
            "MASK_TC_AT_INGRESS": self.tc_at_ingress_mask,
            "OFF_DEV_IFINDEX": self.dev_ifindex,
            "OFF_DEV_NET": self.dev_net,
            "OFF_NET_INUM": self.net_inum,
            "OFF_TP_PRIO": self.tp_prio,
            "OFF_TP_CHAIN": self.tp_chain,
            "OFF_CHAIN_INDEX": self.chain_index,
            "OFF_CHAIN_BLOCK": self.chain_block,
            "OFF_BLOCK_Q": self.block_q,
            "OFF_QDISC_HANDLE": self.qdisc_handle,
        }
        return [f"-D{name}={value}" for name, value in defines.items()]


def _layout(btf: Btf) -> KernelLayout:
    at_ingress = btf.field("sk_buff", "tc_at_ingress")
    if at_ingress.bit_size != 1:
        raise BtfLookupError("BTF: sk_buff.tc_at_ingress is not a one-bit field")
    return KernelLayout(
        skb_dev=btf.byte_offset("sk_buff", "dev"),
        skb_tc_flags=at_ingress.bit_offset // 8,
        tc_at_ingress_mask=1 << (at_ingress.bit_offset % 8),  # little endian bit order
        dev_ifindex=btf.byte_offset("net_device", "ifindex"),
        dev_net=btf.byte_offset("net_device", "nd_net.net"),
        net_inum=btf.byte_offset("net", "ns.inum"),
        tp_prio=btf.byte_offset("tcf_proto", "prio"),
        tp_chain=btf.byte_offset("tcf_proto", "chain"),
        chain_index=btf.byte_offset("tcf_chain", "index"),
        chain_block=btf.byte_offset("tcf_chain", "block"),
        block_q=btf.byte_offset("tcf_block", "q"),
        qdisc_handle=btf.byte_offset("Qdisc", "handle"),
    )


def layout_from_btf(btf: Btf) -> KernelLayout:
    """The layout from the kernel's parsed BTF; LayoutError when a type or field is missing."""
    try:
        return _layout(btf)
    except BtfLookupError as exc:
        raise LayoutError(f"kernel {exc}") from exc
    except ValueError as exc:
        raise LayoutError(f"kernel BTF is malformed ({exc})") from exc


@functools.cache
def _kernel_btf(path: Path = VMLINUX_BTF) -> Btf:
    """vmlinux BTF, parsed once per process (about 0.3 s)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LayoutError(f"no kernel BTF at {path} ({exc.strerror})") from exc
    try:
        return Btf(data)
    except ValueError as exc:
        raise LayoutError(f"kernel BTF at {path} is malformed ({exc})") from exc


@functools.cache
def kernel_layout(path: Path = VMLINUX_BTF) -> KernelLayout:
    """The running kernel's layout (parsed once per process; about 0.3 s)."""
    return layout_from_btf(_kernel_btf(path))


@dataclass(frozen=True)
class ClassifyFunc:
    """cls_bpf_classify in the kernel's BTF: its FUNC id, in vmlinux (module None) or in the
    split BTF of the module that holds it (fexit then also needs that BTF object's fd)."""

    btf_id: int
    module: str | None = None


def classify_func(btf_dir: Path = KERNEL_BTF_DIR) -> ClassifyFunc:
    """Where cls_bpf_classify is: vmlinux BTF when cls_bpf is built in, else the cls_bpf module's
    BTF (read each call: the module may be loaded later). LayoutError says why it is in neither."""
    base = _kernel_btf(btf_dir / "vmlinux")
    with contextlib.suppress(BtfLookupError):
        return ClassifyFunc(base.find(KIND_FUNC, CLASSIFY_FUNC))
    module_btf = btf_dir / CLS_BPF_MODULE
    try:
        raw = module_btf.read_bytes()
    except OSError:
        raise LayoutError(
            f"{CLASSIFY_FUNC} is not in vmlinux BTF and {module_btf} is missing "
            f"(the {CLS_BPF_MODULE} module is not loaded, or has no BTF)"
        ) from None
    try:
        return ClassifyFunc(split_func_id(raw, base, CLASSIFY_FUNC), CLS_BPF_MODULE)
    except (BtfLookupError, ValueError) as exc:
        raise LayoutError(f"{module_btf}: {exc}") from exc


# --- bpf(2): tracing programs (fexit) and their links ----------------------------------------


def load_fexit(insns: bytes, name: str, attach_btf_id: int, attach_prog_fd: int = 0) -> int:
    """Load a BPF_TRACE_FEXIT program on a kernel function (attach_prog_fd 0, attach_btf_id in
    vmlinux BTF) or on a BPF program (its fd, and its function's id in the program's BTF)."""
    return bpf_syscalls.prog_load_tracing(insns, name, attach_btf_id, attach_prog_fd)


def attach_tracing(prog_fd: int) -> int:
    """Attach a loaded fexit program where its load said; returns the link fd."""
    return bpf_syscalls.tracing_attach(prog_fd, BPF_TRACE_FEXIT)


def with_target_id(insns: bytes, prog_id: int) -> bytes:
    """verdict_fexit_prog's code with TARGET_PROG_ID_MARK replaced by `prog_id`."""
    code = bytearray(insns)
    imms = [struct.unpack_from("<i", code, pc * 8 + 4)[0] for pc in range(len(code) // 8)]
    hits = [pc for pc, imm in enumerate(imms) if imm == TARGET_PROG_ID_MARK]
    if len(hits) != 1:
        raise ValueError(f"expected one TARGET_PROG_ID_MARK in the program, found {len(hits)}")
    struct.pack_into("<i", code, hits[0] * 8 + 4, prog_id)
    return bytes(code)


def load_fexit_classify(insns: bytes, name: str, func: ClassifyFunc) -> int:
    """Load a fexit program on cls_bpf_classify, in vmlinux or in a module: for a module function
    the module's BTF object fd goes where a target program's fd would (attach_btf_obj_fd)."""
    if func.module is None:
        return load_fexit(insns, name, func.btf_id)
    btf_obj_id = bpf_syscalls.module_btf_id(func.module)
    if btf_obj_id is None:
        raise BpfError(BpfCmd.BTF_GET_NEXT_ID, errno.ENOENT, f"no BTF object of {func.module}")
    with bpf_syscalls.open_btf(btf_obj_id) as btf_fd:
        return load_fexit(insns, name, func.btf_id, btf_fd)


TRIVIAL_PROGRAM = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit


def _try_fexit(load: Callable[[bytes, str], int]) -> BpfError | None:
    """Load (with `load(insns, name)`) and attach a do-nothing fexit program, then drop it:
    None if that worked."""
    try:
        prog_fd = load(TRIVIAL_PROGRAM, "tcprio_fx_test")
    except BpfError as exc:
        return exc
    try:
        os.close(attach_tracing(prog_fd))
    except BpfError as exc:
        return exc
    finally:
        os.close(prog_fd)
    return None


# --- kprobes ---------------------------------------------------------------------------------


def _config_option(name: str, config: Path = KERNEL_CONFIG) -> str | None:
    """One kernel config option: "y", "m", "n" (is not set), or None when unknown."""
    try:
        with gzip.open(config, "rt") as f:
            text = f.read()
    except OSError:
        return None
    if f"# {name} is not set" in text:
        return "n"
    for line in text.splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1]
    return None


def kprobe_problem() -> str | None:
    """Why kprobes cannot be attached here, or None when the kprobe PMU is there."""
    if KPROBE_PMU_TYPE.exists():
        return None
    if _config_option("CONFIG_KPROBES") == "n":
        return "kprobes are not available on this kernel (CONFIG_KPROBES unset)"
    return f"kprobes are not available on this kernel (no kprobe PMU: {KPROBE_PMU_TYPE} is missing)"


# --- reasons ---------------------------------------------------------------------------------


def _bpf_failure(what: str, exc: BpfError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    text = f"{what} fails with {code} at {exc.command.removeprefix('bpf(').removesuffix(')')}"
    return f"{text} ({exc.detail})" if exc.detail else text


def off_reason(attempts: Iterable[AttachAttempt]) -> str:
    """One sentence: why none of the attempts worked."""
    causes = [attempt.error for attempt in attempts if attempt.error]
    if not causes:
        return "no way of hooking cls_bpf was tried: live verdict counts are off"
    joined = causes[0] if len(causes) == 1 else ", ".join(causes[:-1]) + " and " + causes[-1]
    return f"{joined}: live verdict counts are off"


ON_REASON = {
    ProbeMode.FEXIT: "counting cls_bpf_classify results per priority with fexit",
    ProbeMode.KRETPROBE: "counting cls_bpf_classify results per priority with a kretprobe",
    ProbeMode.FEXIT_PROG: "counting the target programs' raw return values with fexit on each",
}


def _status(attempts: list[AttachAttempt]) -> ProbeStatus:
    last = attempts[-1] if attempts else None
    if last is not None and last.error is None:
        return ProbeStatus(True, last.mode, ON_REASON[last.mode], tuple(attempts))
    return ProbeStatus(False, ProbeMode.NONE, off_reason(attempts), tuple(attempts))


# --- cheap support check ---------------------------------------------------------------------

NO_TARGETS = "no classifier programs were given for fexit on programs"


def _fexit_classify_problem() -> str | None:
    try:
        func = classify_func()
    except LayoutError as exc:
        return f"fexit on {CLASSIFY_FUNC} is impossible: {exc}"
    failure = _try_fexit(lambda insns, name: load_fexit_classify(insns, name, func))
    return None if failure is None else _bpf_failure(f"fexit on {CLASSIFY_FUNC}", failure)


def _fexit_prog_problem(targets: Sequence[ProbeTarget]) -> str | None:
    if not targets:
        return NO_TARGETS
    prog_id = targets[0].prog_id
    try:
        with bpf_syscalls.open_prog(prog_id) as target_fd:
            btf_id = main_func_btf_id(target_fd)
            failure = _try_fexit(lambda insns, name: load_fexit(insns, name, btf_id, target_fd))
    except BpfError as exc:
        failure = exc
    return None if failure is None else _bpf_failure(f"fexit on program {prog_id}", failure)


def _support_problem(mode: ProbeMode, targets: Sequence[ProbeTarget]) -> str | None:
    if mode is ProbeMode.FEXIT:
        return _fexit_classify_problem()
    if mode is ProbeMode.KRETPROBE:
        return kprobe_problem()
    if mode is ProbeMode.FEXIT_PROG:
        return _fexit_prog_problem(targets)
    return "no probe mode"


def probe_support(
    targets: Sequence[ProbeTarget] = (), modes: Sequence[ProbeMode] = DEFAULT_MODES
) -> ProbeStatus:
    """Whether the probe can attach here, without compiling it: the kprobe PMU's presence, and a
    do-nothing fexit program loaded, attached and dropped (on cls_bpf_classify, and on the first
    target program when targets are given). About 0.3 s, most of it reading the kernel's BTF."""
    attempts: list[AttachAttempt] = []
    for mode in modes:
        attempts.append(AttachAttempt(mode, _support_problem(mode, targets)))
        if attempts[-1].error is None:
            break
    return _status(attempts)


# --- the probe -------------------------------------------------------------------------------

KPROBE_ENTRY, KRETPROBE_RETURN = "verdict_kprobe_entry", "verdict_kretprobe"
FEXIT_CLASSIFY, FEXIT_PROG = "verdict_fexit_classify", "verdict_fexit_prog"


def compile_probe(
    layout: KernelLayout, source: Path = VERDICT_PROBE_C, extra_text: str = ""
) -> Any:
    """bpf/verdict_probe.c compiled by BCC for this kernel's layout (a `bcc.BPF`; about 1 s).
    `extra_text` is appended to the source (tests add programs that reuse its functions)."""
    prepare_bcc_environment()
    from bcc import BPF  # late: only worth importing when compiling

    return BPF(text=(source.read_text() + extra_text).encode(), cflags=layout.cflags())


def load_kprobe_programs(bpf: Any) -> tuple[int, int]:
    """Load the kprobe / kretprobe pair as BPF_PROG_TYPE_KPROBE (no kprobe needed to load)."""
    from bcc import BPF

    entry = bpf.load_func(KPROBE_ENTRY.encode(), BPF.KPROBE)
    ret = bpf.load_func(KRETPROBE_RETURN.encode(), BPF.KPROBE)
    return entry.fd, ret.fd


def target_priority(
    targets: Sequence[ProbeTarget],
    prog_id: int,
    netns_inode: int,
    ifindex: int,
    direction: Direction | None,
) -> int | None:
    """The one priority the targets give this program at this place, else None."""
    priorities = {
        target.priority
        for target in targets
        if target.prog_id == prog_id
        and target.netns_inode in (None, netns_inode)
        and target.ifindex in (None, ifindex)
        and target.direction in (None, direction)
    }
    return priorities.pop() if len(priorities) == 1 else None


def verdict_key(raw: Any, targets: Sequence[ProbeTarget] = ()) -> VerdictKey:
    """A `struct verdict_key` of the count map (any object with its fields) as a VerdictKey."""
    direction = WHERE_DIRECTION.get(raw.where)
    if raw.prog_id:
        priority = target_priority(targets, raw.prog_id, raw.netns_inode, raw.ifindex, direction)
        return VerdictKey(
            raw.netns_inode, raw.ifindex, priority, direction, raw.retval, None, raw.prog_id
        )
    return VerdictKey(raw.netns_inode, raw.ifindex, raw.prio, direction, raw.retval, raw.chain)


class ProbeUnavailable(Exception):
    """The probe cannot be compiled or loaded on this machine; the message says why."""


@dataclass(frozen=True)
class ProbeMisses:
    map_full: int  # packets not counted: the count map was full
    stash: int  # kretprobe mode: an entry and a return that did not pair (not counted)


class LiveProbe:
    """Counts cls_bpf return codes on live traffic; `start()`, then `counts()`, then `close()`.

    `targets` are the classifier programs to hook in fexit-prog mode (ignored by the other
    modes, which see every cls_bpf filter of every namespace); `modes` are tried in order."""

    def __init__(
        self,
        targets: Iterable[ProbeTarget] = (),
        modes: Sequence[ProbeMode] = DEFAULT_MODES,
        source: Path = VERDICT_PROBE_C,
    ) -> None:
        self._targets = tuple(targets)
        self._modes = tuple(modes)
        self._source = source
        self._bpf: Any = None
        self._prog_fds: list[int] = []
        self._link_fds: list[int] = []
        self._kprobes: list[tuple[bytes, bool]] = []  # (event, is return probe), BCC-attached
        self._target_errors: list[str] = []
        self._status: ProbeStatus | None = None

    @property
    def status(self) -> ProbeStatus | None:
        return self._status

    @property
    def target_errors(self) -> tuple[str, ...]:
        """fexit-prog mode: the targets that could not be hooked, and why."""
        return tuple(self._target_errors)

    def load(self) -> tuple[int, int]:
        """Compile the probe for this kernel and load the kprobe / kretprobe pair, which needs no
        kprobe support to load: the verifier has then checked the counting code. Returns the
        pair's program ids. Raises ProbeUnavailable when the probe cannot even be compiled."""
        if self._bpf is None:
            self._bpf = self._compile()
        try:
            fds = load_kprobe_programs(self._bpf)
        except Exception as exc:  # BCC reports a load failure as a bare Exception
            raise ProbeUnavailable(f"the kprobe programs do not load ({exc})") from exc
        return bpf_syscalls.prog_id_of_fd(fds[0]), bpf_syscalls.prog_id_of_fd(fds[1])

    def _compile(self) -> Any:
        try:
            return compile_probe(kernel_layout(), self._source)
        except (LayoutError, HeadersMissing, ImportError, OSError) as exc:
            raise ProbeUnavailable(str(exc)) from exc
        except Exception as exc:  # BCC reports a compile error as a bare Exception
            raise ProbeUnavailable(f"BCC could not compile {self._source.name} ({exc})") from exc

    def start(self) -> ProbeStatus:
        """Compile, load, attach. Never raises because the kernel or machine cannot: the status
        says what happened. When nothing attaches, everything is already freed."""
        if self._status is None:
            self._status = self._start()
            if not self._status.available:
                self._release()
        return self._status

    def _start(self) -> ProbeStatus:
        try:
            self.load()
        except ProbeUnavailable as exc:
            return ProbeStatus(False, ProbeMode.NONE, f"{exc}: live verdict counts are off")
        attempts: list[AttachAttempt] = []
        for mode in self._modes:
            attempts.append(AttachAttempt(mode, self._attach(mode)))
            if attempts[-1].error is None:
                break
            self._detach()
        return _status(attempts)

    def _attach(self, mode: ProbeMode) -> str | None:
        if mode is ProbeMode.FEXIT:
            return self._attach_fexit_classify()
        if mode is ProbeMode.KRETPROBE:
            return self._attach_kretprobe()
        if mode is ProbeMode.FEXIT_PROG:
            return self._attach_fexit_programs()
        return "no probe mode"

    def _attach_fexit_classify(self) -> str | None:
        code = self._bpf.dump_func(FEXIT_CLASSIFY.encode())
        try:
            func = classify_func()
        except LayoutError as exc:
            return f"fexit on {CLASSIFY_FUNC} is impossible: {exc}"
        try:
            prog_fd = load_fexit_classify(code, FEXIT_CLASSIFY[:15], func)
            self._prog_fds.append(prog_fd)
            self._link_fds.append(attach_tracing(prog_fd))
        except BpfError as exc:
            return _bpf_failure(f"fexit on {CLASSIFY_FUNC}", exc)
        return None

    def _attach_kretprobe(self) -> str | None:
        problem = kprobe_problem()
        if problem is not None:
            return problem
        event = CLASSIFY_FUNC.encode()
        try:  # the return probe first: it tolerates returns whose entry it did not see
            self._bpf.attach_kretprobe(event=event, fn_name=KRETPROBE_RETURN.encode())
            self._kprobes.append((event, True))
            self._bpf.attach_kprobe(event=event, fn_name=KPROBE_ENTRY.encode())
            self._kprobes.append((event, False))
        except Exception as exc:  # BCC: bare Exception
            return f"kprobes on {CLASSIFY_FUNC} do not attach ({exc})"
        return None

    def _attach_fexit_programs(self) -> str | None:
        if not self._targets:
            return NO_TARGETS
        code = self._bpf.dump_func(FEXIT_PROG.encode())
        self._target_errors = []
        prog_ids = sorted({target.prog_id for target in self._targets})
        for prog_id in prog_ids:
            error = self._hook_program(code, prog_id)
            if error is not None:
                self._target_errors.append(error)
        if len(self._target_errors) == len(prog_ids):
            return self._target_errors[0]
        return None

    def _hook_program(self, code: bytes, prog_id: int) -> str | None:
        try:
            with bpf_syscalls.open_prog(prog_id) as target_fd:
                btf_id = main_func_btf_id(target_fd)
                name = f"verdict_p{prog_id}"[:15]
                prog_fd = load_fexit(with_target_id(code, prog_id), name, btf_id, target_fd)
            self._prog_fds.append(prog_fd)
            self._link_fds.append(attach_tracing(prog_fd))
        except BpfError as exc:
            return _bpf_failure(f"fexit on program {prog_id}", exc)
        return None

    # --- reading -----------------------------------------------------------------------------

    def counts(self) -> dict[VerdictKey, int]:
        """Packets counted since start(), by key; {} when the probe is not running."""
        if self._bpf is None or self._status is None or not self._status.available:
            return {}
        counted: dict[VerdictKey, int] = {}
        for raw_key, per_cpu in self._bpf.get_table(COUNT_MAP.encode()).items():
            key = verdict_key(raw_key, self._targets)
            counted[key] = counted.get(key, 0) + sum(per_cpu)
        return counted

    def misses(self) -> ProbeMisses:
        if self._bpf is None:
            return ProbeMisses(0, 0)
        table = self._bpf.get_table(MISS_MAP.encode())
        totals = [sum(table[ctypes.c_int(slot)]) for slot in (0, 1)]
        return ProbeMisses(map_full=totals[0], stash=totals[1])

    # --- cleanup -----------------------------------------------------------------------------

    def _detach(self) -> None:
        """Drop what the last attach attempt made (links, fexit programs, kprobes)."""
        for fd in self._link_fds + self._prog_fds:
            os.close(fd)
        self._link_fds.clear()
        self._prog_fds.clear()
        for event, is_return in self._kprobes:
            with contextlib.suppress(Exception):  # BCC: bare Exception
                detach = self._bpf.detach_kretprobe if is_return else self._bpf.detach_kprobe
                detach(event=event)
        self._kprobes.clear()

    def _release(self) -> None:
        self._detach()
        if self._bpf is not None:
            self._bpf.cleanup()  # BCC's own program fds and the maps
            self._bpf = None

    def close(self) -> None:
        """Detach and free everything: no link, program or map of the probe stays behind.
        Idempotent; `start()` may be called again afterwards."""
        self._release()
        self._status = None

    def __enter__(self) -> LiveProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
