"""Check, before scanning, that this process may read what tcprio needs. One line if not."""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# Capability numbers from linux/capability.h, and why tcprio needs each one.
REQUIRED_CAPABILITIES = {
    21: ("CAP_SYS_ADMIN", "enter other network namespaces and open BPF programs by id"),
    19: ("CAP_SYS_PTRACE", "open the network namespaces and environments of other processes"),
    34: ("CAP_SYSLOG", "read programs' instructions with their map ids and helper addresses"),
}
BPF_PROG_GET_NEXT_ID = 11
SYS_BPF = {"x86_64": 321, "aarch64": 280}


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _bpf_access_error() -> str | None:
    """Ask the kernel for the first program id: EPERM means no BPF access at all."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(16)  # start_id = 0, next_id out
    if libc.syscall(number, BPF_PROG_GET_NEXT_ID, attr, len(attr)) == 0:
        return None
    err = ctypes.get_errno()
    if err == errno.ENOENT:  # no program loaded at all: access is fine
        return None
    return f"the bpf() syscall is refused ({os.strerror(err)})"


def missing_privileges() -> str | None:
    """None when the scan can run, else one line saying what is needed."""
    caps = effective_capabilities()
    missing = [
        f"{name} (to {why})"
        for bit, (name, why) in REQUIRED_CAPABILITIES.items()
        if not caps & (1 << bit)
    ]
    if missing:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return (
            f"running as {who} without {', '.join(missing)}: run tcprio as root with these "
            "capabilities (e.g. sudo tcprio scan)"
        )
    bpf_error = _bpf_access_error()
    if bpf_error:
        return f"no BPF access: {bpf_error}; run tcprio as root on the host (not in a sandbox)"
    return None
