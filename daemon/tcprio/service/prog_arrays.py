"""Prog arrays the published verdicts went through, polled for slots that changed.

Filling or emptying a tail-call slot sends no netlink event (Cilium and Calico fill policy
slots after attaching; an empty slot makes a verdict unknown), so the daemon polls them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tcprio.kernel import bpf_syscalls
from tcprio.model import MapInfo

# Slots read a poll (one syscall each, ~1.5 us): larger sets are read in turns.
PROG_ARRAY_POLL_SLOTS = 1 << 16

Slots = tuple[tuple[int, int], ...]


class ProgArrayWatch:
    def __init__(self, budget: int = PROG_ARRAY_POLL_SLOTS) -> None:
        self.budget = budget
        self.arrays: dict[int, tuple[int, Slots]] = {}  # map id -> (max_entries, slots)
        self.cursor = 0

    def published(self, maps: Iterable[MapInfo]) -> None:
        """The prog arrays of the analysis just published, as they were read for it. Arrays
        larger than a poll's budget are left to the periodic resync."""
        self.arrays = {
            m.id: (m.max_entries, tuple(sorted(m.prog_array.items())))
            for m in maps
            if m.prog_array is not None and m.max_entries <= self.budget
        }

    def changed(self) -> int | None:
        """The id of a prog array that holds other programs now (or is gone), else None.

        At most `budget` slots are read a poll, the arrays in turn."""
        ids = sorted(self.arrays)
        budget = self.budget
        for n in range(len(ids)):
            map_id = ids[(self.cursor + n) % len(ids)]
            max_entries, slots = self.arrays[map_id]
            if n and max_entries > budget:
                self.cursor = (self.cursor + n) % len(ids)
                return None
            budget -= max_entries
            try:
                now = bpf_syscalls.map_info(map_id).prog_array or {}
            except OSError:
                return map_id  # the array is gone: its programs were unloaded
            if tuple(sorted(now.items())) != slots:
                return map_id
        return None
