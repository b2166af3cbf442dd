"""The live verdict probe (bpf/verdict_probe.c, tcprio.live_probe) against the real kernel.

On a kernel without kprobes that refuses fexit programs (the development VM: CONFIG_KPROBES
unset, every trampoline-based load fails with EPERM) the probe cannot attach: the attach tests
skip with the probe's own reason. Everything else runs here for real: compiling, loading the
programs the kernel accepts, the kernel layout read from BTF (checked on real packets through a
raw tracepoint, which this kernel does allow), the status and the clean-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bpf_syscalls import BpfError
from tcprio.kernel.btf import Btf, BtfLookupError, split_func_id
from tcprio.model import Direction
from tcprio.service.live_probe import (
    FEXIT_CLASSIFY,
    FEXIT_PROG,
    TRIVIAL_PROGRAM,
    LiveProbe,
    ProbeMisses,
    ProbeMode,
    ProbeTarget,
    VerdictKey,
    classify_func,
    compile_probe,
    kernel_layout,
    kprobe_problem,
    load_fexit,
    load_fexit_classify,
    load_kprobe_programs,
    main_func_btf_id,
    off_reason,
    probe_support,
    verdict_key,
    with_target_id,
)
from tests.bpf_programs import ClassifierPrograms, attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth
from tests.test_run_counters import RECEIVER_IP, SENDER_IP, run_count, send_udp
from tests.timing import HANG_GUARD_S

PACKETS = 50
CLOSED_PORT = 40999  # nothing listens: the receiver drops the datagrams (kfree_skb)
LAYOUT_MARK = 124  # retval the layout-check program counts under
NO_KPROBES = "kprobes are not available on this kernel (CONFIG_KPROBES unset)"
# The probe's objects by kernel name (15 characters at most); classifiers.c has a verdict_jmp.
PROBE_PROGRAMS = ("verdict_kprobe_", "verdict_kretpro", "verdict_fexit_c", "verdict_p")
PROBE_MAPS = frozenset({"verdict_counts", "verdict_misses", "verdict_stash"})

# Appended to verdict_probe.c: a raw tracepoint program (this kernel attaches those) that runs
# the probe's own fill_device() / skb_direction() on every skb the tracepoint sees.
LAYOUT_CHECK = r"""
int layout_check(struct bpf_raw_tracepoint_args *ctx)
{
    u64 skb = ctx->args[0];
    struct verdict_key key = {};
    fill_device(&key, skb);
    key.where = skb_direction(skb);
    key.retval = 124;
    count(&key);
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe_bpf() -> Iterator[Any]:
    """verdict_probe.c compiled once for this module (a bcc.BPF)."""
    bpf = compile_probe(kernel_layout())
    yield bpf
    bpf.cleanup()


@pytest.fixture
def pair() -> Iterator[tuple[TestNetns, TestNetns]]:
    with netns("lp-tx") as tx, netns("lp-rx") as rx:
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", f"{SENDER_IP}/30", "dev", "a0")
        rx.ip("addr", "add", f"{RECEIVER_IP}/30", "dev", "b0")
        add_clsact(tx, "a0")
        add_clsact(rx, "b0")
        yield tx, rx


def netns_inode(ns: TestNetns) -> int:
    return os.stat(ns.path).st_ino


# --- (a) compiling and loading -----------------------------------------------------------------


def test_layout_comes_from_this_kernels_btf():
    layout = kernel_layout()
    assert layout.tc_at_ingress_mask in {1, 2, 4, 8, 16, 32, 64, 128}
    offsets = [layout.skb_dev, layout.dev_ifindex, layout.dev_net, layout.net_inum]
    assert all(offset > 0 for offset in offsets)
    assert all(flag.startswith("-DOFF_") or flag.startswith("-DMASK_") for flag in layout.cflags())


def _raw_btf(types: bytes, strings: bytes) -> bytes:
    header = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_a_function_is_found_in_split_btf_on_top_of_its_base():
    """A module's BTF numbers its types on from vmlinux's and shares vmlinux's strings."""
    int_type = struct.pack("=IIII", 1, 1 << 24, 4, 32)  # INT "int", 4 bytes
    base = Btf(_raw_btf(int_type, b"\0int\0"))
    base_strings = len(b"\0int\0")
    proto = struct.pack("=III", 0, 13 << 24, 1)  # FUNC_PROTO returning int, no parameters
    funcs = b"".join(
        struct.pack("=III", base_strings + offset, 12 << 24, 2)  # FUNC of the proto (id 2)
        for offset in (0, len("other\0"))
    )
    split = _raw_btf(proto + funcs, b"other\0cls_bpf_classify\0")
    assert split_func_id(split, base, "cls_bpf_classify") == 4  # 1 int, 2 proto, 3 other
    assert split_func_id(split, base, "other") == 3
    with pytest.raises(BtfLookupError):
        split_func_id(split, base, "int")  # a base string, but no FUNC of that name


def test_cls_bpf_classify_is_found_where_the_kernel_keeps_it():
    """Built in (the development VM): in vmlinux BTF. A module (distribution kernels): in the
    module's own BTF, which fexit names by its BTF object."""
    func = classify_func()
    if Path("/sys/module/cls_bpf/initstate").exists():  # only loadable modules have one
        assert func.module == "cls_bpf"
        assert bpf_syscalls.module_btf_id("cls_bpf") is not None
    else:
        assert func.module is None


def test_kprobe_programs_pass_the_verifier(probe_bpf):
    entry_fd, return_fd = load_kprobe_programs(probe_bpf)
    for fd in (entry_fd, return_fd):
        info = bpf_syscalls.prog_info_from_fd(fd, with_insns=False)
        assert info.type_name == "kprobe"
        assert info.name.startswith("verdict_k")


def _trivial_fexit_refusal(load: Callable[[bytes, str], int]) -> BpfError | None:
    """Whether the kernel loads a do-nothing fexit program at that target at all."""
    try:
        fd = load(TRIVIAL_PROGRAM, "tcprio_fx_test")
    except BpfError as exc:
        return exc
    os.close(fd)
    return None


def _assert_loads_wherever_fexit_loads(load: Callable[[], int], refusal: BpfError | None) -> None:
    if refusal is None:  # the kernel loads fexit programs there: ours must pass the verifier
        os.close(load())
        return
    with pytest.raises(BpfError) as caught:
        load()
    assert caught.value.errno == refusal.errno  # refused like any fexit program, not for ours
    assert caught.value.detail == refusal.detail


def test_fexit_on_classify_passes_the_verifier_wherever_fexit_loads(probe_bpf):
    func = classify_func()
    code = probe_bpf.dump_func(FEXIT_CLASSIFY.encode())
    refusal = _trivial_fexit_refusal(lambda insns, name: load_fexit_classify(insns, name, func))
    _assert_loads_wherever_fexit_loads(
        lambda: load_fexit_classify(code, "verdict_fexit_c", func), refusal
    )


def test_fexit_on_a_program_passes_the_verifier_wherever_fexit_loads(
    probe_bpf, classifier_programs: ClassifierPrograms
):
    target_fd = classifier_programs.fd("term_ok")
    btf_id = main_func_btf_id(target_fd)
    code = with_target_id(
        probe_bpf.dump_func(FEXIT_PROG.encode()), classifier_programs.prog_id("term_ok")
    )
    refusal = _trivial_fexit_refusal(lambda insns, name: load_fexit(insns, name, btf_id, target_fd))
    _assert_loads_wherever_fexit_loads(
        lambda: load_fexit(code, "verdict_p", btf_id, target_fd), refusal
    )


def test_on_this_kernel_fexit_is_refused_before_the_verifier_runs():
    """What the development VM says (documents the EPERM of the platform notes)."""
    func = classify_func()
    refusal = _trivial_fexit_refusal(lambda insns, name: load_fexit_classify(insns, name, func))
    if refusal is None:
        pytest.skip("this kernel loads fexit programs")
    assert refusal.errno == errno.EPERM
    assert refusal.detail == "empty verifier log"


def test_target_id_is_written_into_the_fexit_program(probe_bpf):
    code = probe_bpf.dump_func(FEXIT_PROG.encode())
    patched = with_target_id(code, 4242)
    assert len(patched) == len(code)
    assert patched != code
    with pytest.raises(ValueError):
        with_target_id(patched, 1)  # the mark is gone


def _send_to_closed_port(tx: TestNetns, count: int) -> None:
    with tx.entered():
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender:
        for i in range(count):
            sender.sendto(f"layout {i}".encode(), (RECEIVER_IP, CLOSED_PORT))


def _wait_for(condition: Callable[[], bool], timeout: float = HANG_GUARD_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_layout_reads_ifindex_netns_and_direction_of_real_packets(
    pair, classifier_programs: ClassifierPrograms
):
    """The probe's own field readers, run from raw tracepoints on test traffic: egress packets
    at net_dev_queue (tx side), and packets dropped at the receiver after its tc ingress hook
    (kfree_skb: nothing listens on the port)."""
    tx, rx = pair
    attach_filter(rx, "b0", Direction.INGRESS, 1, "classifier_ingress")
    bpf = compile_probe(kernel_layout(), extra_text=LAYOUT_CHECK)
    try:
        for tracepoint in (b"net_dev_queue", b"kfree_skb"):
            bpf.attach_raw_tracepoint(tp=tracepoint, fn_name=b"layout_check")
        _send_to_closed_port(tx, PACKETS)
        table = bpf.get_table(b"verdict_counts")

        def seen(ns: TestNetns, ifname: str, where: int) -> int:
            wanted = (netns_inode(ns), ns.ifindex(ifname), where, LAYOUT_MARK)
            return sum(
                sum(per_cpu)
                for key, per_cpu in table.items()
                if (key.netns_inode, key.ifindex, key.where, key.retval) == wanted
            )

        assert _wait_for(lambda: seen(rx, "b0", 1) >= PACKETS), "ingress drops not seen"
        assert seen(tx, "a0", 0) >= PACKETS  # egress
    finally:
        bpf.cleanup()


def _raw_key(**fields: int) -> SimpleNamespace:
    base = dict(netns_inode=7, ifindex=3, prio=0, chain=0, prog_id=0, retval=-1, where=0)
    return SimpleNamespace(**(base | fields))


def test_count_map_keys_become_verdict_keys():
    assert verdict_key(_raw_key(prio=10, chain=1, where=1, retval=0)) == VerdictKey(
        7, 3, 10, Direction.INGRESS, 0, chain=1
    )
    assert verdict_key(_raw_key(prio=1, where=2)).direction is None  # a classful qdisc's filter
    targets = [
        ProbeTarget(prog_id=5, priority=1, netns_inode=7, ifindex=3, direction=Direction.EGRESS),
        ProbeTarget(prog_id=5, priority=9, netns_inode=7, ifindex=4, direction=Direction.EGRESS),
        ProbeTarget(prog_id=6, priority=2),
    ]
    raw = verdict_key(_raw_key(prog_id=5, retval=42), targets)
    assert raw == VerdictKey(7, 3, 1, Direction.EGRESS, 42, chain=None, prog_id=5)
    assert verdict_key(_raw_key(prog_id=5, ifindex=8), targets).priority is None  # not listed
    assert verdict_key(_raw_key(prog_id=6, ifindex=8), targets).priority == 2  # anywhere
    assert verdict_key(_raw_key(prog_id=7), targets).priority is None


# --- (b) status on this machine ----------------------------------------------------------------


def test_reasons_are_one_sentence():
    assert off_reason([]).endswith(": live verdict counts are off")
    status = probe_support()
    assert "\n" not in status.reason
    assert status.reason
    if not status.available:
        assert status.mode is ProbeMode.NONE
        assert status.reason.endswith(": live verdict counts are off")


def test_start_says_not_available_here_and_does_not_raise():
    support = probe_support()
    if support.available:
        pytest.skip(f"this kernel can attach the probe ({support.mode}): see the attach tests")
    probe = LiveProbe()
    try:
        status = probe.start()
        assert status == probe.start()  # idempotent
        assert probe.counts() == {}
    finally:
        probe.close()
    assert not status.available
    assert status.mode is ProbeMode.NONE
    assert status.reason == support.reason
    if kprobe_problem() == NO_KPROBES:
        assert NO_KPROBES in status.reason
    assert [attempt.mode for attempt in status.attempts] == [
        ProbeMode.FEXIT,
        ProbeMode.KRETPROBE,
        ProbeMode.FEXIT_PROG,
    ]


def test_start_with_targets_says_why_fexit_on_programs_fails(
    classifier_programs: ClassifierPrograms,
):
    prog_id = classifier_programs.prog_id("term_ok")
    targets = [ProbeTarget(prog_id=prog_id, priority=1)]
    if probe_support(targets).available:
        pytest.skip("this kernel can attach the probe: see the attach tests")
    with LiveProbe(targets=targets, modes=(ProbeMode.FEXIT_PROG,)) as probe:
        status = probe.start()
    assert not status.available
    assert status.reason.startswith(f"fexit on program {prog_id} fails with ")
    assert probe.target_errors == (status.attempts[0].error,)


def test_start_does_not_raise_when_the_probe_does_not_compile(tmp_path: Path):
    broken = tmp_path / "broken.c"
    broken.write_text("int verdict_kprobe_entry(struct pt_regs *ctx) { return nonsense; }\n")
    with LiveProbe(source=broken) as probe:
        status = probe.start()
    assert not status.available
    assert status.mode is ProbeMode.NONE
    assert status.reason.startswith("BCC could not compile broken.c")


# --- (c) counting real traffic, where the kernel lets the probe attach -------------------------

# Scenarios: {priority: (program, what cls_bpf_classify returns, what the program returns)};
# a priority with no values never runs (an earlier filter ended the chain).
Scenario = dict[int, tuple[str, int | None, int | None]]
SCENARIOS: dict[str, Scenario] = {
    "terminal-first": {1: ("term_ok", 0, 0), 10: ("classifier_egress", None, None)},
    "observer-runs": {
        5: ("pass_42", -1, 42),
        10: ("classifier_egress", -1, -1),
        20: ("term_ok", 0, 0),
    },
}


def _targets(scenario: Scenario, programs: ClassifierPrograms, tx: TestNetns) -> list[ProbeTarget]:
    return [
        ProbeTarget(
            prog_id=programs.prog_id(name),
            priority=prio,
            netns_inode=netns_inode(tx),
            ifindex=tx.ifindex("a0"),
            direction=Direction.EGRESS,
        )
        for prio, (name, _, _) in scenario.items()
    ]


def _retvals_by_priority(
    counts: dict[VerdictKey, int], netns: int, ifindex: int
) -> dict[int | None, dict[int, int]]:
    found: dict[int | None, dict[int, int]] = {}
    for key, packets in counts.items():
        if (key.netns_inode, key.ifindex, key.direction) == (netns, ifindex, Direction.EGRESS):
            found.setdefault(key.priority, {})[key.retval] = packets
    return found


ATTACH_MODES = (ProbeMode.FEXIT, ProbeMode.KRETPROBE, ProbeMode.FEXIT_PROG)


@pytest.mark.parametrize("scenario_name", sorted(SCENARIOS))
def test_probe_counts_the_return_codes_of_real_traffic(
    pair, classifier_programs: ClassifierPrograms, scenario_name: str
):
    """In the first mode the kernel allows (each mode on its own: the equality test below)."""
    tx, rx = pair
    scenario = SCENARIOS[scenario_name]
    for prio, (name, _, _) in scenario.items():
        attach_filter(tx, "a0", Direction.EGRESS, prio, name)
    targets = _targets(scenario, classifier_programs, tx)
    with LiveProbe(targets=targets) as probe:
        status = probe.start()
        if not status.available:
            pytest.skip(status.reason)
        assert send_udp(tx, rx, PACKETS) == PACKETS
        counts = probe.counts()
        assert probe.misses().map_full == 0
    found = _retvals_by_priority(counts, netns_inode(tx), tx.ifindex("a0"))
    raw = status.mode is ProbeMode.FEXIT_PROG
    for prio, (name, classify_ret, prog_ret) in scenario.items():
        expected = prog_ret if raw else classify_ret
        if expected is None:
            assert prio not in found, f"{name} at priority {prio} should never run"
            continue
        assert set(found[prio]) == {expected}, f"{name} at priority {prio}: {found[prio]}"
        assert found[prio][expected] >= PACKETS


# One program per hook (run counters are per program): (side, interface, direction, priority,
# program, what cls_bpf_classify returns for it, what the program itself returns), on IPv4 and
# ARP alike. Every filter runs on every packet: only the last one ends its chain.
EQUALITY_SCENE = (
    ("tx", "a0", Direction.EGRESS, 1, "pass_42", -1, 42),
    ("tx", "a0", Direction.EGRESS, 5, "by_packet", -1, -1),
    ("tx", "a0", Direction.EGRESS, 10, "term_ok", 0, 0),
    ("rx", "b0", Direction.INGRESS, 2, "pass_unspec", -1, -1),
    ("rx", "b0", Direction.INGRESS, 9, "pass_pipe", -1, 3),
)


@pytest.fixture
def quiet_pair() -> Iterator[dict[str, TestNetns]]:
    """`pair` without IPv6 (no router solicitations or DAD arriving at any moment): only the
    test's datagrams and their ARP exchange cross the filters."""
    with netns("lq-tx") as tx, netns("lq-rx") as rx:
        for ns in (tx, rx):
            ns.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            ns.exec("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        veth(tx, "a0", rx, "b0")
        tx.ip("addr", "add", f"{SENDER_IP}/30", "dev", "a0")
        rx.ip("addr", "add", f"{RECEIVER_IP}/30", "dev", "b0")
        add_clsact(tx, "a0")
        add_clsact(rx, "b0")
        yield {"tx": tx, "rx": rx}


def _hook_counts(
    counts: dict[VerdictKey, int], ns: TestNetns, ifname: str, direction: Direction, prio: int
) -> dict[int, int]:
    """{return code: packets} the probe counted at one priority of one hook."""
    found: dict[int, int] = {}
    for key, packets in counts.items():
        place = (key.netns_inode, key.ifindex, key.direction, key.priority)
        if place == (netns_inode(ns), ns.ifindex(ifname), direction, prio):
            found[key.retval] = found.get(key.retval, 0) + packets
    return found


def _stable(read: Callable[[], Any]) -> Any:
    """A reading that two reads in a row agree on (a stray packet between them: read again)."""
    last = read()
    for _ in range(100):
        again = read()
        if again == last:
            return again
        last = again
        time.sleep(0.05)
    raise AssertionError("the counters never stopped moving")


@pytest.mark.parametrize("mode", ATTACH_MODES, ids=str)
def test_live_counts_equal_run_counters_and_the_programs_own_counters(
    quiet_pair: dict[str, TestNetns],
    classifier_programs: ClassifierPrograms,
    mode: ProbeMode,
    record_property: Callable[[str, object], None],
):
    """Real UDP traffic through a scene: per namespace, interface, priority and return code, the
    probe counts exactly what the BPF run counters and the programs' `seen` counters count."""
    names = [hook[4] for hook in EQUALITY_SCENE]
    targets = [
        ProbeTarget(
            classifier_programs.prog_id(name),
            prio,
            netns_inode(quiet_pair[side]),
            quiet_pair[side].ifindex(ifname),
            direction,
        )
        for side, ifname, direction, prio, name, _, _ in EQUALITY_SCENE
    ]
    with bpf_syscalls.run_stats(), LiveProbe(targets=targets, modes=(mode,)) as probe:
        for side, ifname, direction, prio, name, _, _ in EQUALITY_SCENE:
            attach_filter(quiet_pair[side], ifname, direction, prio, name)
        status = probe.start()
        if not status.available:
            pytest.skip(status.reason)

        def programs_counts() -> tuple[dict[str, int], dict[str, int]]:
            return (
                {name: run_count(classifier_programs, name) for name in names},
                {name: classifier_programs.seen(name) for name in names},
            )

        runs_before, seen_before = _stable(programs_counts)
        counts_before = _stable(probe.counts)
        assert send_udp(quiet_pair["tx"], quiet_pair["rx"], PACKETS) == PACKETS
        counts, (runs, seen) = _stable(lambda: (probe.counts(), programs_counts()))
        assert probe.misses() == ProbeMisses(0, 0)
    raw = mode is ProbeMode.FEXIT_PROG
    for side, ifname, direction, prio, name, classify_ret, prog_ret in EQUALITY_SCENE:
        ns = quiet_pair[side]
        before = _hook_counts(counts_before, ns, ifname, direction, prio)
        after = _hook_counts(counts, ns, ifname, direction, prio)
        expected = prog_ret if raw else classify_ret
        assert set(after) == {expected}, f"{name} at priority {prio}: {after}"
        live = after[expected] - before.get(expected, 0)
        ran = runs[name] - runs_before[name]
        own = seen[name] - seen_before[name]
        record_property(f"{side}/{ifname}/{direction}/{prio}/{expected}", f"{live}/{ran}/{own}")
        assert live == ran == own, f"{name} at priority {prio}"
        assert live >= PACKETS


# --- (d) clean-up ------------------------------------------------------------------------------


def _probe_objects() -> tuple[set[int], set[int], set[int]]:
    """Ids of the probe's programs, maps and links now in the kernel (by name: other tests may
    load and free their own programs meanwhile)."""
    progs, maps, links = set(), set(), set()
    for prog_id in bpf_syscalls.list_prog_ids():
        with contextlib.suppress(BpfError):  # freed since listed
            if bpf_syscalls.prog_info(prog_id, with_insns=False).name.startswith(PROBE_PROGRAMS):
                progs.add(prog_id)
    for map_id in bpf_syscalls.list_map_ids():
        with contextlib.suppress(BpfError):
            if bpf_syscalls.map_info(map_id).name in PROBE_MAPS:
                maps.add(map_id)
    for link_id in bpf_syscalls.list_link_ids():
        with contextlib.suppress(BpfError):
            if bpf_syscalls.link_info(link_id).prog_id in progs:
                links.add(link_id)
    return progs, maps, links


def _gone(before: tuple[set[int], ...]) -> Callable[[], bool]:
    """True once none of the probe's objects but those listed in `before` remain (the kernel
    frees programs and maps shortly after their last fd closes)."""

    def check() -> bool:
        now = _probe_objects()
        return all(current <= old for current, old in zip(now, before, strict=True))

    return check


def test_close_leaves_no_programs_maps_or_links(classifier_programs: ClassifierPrograms):
    before = _probe_objects()
    before_progs, before_links = (
        set(bpf_syscalls.list_prog_ids()),
        set(bpf_syscalls.list_link_ids()),
    )
    targets = [ProbeTarget(prog_id=classifier_programs.prog_id("term_ok"), priority=1)]
    probe = LiveProbe(targets=targets)
    loaded = set(probe.load())
    assert loaded <= set(bpf_syscalls.list_prog_ids())
    status = probe.start()  # frees everything itself when nothing attaches
    if status.available:
        assert _probe_objects()[2] - before[2], "attached, but no link of the probe is listed"
    probe.close()
    probe.close()  # idempotent
    assert _wait_for(_gone(before)), f"left behind: {_probe_objects()}"
    new_progs = set(bpf_syscalls.list_prog_ids()) - before_progs
    new_links = set(bpf_syscalls.list_link_ids()) - before_links
    assert not loaded & new_progs
    assert not new_links & _probe_objects()[2]


def test_load_then_close_frees_the_loaded_programs():
    before = _probe_objects()
    probe = LiveProbe()
    loaded = probe.load()
    assert set(loaded) <= set(bpf_syscalls.list_prog_ids())
    assert len(_probe_objects()[1] - before[1]) == 3  # counts, misses, stash
    probe.close()
    assert _wait_for(_gone(before)), f"left behind: {_probe_objects()}"
    assert not set(loaded) & set(bpf_syscalls.list_prog_ids())
