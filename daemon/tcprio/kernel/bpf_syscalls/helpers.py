"""Kernel helper names: what a helper call's imm points at, from /proc/kallsyms."""

from __future__ import annotations

import binascii
import functools
import re
import sys
from array import array

# --- kernel helper names ---------------------------------------------------------------------

# A text symbol that `may_be_helper` keeps; a module's symbol ends with "\t[module]".
_HELPER_SYMBOL = re.compile(r"([0-9a-f]{16}) [tT] ((?:__)?bpf_\S*|\S*_elem|\S*_map_\S*)(?:\t|$)")
_CALL_BASE = re.compile(r"^([0-9a-f]{16}) \w __bpf_call_base$", re.MULTILINE)
_IMM_RANGE = 1 << 31


def load_helper_symbols(path: str = "/proc/kallsyms") -> dict[int, str]:
    """{call imm: kernel function name} for every text symbol a helper call's imm can reach
    (imm = address - __bpf_call_base, signed 32 bits). {} when kallsyms hides addresses."""
    with open(path, "rb") as f:
        text = f.read().decode("ascii", "replace")
    base_match = _CALL_BASE.search(text)
    base = int(base_match.group(1), 16) if base_match else 0
    if base == 0:
        return {}
    # filter while matching: a list of all ~120,000 symbols would cost ~25 MiB for a moment
    # A substring test first: running the regex over all ~120,000 lines costs twice as much.
    # "[bpf]" lines are JIT-ed programs (bpf_prog_<tag>_<name>): never a helper, and they come
    # and go with every program load.
    lines = [
        ln
        for ln in text.split("\n")
        if ("bpf_" in ln or "_elem" in ln or "_map_" in ln) and not ln.endswith("\t[bpf]")
    ]
    symbols = [m.groups() for m in map(_HELPER_SYMBOL.match, lines) if m is not None]
    # One bulk hex decode instead of 120,000 int(x, 16) calls: about twice as fast.
    addresses = array("Q", binascii.unhexlify("".join(address for address, _ in symbols)))
    if sys.byteorder == "little":
        addresses.byteswap()
    low, high = base - _IMM_RANGE, base + _IMM_RANGE
    # Walk backwards so that the first name kallsyms lists for an address wins.
    return {
        address - base: name
        for address, (_, name) in zip(reversed(addresses), reversed(symbols), strict=True)
        if low <= address < high
    }


def may_be_helper(name: str) -> bool:
    """Helper implementations (bpf_*) and the map operations the verifier calls directly.

    Keeping only these holds a few thousand names instead of all ~120,000 kernel functions
    (~34 MiB in a long-running daemon). A helper left out is only less precisely known: the
    analysis treats an unnamed helper as any other unknown call.
    """
    return name.startswith(("bpf_", "__bpf_")) or name.endswith("_elem") or "_map_" in name


@functools.cache
def helper_symbols() -> dict[int, str]:
    """`load_helper_symbols()` of this machine, read once per process, and kept across
    processes until the next reboot or module change (`helper_cache`)."""
    from tcprio.kernel import helper_cache

    fingerprint = helper_cache.kernel_fingerprint()
    if fingerprint is None:
        return load_helper_symbols()
    cached = helper_cache.read_cache(fingerprint)
    if cached is not None:
        return cached
    helpers = load_helper_symbols()
    if helpers:  # {} means kallsyms hid the addresses: try again next time
        helper_cache.write_cache(fingerprint, helpers)
    return helpers


def helper_name(imm: int) -> str | None:
    """The kernel function a helper call's imm points at, when kallsyms shows it."""
    return helper_symbols().get(imm)
