"""tcx programs attached without a link (BPF_PROG_ATTACH): `--scan` lists them, the daemon sees
them come and go within its tcx poll, with no full resync (an hour away here)."""

from __future__ import annotations

import contextlib
import ctypes
import socket
from collections.abc import Iterator
from pathlib import Path

from tcprio.kernel.bpf_syscalls.syscall import TCX_ATTACH_TYPE, bpf
from tcprio.model import Direction
from tests.bpf_programs import ClassifierPrograms
from tests.kernel import TestNetns, netns, veth_in_one
from tests.test_daemon import daemon, find, hook_labels
from tests.test_scan_kernel import datadog_settings, scan_only

BPF_PROG_ATTACH, BPF_PROG_DETACH = 8, 9
IN = Direction.INGRESS


class _ProgAttachAttr(ctypes.Structure):
    """union bpf_attr for BPF_PROG_ATTACH / BPF_PROG_DETACH."""

    _fields_ = (
        ("target_ifindex", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    )


def _prog_attach(cmd: int, ns: TestNetns, ifname: str, direction: Direction, fd: int) -> None:
    with ns.entered():
        attr = _ProgAttachAttr(
            target_ifindex=socket.if_nametoindex(ifname),
            attach_bpf_fd=fd,
            attach_type=TCX_ATTACH_TYPE[direction],
        )
        bpf(cmd, attr)  # type: ignore[arg-type]


@contextlib.contextmanager
def linkless_tcx(ns: TestNetns, ifname: str, direction: Direction, fd: int) -> Iterator[None]:
    """The program attached to the tcx hook without a link, detached at the end."""
    _prog_attach(BPF_PROG_ATTACH, ns, ifname, direction, fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the namespace may be gone: so is the attachment
            _prog_attach(BPF_PROG_DETACH, ns, ifname, direction, fd)


def test_scan_lists_a_linkless_tcx_program_and_judges_it(classifier_programs: ClassifierPrograms):
    with netns("lltcx") as ns:
        veth_in_one(ns, "t0", "t1")
        with linkless_tcx(ns, "t0", IN, classifier_programs.fd("term_ok")):
            scan = scan_only({ns.name}, datadog_settings())
            t0 = next(i for i in scan.inventories[0].interfaces if i.name == "t0")
            ingress = next(h for h in t0.hooks if h.direction is IN)
            assert [(t.prog_id, t.link_id) for t in ingress.tcx] == [
                (classifier_programs.prog_id("term_ok"), None)
            ]
            assert any("tcx" in c.message for c in scan.result.conflicts)


def test_the_daemon_sees_a_linkless_tcx_attach_and_detach_without_a_resync(tmp_path: Path):
    with (
        ClassifierPrograms() as programs,
        daemon(tmp_path, resync=3600) as running,
        netns("d-lltcx") as ns,
    ):
        veth_in_one(ns, "t0", "t1")
        where = hook_labels(ns, "t0", IN)

        def tcx_shown(samples) -> list[float]:
            return find(samples, "tcprio_classifier_info", **where, hook="tcx")

        before = running.wait_for(
            "the namespace", lambda s: find(s, "tcprio_namespaces_watched") == [1.0]
        )
        with linkless_tcx(ns, "t0", IN, programs.fd("term_redirect")):
            running.wait_for("the link-less tcx program", lambda s: tcx_shown(s) == [1.0])
        after = running.wait_for("the program detached", lambda s: tcx_shown(s) == [])
    full = [find(s, "tcprio_scans_total", kind="full") for s in (before, after)]
    assert full[0] == full[1], full
