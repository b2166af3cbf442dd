"""What differs between kernels, each shown on the running kernel against the kernel's own answer.

These tests run on the host and in the kernel matrix (`scripts/vm-test.sh`: Debian's 6.1 and
6.12 in guests). Each compares what tcprio reads or decides with what the running kernel says,
so that a kernel that does it differently fails here rather than on a node:

- Helper numbering and names. The verifier rewrites every helper call: the xlated image holds
  `imm = function address - __bpf_call_base`, which moves with every build, and the function is
  not always the helper itself (a hash map lookup calls `__htab_map_lookup_elem`,
  bpf_get_prandom_u32 calls `bpf_user_rnd_u32`); some helpers are inlined and leave no call.
  For every call in hand-assembled programs that call nine helpers, the name tcprio gives (its
  kallsyms table, as the scan uses it) must be the name `bpftool prog dump xlated` gives.
- Translated-instruction differences. The same bytecode becomes different xlated code on each
  kernel: context fields read through other structures (`skb->ifindex` through `skb->dev`,
  at offsets of that build), array and per-CPU array lookups inlined (the per-CPU ones with a
  per-CPU move, `mov` with off -1, since 6.10), bpf_get_smp_processor_id inlined the same way
  (6.10+, x86-64), branches the verifier proved dead removed (6.18 drops the null check of an
  array lookup with a constant key). tcprio's image must be byte for byte what bpftool dumps
  and decode to bpftool's opcodes; and its verdict analysis of that image must contain every
  value BPF_PROG_TEST_RUN returns on this kernel (one program's verdict depends on a hash map
  lookup: the kernel returns 2 while the map is empty, 0 once it holds the key).
- Run statistics. With BPF_ENABLE_STATS on, N UDP datagrams across a veth between two test
  namespaces run a cls_bpf filter (protocol ip, so ARP and IPv6 neighbour discovery never run
  it) exactly N times: tcprio's run_cnt, bpftool's run_cnt and the program's own counter agree.
- Module-provided classifiers and qdiscs. On distribution kernels cls_bpf and sch_ingress
  (which provides clsact) are modules: a scan of a fresh namespace with an eBPF and a classic
  BPF cls_bpf filter that `tc` added finds both, with no error, and the modules' reference
  counts show the kernel runs them from the modules. Skipped where they are built in (the
  6.18 development kernel), with the evidence. The tests never unload a module.

No tcx (6.1: BPF_PROG_QUERY with a tcx attach type fails with EINVAL) is shown elsewhere in the
matrix: `tests/test_bpf_syscalls.py::test_without_tcx_the_query_says_so` (TcxUnsupported on
every interface), the scan scene of `tests/test_scan_kernel.py` (its tcx hook read without
error, `test_a_namespace_vanishing_mid_scan_is_skipped`: clsact filters and no error line).

What each kernel showed is printed (`pytest -rP` shows it): which helpers were calls, how many
instructions each program became, the analysed verdicts. On 6.1.0-57, 6.12.117 and 6.18.44
(2026-12-03), for the same bytecode:
- bpf_get_smp_processor_id: a call on 6.1 (tcprio: TC_ACT_OK or SHOT); on 6.12 and 6.18 the
  verifier knows its range, drops the `> 4096` branch and leaves `r0 = 0` (tcprio: OK only).
- the per-CPU array lookup: a call of percpu_array_map_lookup_elem on 6.1 (11 instructions),
  inlined with a per-CPU move on 6.12 (19) and 6.18 (16, the null check dropped); the array
  lookup: inlined everywhere, 17 instructions on 6.1 and 6.12, 14 on 6.18 (null check dropped).
- the hash lookup calls __htab_map_lookup_elem, bpf_get_prandom_u32 calls bpf_user_rnd_u32,
  bpf_jiffies64 is a load from `jiffies`, on all three; the run count is exact on all three;
  cls_bpf and sch_ingress are modules on 6.1 and 6.12 (one reference per qdisc and per
  classifier priority), built in on 6.18.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcprio.analysis.verdicts import analyse_program, explain
from tcprio.analysis.verdicts.images import decode
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls.syscall import BpfCmd, MapCreateAttr, MapElemAttr, bpf
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.kernel.programs import collect_programs
from tcprio.model import Direction, HookKind, ProgramVerdicts
from tcprio.scan import run_scan
from tests.bpf_asm import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R10,
    Item,
    alu64_imm,
    assemble,
    atomic,
    call_helper,
    exit_,
    jeq_imm,
    jmp_imm,
    jne_imm,
    label,
    ld_imm64,
    ldx,
    mov64_imm,
    mov64_reg,
    st_imm,
)
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, run, veth, veth_in_one
from tests.test_bpf_syscalls import encode_insns, ipv4_udp_packet, ipv6_udp_packet
from tests.test_run_counters import send_udp
from tests.test_scan_kernel import datadog_settings

SCHED_CLS = bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS
BPF_CALL, LD_IMM64 = 0x85, 0x18
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY = 1, 2, 6
BPF_ADD = 0x00  # atomic operation in imm
SKB_IFINDEX = 40  # offsetof(struct __sk_buff, ifindex)
ETHERTYPE_OFFSET = 12
ETH_P_IP_AS_READ = 0x0008  # bytes 08 00 read as a little-endian u16

# The helpers the programs call (include/uapi/linux/bpf.h: stable numbers, unlike the xlated imm)
HELPER = {
    "map_lookup_elem": 1,
    "ktime_get_ns": 5,
    "get_prandom_u32": 7,
    "get_smp_processor_id": 8,
    "tail_call": 12,
    "redirect": 23,
    "skb_load_bytes": 26,
    "get_hash_recalc": 34,
    "jiffies64": 118,
}


def _print_fact(text: str) -> None:
    print(f"[{os.uname().release}] {text}")  # shown with `pytest -rP`: what this kernel did


# --- maps and programs ---------------------------------------------------------------------------


def _map_create(map_type: int, value_size: int, entries: int) -> int:
    attr = MapCreateAttr(map_type=map_type, key_size=4, value_size=value_size, max_entries=entries)
    return bpf(BpfCmd.MAP_CREATE, attr)


def _map_update(map_fd: int, key: int, value: int) -> None:
    k, v = ctypes.c_uint32(key), ctypes.c_uint64(value)
    attr = MapElemAttr(map_fd=map_fd, key=ctypes.addressof(k), value=ctypes.addressof(v))
    bpf(BpfCmd.MAP_UPDATE_ELEM, attr)


def _ret(value: int) -> list[Item]:
    return [mov64_imm(R0, value), exit_()]


def _lookup_key0(map_fd: int) -> list[Item]:
    """r0 = bpf_map_lookup_elem(map, &(u32){0})"""
    return [
        st_imm(4, R10, -4, 0),
        mov64_reg(R2, R10),
        alu64_imm("add", R2, -4),
        ld_imm64(R1, map_fd, src=1),  # BPF_PSEUDO_MAP_FD: the xlated image shows the map id
        call_helper(HELPER["map_lookup_elem"]),
    ]


def _null_is_shot(map_fd: int) -> list[Item]:
    """Lookup of key 0: TC_ACT_SHOT (2) when there is no value, TC_ACT_OK (0) when there is."""
    return [*_lookup_key0(map_fd), jeq_imm(R0, 0, "none"), *_ret(0), label("none"), *_ret(2)]


@dataclass(frozen=True)
class Run:
    packet: str  # "ipv4" or "ipv6"
    returns: int  # what the kernel returns: the same on every kernel
    fill_hash: bool = False  # put key 0 in the hash map first (for good: runs stay in order)


@dataclass(frozen=True)
class Program:
    name: str
    build: Callable[[dict[str, int]], list[Item]]  # map fds by name -> the program
    runs: tuple[Run, ...]


PROGRAMS = (
    # bpf_redirect(skb->ifindex, 0): TC_ACT_REDIRECT; the context field is rewritten per build
    Program(
        "kd_redirect",
        lambda m: [
            ldx(4, R1, R1, SKB_IFINDEX),
            mov64_imm(R2, 0),
            call_helper(HELPER["redirect"]),
            exit_(),
        ],
        (Run("ipv4", 7),),
    ),
    # bpf_skb_load_bytes of the ethertype: OK for IPv4, UNSPEC otherwise, SHOT if it fails
    Program(
        "kd_load_bytes",
        lambda m: [
            mov64_imm(R2, ETHERTYPE_OFFSET),
            mov64_reg(R3, R10),
            alu64_imm("add", R3, -8),
            mov64_imm(R4, 2),
            call_helper(HELPER["skb_load_bytes"]),
            jne_imm(R0, 0, "failed"),
            ldx(2, R0, R10, -8),
            jeq_imm(R0, ETH_P_IP_AS_READ, "ipv4"),
            *_ret(-1),
            label("ipv4"),
            *_ret(0),
            label("failed"),
            *_ret(2),
        ],
        (Run("ipv4", 0), Run("ipv6", -1)),
    ),
    # a hash map lookup: the verifier calls __htab_map_lookup_elem and adds the value's offset
    Program(
        "kd_hash_lookup",
        lambda m: _null_is_shot(m["hash"]),
        (Run("ipv4", 2), Run("ipv4", 0, fill_hash=True)),
    ),
    # array lookups: inlined on every kernel (the null check dropped on newer ones)
    Program("kd_array_lookup", lambda m: _null_is_shot(m["array"]), (Run("ipv4", 0),)),
    Program("kd_pcpu_lookup", lambda m: _null_is_shot(m["percpu"]), (Run("ipv4", 0),)),
    # bpf_get_smp_processor_id: a call on 6.1, inlined as a per-CPU load on 6.10+ (x86-64)
    Program(
        "kd_cpu_id",
        lambda m: [
            call_helper(HELPER["get_smp_processor_id"]),
            jmp_imm("jgt", R0, 4096, "many"),
            *_ret(0),
            label("many"),
            *_ret(2),
        ],
        (Run("ipv4", 0),),
    ),
    # bpf_ktime_get_ns, bpf_get_prandom_u32 (bpf_user_rnd_u32) and bpf_get_hash_recalc: calls
    Program(
        "kd_time_random",
        lambda m: [
            mov64_reg(R6, R1),
            call_helper(HELPER["ktime_get_ns"]),
            jeq_imm(R0, 0, "zero"),
            mov64_reg(R1, R6),
            call_helper(HELPER["get_hash_recalc"]),
            call_helper(HELPER["get_prandom_u32"]),
            alu64_imm("and", R0, 1),
            exit_(),
            label("zero"),
            *_ret(2),
        ],
        (Run("ipv4", 0), Run("ipv4", 1)),  # either: the check is membership, not equality
    ),
    # bpf_jiffies64: inlined as a load from the kernel's `jiffies` (a 64-bit kernel address)
    Program(
        "kd_jiffies",
        lambda m: [
            call_helper(HELPER["jiffies64"]),
            jeq_imm(R0, 0, "zero"),
            *_ret(-1),
            label("zero"),
            *_ret(2),
        ],
        (Run("ipv4", -1),),
    ),
    # bpf_tail_call to prog_array[0] = kd_redirect; shown as `call bpf_tail_call#12` everywhere
    Program(
        "kd_tail_call",
        lambda m: [
            ld_imm64(R2, m["prog_array"], src=1),
            mov64_imm(R3, 0),
            call_helper(HELPER["tail_call"]),
            *_ret(-1),
        ],
        (Run("ipv4", 7),),
    ),
)
PROGRAM_BY_NAME = {p.name: p for p in PROGRAMS}
PACKETS = {"ipv4": ipv4_udp_packet(), "ipv6": ipv6_udp_packet()}


@dataclass
class Loaded:
    fds: dict[str, int]  # program name -> fd
    ids: dict[str, int]  # program name -> id
    maps: dict[str, int]  # map name -> fd
    helpers: dict[int, str]  # what the scan names helper calls with


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    maps: dict[str, int] = {}
    fds: dict[str, int] = {}
    try:
        maps["hash"] = _map_create(MAP_HASH, 8, 4)
        maps["array"] = _map_create(MAP_ARRAY, 8, 4)
        maps["percpu"] = _map_create(MAP_PERCPU_ARRAY, 8, 4)
        maps["prog_array"] = bpf_syscalls.prog_array_create(1)
        for program in PROGRAMS:
            code = encode_insns(assemble(*program.build(maps)))
            fds[program.name] = bpf_syscalls.prog_load_raw(SCHED_CLS, code, program.name)
        bpf_syscalls.prog_array_set(maps["prog_array"], 0, fds["kd_redirect"])
        ids = {name: bpf_syscalls.prog_id_of_fd(fd) for name, fd in fds.items()}
        yield Loaded(fds, ids, maps, bpf_syscalls.helper_symbols())
    finally:
        for fd in (*fds.values(), *maps.values()):
            os.close(fd)


# --- what bpftool says -------------------------------------------------------------------------


def bpftool_xlated(prog_id: int) -> list[dict]:
    out = run("bpftool", "-j", "prog", "dump", "xlated", "id", str(prog_id), "opcodes").stdout
    return json.loads(out)


def _le(hex_bytes: list[str]) -> int:
    return int.from_bytes(bytes(int(b, 16) for b in hex_bytes), "little")


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def bpftool_fields(entry: dict) -> tuple[int, int, int, int, int]:
    """(code, dst, src, off, imm) of one bpftool instruction; a 64-bit immediate load's imm is
    its whole value (bpftool prints the 12 bytes from the first imm to the second)."""
    op = entry["opcodes"]
    code = int(op["code"], 16)
    imm_bytes = op["imm"]
    if code == LD_IMM64:
        imm = _le(imm_bytes[0:4]) | _le(imm_bytes[8:12]) << 32
    else:
        imm = _signed(_le(imm_bytes), 32)
    return code, int(op["dst_reg"], 16), int(op["src_reg"], 16), _signed(_le(op["off"]), 16), imm


CALL_DISASM = re.compile(r"\) call (\S+)#(-?\d+)$")


# --- 1. helper numbering and names ---------------------------------------------------------------


def tcprio_call_name(imm: int, helpers: dict[int, str]) -> str | None:
    """The helper the verdict analysis sees at a `call` (src 0) of an xlated image: imm 12 is
    the tail call, which the kernel shows that way whatever it became; any other imm is an
    address offset, named through kallsyms, a compiler suffix (".isra.0") dropped
    (analysis/verdicts/interpreter.py, `_run_block` and `_helper_call`)."""
    if imm == bpf_syscalls.BPF_FUNC_TAIL_CALL:
        return "bpf_tail_call"
    name = helpers.get(imm)
    return name.split(".", 1)[0] if name else None


def test_helper_calls_are_named_as_the_running_kernel_names_them(loaded: Loaded) -> None:
    compared: dict[str, list[str]] = {}
    for program in PROGRAMS:
        info = bpf_syscalls.prog_info(loaded.ids[program.name])
        assert info.insns is not None, info.error
        image = decode(info.insns)
        theirs = [e for e in bpftool_xlated(info.id) if e["opcodes"]["code"] == hex(BPF_CALL)]
        ours = [
            (pc, insn)
            for pc, insn in enumerate(image.insns)
            if insn is not None and insn[0] == BPF_CALL and insn[2] == 0
        ]
        assert len(ours) == len(theirs), (program.name, [e["disasm"] for e in theirs])
        names = []
        for (pc, insn), entry in zip(ours, theirs, strict=True):
            match = CALL_DISASM.search(entry["disasm"])
            assert match, entry["disasm"]
            kernel_name, kernel_imm = match.group(1), int(match.group(2))
            assert insn[4] == kernel_imm, (program.name, pc, entry["disasm"])
            assert tcprio_call_name(insn[4], loaded.helpers) == kernel_name, (
                f"{program.name} pc {pc}: tcprio names imm {insn[4]} "
                f"{tcprio_call_name(insn[4], loaded.helpers)!r}, bpftool {entry['disasm']!r}"
            )
            names.append(kernel_name)
        compared[program.name] = names
    _print_fact(f"helper calls left in the xlated images: {compared}")
    called = {name for names in compared.values() for name in names}
    # Never inlined on any kernel: these must have been seen, and named, as calls.
    for helper in ("bpf_redirect", "bpf_skb_load_bytes", "bpf_ktime_get_ns", "bpf_tail_call"):
        assert helper in called, (helper, compared)
    # The verifier calls the map type's own lookup for a hash map, never the generic helper.
    assert compared["kd_hash_lookup"] == ["__htab_map_lookup_elem"], compared
    assert "bpf_map_lookup_elem" not in called


# --- 2. translated instructions and the verdicts on them -----------------------------------------


@pytest.mark.parametrize("name", [p.name for p in PROGRAMS])
def test_translated_image_is_the_kernels_own(loaded: Loaded, name: str, tmp_path: Path) -> None:
    """tcprio's image: byte for byte bpftool's `dump xlated ... file`, decoded to its opcodes."""
    info = bpf_syscalls.prog_info(loaded.ids[name])
    assert info.insns is not None, info.error
    dumped = tmp_path / "xlated.bin"
    run("bpftool", "prog", "dump", "xlated", "id", str(info.id), "file", str(dumped))
    assert info.insns.raw == dumped.read_bytes()
    assert bpf_syscalls.prog_xlated_bytes(info.id) == dumped.read_bytes()

    image = decode(info.insns)
    ours = [insn for insn in image.insns if insn is not None]
    theirs = [bpftool_fields(entry) for entry in bpftool_xlated(info.id)]
    assert len(image.insns) == len(info.insns.raw) // 8
    assert ours == theirs
    # nothing tcprio cannot interpret: the only "broken" pcs are second halves of ld_imm64
    assert all(image.insns[pc] is None for pc in image.broken), image.broken
    loaded_count = len(assemble(*PROGRAM_BY_NAME[name].build(loaded.maps)))
    _print_fact(f"{name}: {loaded_count} instructions loaded, {len(image.insns)} translated")


def _analysed(loaded: Loaded, name: str) -> ProgramVerdicts:
    """The analysis as a scan runs it: the catalogue (tail-call targets through the prog array)
    from kernel/programs.py, the helper names from kallsyms."""
    catalogue = collect_programs([loaded.ids[name]])
    assert not catalogue.errors and not catalogue.map_errors
    return analyse_program(loaded.ids[name], catalogue.programs, catalogue.maps, loaded.helpers)


@pytest.mark.parametrize("name", [p.name for p in PROGRAMS])
def test_verdicts_hold_for_this_kernels_translation(loaded: Loaded, name: str) -> None:
    verdicts = _analysed(loaded, name)
    lines = explain(verdicts)
    _print_fact(f"{name}: " + " | ".join(line.strip() for line in lines))
    assert verdicts.values is not None, "\n".join(lines)
    fd = loaded.fds[name]
    returned = []
    for run_ in PROGRAM_BY_NAME[name].runs:
        if run_.fill_hash:
            _map_update(loaded.maps["hash"], 0, 1)
        value = bpf_syscalls.prog_test_run(fd, PACKETS[run_.packet])
        returned.append(value)
        assert value in verdicts.values, (run_, value, lines)
    if name == "kd_time_random":  # a coin toss: 0 or 1, never 2 (the clock is not 0)
        assert set(returned) <= {0, 1}
    else:
        assert returned == [r.returns for r in PROGRAM_BY_NAME[name].runs]


# --- 3. run statistics on real traffic -----------------------------------------------------------

SENDER_IP, RECEIVER_IP, PORT = "169.254.214.1", "169.254.214.2", 40214
DATAGRAMS = 20


def _counting_program(counter_fd: int) -> int:
    """Adds one to counter[0] on each run and returns TC_ACT_UNSPEC."""
    items = [
        *_lookup_key0(counter_fd),
        jeq_imm(R0, 0, "out"),
        mov64_imm(R1, 1),
        atomic(8, R0, R1, 0, BPF_ADD),
        label("out"),
        *_ret(-1),
    ]
    return bpf_syscalls.prog_load_raw(SCHED_CLS, encode_insns(assemble(*items)), "kd_count")


def _counter(map_fd: int) -> int:
    key, value = ctypes.c_uint32(0), ctypes.c_uint64(0)
    attr = MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    bpf(BpfCmd.MAP_LOOKUP_ELEM, attr)
    return value.value


def test_run_count_equals_the_datagrams_sent() -> None:
    counter_fd = _map_create(MAP_ARRAY, 8, 1)
    prog_fd = _counting_program(counter_fd)
    try:
        prog_id = bpf_syscalls.prog_id_of_fd(prog_fd)
        with netns("kdtx") as tx, netns("kdrx") as rx:
            veth(tx, "kd0", rx, "kd1")
            tx.ip("addr", "add", f"{SENDER_IP}/30", "dev", "kd0")
            rx.ip("addr", "add", f"{RECEIVER_IP}/30", "dev", "kd1")
            add_clsact(rx, "kd1")
            # protocol ip: the ARP exchange and IPv6's own packets never run the program
            attach_filter(rx, "kd1", Direction.INGRESS, 1, "kd_count", protocol="ip",
                          prog_fd=prog_fd)  # fmt: skip
            before = bpf_syscalls.prog_info(prog_id, with_insns=False).run_cnt
            with bpf_syscalls.run_stats():
                arrived = send_udp(tx, rx, DATAGRAMS, to=(RECEIVER_IP, PORT))
                runs = bpf_syscalls.prog_info(prog_id, with_insns=False).run_cnt - before
            shown = json.loads(run("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)
        assert arrived == DATAGRAMS
        assert runs == DATAGRAMS, f"tcprio read {runs} runs for {DATAGRAMS} datagrams"
        assert _counter(counter_fd) == DATAGRAMS
        assert shown.get("run_cnt") == before + DATAGRAMS, shown
        _print_fact(f"{DATAGRAMS} datagrams: run_cnt +{runs}, bpftool {shown.get('run_cnt')}")
    finally:
        os.close(prog_fd)
        os.close(counter_fd)


# --- 4. module-provided classifiers and qdiscs ---------------------------------------------------

# module -> its kernel config symbol (clsact and the legacy ingress qdisc are both sch_ingress)
TC_MODULES = {"cls_bpf": "CONFIG_NET_CLS_BPF", "sch_ingress": "CONFIG_NET_SCH_INGRESS"}


def _kernel_config() -> tuple[str, dict[str, str]]:
    """The running kernel's config file and its CONFIG_ symbols ("", {} when none is found)."""
    release = os.uname().release
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        with contextlib.suppress(OSError):
            raw = path.read_bytes()
            text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
            lines = (line.split("=", 1) for line in text.splitlines() if line.startswith("CONFIG_"))
            return str(path), dict(lines)
    return "", {}


