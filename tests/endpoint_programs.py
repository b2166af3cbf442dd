"""CNI-shaped endpoint programs (bpf/endpoint.c): one BCC compile, then per-endpoint copies.

`EndpointTemplate` compiles the file once and keeps each function's bytecode. `load_endpoint`
loads one endpoint's copy: the same bytecode with the `ENDPOINT_*` magic constants replaced by
that endpoint's values and the tail calls aimed at the endpoint's own prog array, which it
fills like a CNI does (one slot per stage). Copies of two endpoints differ only in constants,
as a CNI's per-pod programs do.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tcprio.kernel import bpf_syscalls
from tcprio.kernel.bcc_support import prepare_bcc_environment

ENDPOINT_C = Path(__file__).resolve().parent.parent / "bpf" / "endpoint.c"

ENTRY_POINTS = ("from_container", "to_container")
# Prog-array slot -> the stage it holds (CALL_* in bpf/endpoint.c).
STAGES: dict[int, str] = {
    1: "drop_notify",
    2: "ipv4_from_lxc",
    3: "ipv4_ct_egress",
    4: "ipv4_policy_egress",
    5: "ipv4_nat_egress",
    6: "ipv4_fwd",
    7: "arp_stage",
    8: "ipv6_from_lxc",
    9: "ipv4_to_lxc",
    10: "ipv4_ct_ingress",
    11: "ipv4_policy_ingress",
    12: "ipv4_nat_ingress",
    13: "ipv6_to_lxc",
    14: "trace_stage",
    15: "ipv4_lb_egress",
    16: "ipv4_lb_ingress",
    17: "ipv6_policy_egress",
    18: "ipv6_policy_ingress",
    19: "host_fw_egress",
    20: "host_fw_ingress",
    21: "encap_stage",
}
PROG_ARRAY_SLOTS = 32
FILTER_NAMES = {
    "from_container": "bpf_lxc.o:[from-container]",
    "to_container": "bpf_lxc.o:[to-container]",
}

# The magic values of bpf/endpoint.c and how an endpoint's own value is made from its index.
MAGIC = {
    "ENDPOINT_ID": 0x7E510001,
    "ENDPOINT_IDENTITY": 0x7E520002,
    "ENDPOINT_IPV4": 0x7E530003,
    "ENDPOINT_IFINDEX": 0x7E540004,
    "ENDPOINT_MAC_LOW": 0x7E550005,
}

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")


def endpoint_constants(index: int, ifindex: int) -> dict[int, int]:
    """magic value -> this endpoint's value (all distinct between endpoints)."""
    ipv4 = struct.unpack("<I", bytes((10, 200, index >> 8 & 0xFF, index & 0xFF)))[0]
    return {
        MAGIC["ENDPOINT_ID"]: 1000 + index,
        MAGIC["ENDPOINT_IDENTITY"]: 20000 + index,
        MAGIC["ENDPOINT_IPV4"]: ipv4,
        MAGIC["ENDPOINT_IFINDEX"]: ifindex,
        MAGIC["ENDPOINT_MAC_LOW"]: 0x0A000000 | index,
    }


def patch(bytecode: bytes, constants: dict[int, int], map_fds: dict[int, int]) -> bytes:
    """`bytecode` with immediates equal to a key of `constants` replaced, and map references
    (ld_imm64 with a map fd) to a key of `map_fds` aimed at the new fd."""
    out = bytearray(bytecode)
    count = len(out) // 8
    pc = 0
    while pc < count:
        code, regs, off, imm = _INSN.unpack_from(out, pc * 8)
        if code == _LD_IMM64 and regs >> 4 == _PSEUDO_MAP_FD:
            if imm in map_fds:
                _INSN.pack_into(out, pc * 8, code, regs, off, map_fds[imm])
            pc += 2
            continue
        if imm in constants:
            signed = struct.unpack("<i", struct.pack("<I", constants[imm]))[0]
            _INSN.pack_into(out, pc * 8, code, regs, off, signed)
        pc += 1
    return bytes(out)


@dataclass
class Endpoint:
    """One endpoint's loaded programs and prog array (close() releases them)."""

    index: int
    prog_fds: dict[str, int] = field(default_factory=dict)
    calls_fd: int = -1

    def fd(self, name: str) -> int:
        return self.prog_fds[name]

    def prog_id(self, name: str) -> int:
        return bpf_syscalls.prog_id_of_fd(self.prog_fds[name])

    def close(self) -> None:
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()
        if self.calls_fd >= 0:
            os.close(self.calls_fd)
            self.calls_fd = -1


class EndpointTemplate:
    """bpf/endpoint.c compiled once; `load_endpoint` makes each endpoint's copy."""

    def __init__(self, source: Path = ENDPOINT_C) -> None:
        prepare_bcc_environment()
        from bcc import BPF  # late: importing bcc is only worth it when compiling

        self._bpf = BPF(src_file=str(source).encode())
        names = dict.fromkeys((*ENTRY_POINTS, *STAGES.values()))
        self.bytecode = {name: self._bpf.dump_func(name.encode()) for name in names}
        self.calls_fd = self._bpf.get_table(b"calls").get_fd()

    def instruction_counts(self) -> dict[str, int]:
        return {name: len(code) // 8 for name, code in self.bytecode.items()}

    def load_endpoint(self, index: int, ifindex: int = 0) -> Endpoint:
        endpoint = Endpoint(index)
        try:
            endpoint.calls_fd = bpf_syscalls.prog_array_create(PROG_ARRAY_SLOTS)
            constants = endpoint_constants(index, ifindex)
            for name, code in self.bytecode.items():
                patched = patch(code, constants, {self.calls_fd: endpoint.calls_fd})
                endpoint.prog_fds[name] = bpf_syscalls.prog_load_raw(
                    bpf_syscalls.BPF_PROG_TYPE_SCHED_CLS, patched, name[:15]
                )
            for slot, name in STAGES.items():
                bpf_syscalls.prog_array_set(endpoint.calls_fd, slot, endpoint.prog_fds[name])
        except BaseException:
            endpoint.close()
            raise
        return endpoint

    def close(self) -> None:
        self._bpf.cleanup()

    def __enter__(self) -> EndpointTemplate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