def built_in(module: str) -> str | None:
    """How we know `module` is built into the running kernel, or None when it is a module."""
    if Path(f"/sys/module/{module}/initstate").exists():
        return None  # only a loadable module has one
    release = os.uname().release
    with contextlib.suppress(OSError):
        listed = Path(f"/lib/modules/{release}/modules.builtin").read_text().split()
        if any(Path(entry).name == f"{module}.ko" for entry in listed):
            return f"{module} is in /lib/modules/{release}/modules.builtin"
    symbol = TC_MODULES[module]
    path, config = _kernel_config()
    if config.get(symbol) == "y":
        return f"{symbol}=y in {path}"
    return None


def _refcnt(module: str) -> int:
    """How many users hold the module (0 before it is loaded)."""
    path = Path(f"/sys/module/{module}/refcnt")
    return int(path.read_text()) if path.exists() else 0


def _module_state(module: str) -> str:
    return Path(f"/sys/module/{module}/initstate").read_text().strip()


CLASSIC_MATCH_ALL = "1,6 0 0 4294967295,"  # `ret #-1`: the filter's default class


def test_module_provided_classifiers_and_qdiscs_are_found() -> None:
    reasons = [r for r in map(built_in, TC_MODULES) if r]
    if reasons:
        pytest.skip(f"built into {os.uname().release}: {'; '.join(reasons)}; no module to load")
    was_loaded = {m: Path(f"/sys/module/{m}").exists() for m in TC_MODULES}
    counter_fd = _map_create(MAP_ARRAY, 8, 1)
    prog_fd = _counting_program(counter_fd)
    try:
        prog_id = bpf_syscalls.prog_id_of_fd(prog_fd)
        with netns("kdmod") as ns:
            # the kernel loads the modules for `tc` (request_module) if nothing did before
            veth_in_one(ns, "kdm0", "kdm1")
            refs = {m: _refcnt(m) for m in TC_MODULES}
            add_clsact(ns, "kdm0")
            ns.tc("qdisc", "add", "dev", "kdm1", "ingress")
            ns.tc("filter", "add", "dev", "kdm0", "egress", "prio", "1", "protocol", "all",
                  "bpf", "bytecode", CLASSIC_MATCH_ALL)  # fmt: skip
            attach_filter(ns, "kdm0", Direction.EGRESS, 2, "kd_count", prog_fd=prog_fd)
            assert {m: _module_state(m) for m in TC_MODULES} == dict.fromkeys(TC_MODULES, "live")
            # each qdisc and each classifier instance (one per priority) holds its module
            grown = {m: _refcnt(m) - refs[m] for m in TC_MODULES}
            scan = run_scan(
                discover=lambda: [n for n in discover_namespaces() if n.name == ns.name],
                settings=datadog_settings(),
                vendor_versions={},
            )
    finally:
        os.close(prog_fd)
        os.close(counter_fd)
    _print_fact(f"modules loaded before: {was_loaded}; references taken: {grown}")
    assert grown == dict.fromkeys(TC_MODULES, 2), grown
    assert scan.errors == [] and scan.vanished == []
    (inventory,) = scan.inventories
    hooks = {(i.name, h.direction): h for i in inventory.interfaces for h in i.hooks}
    egress = hooks["kdm0", Direction.EGRESS]
    assert egress.qdisc == "clsact" and egress.error is None
    assert [(f.kind, f.priority, f.classic_ops is not None) for f in egress.filters] == [
        ("bpf", 1, True),
        ("bpf", 2, False),
    ]
    assert egress.filters[1].prog_id == prog_id and egress.filters[1].direct_action
    legacy = hooks["kdm1", Direction.INGRESS]
    assert legacy.qdisc == "ingress" and legacy.filters == () and legacy.error is None
    reported = [
        (c.priority, c.hook)
        for h in scan.result.hooks
        if h.interface == "kdm0" and h.direction is Direction.EGRESS
        for c in h.classifiers
    ]
    assert reported == [(1, HookKind.CLSACT), (2, HookKind.CLSACT)]
