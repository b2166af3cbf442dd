"""Timing guards for the tests: ceilings that only a hang reaches, never a speed requirement.

A test bounds wall-clock time only with a hang guard: at least 10 times the measured median of
what it times, and at least HANG_GUARD_S. Work is bounded in deterministic units instead
(instructions visited, requests, bytes, counts); speed figures belong in bench/. Waits poll a
condition up to the guard: a fixed sleep never decides whether a test passes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

# How much slower than a host this machine runs the tests: the guests of the kernel matrix run
# under TCG (qemu without KVM), 20-40x slower, and scripts/vm-test.sh sets it there. Every hang
# guard scales with it, so that it stays at least 10x the median there too.
SLOWDOWN = float(os.environ.get("TCPRIO_TEST_SLOWDOWN", "1"))


def guard(seconds: float) -> float:
    """A hang guard of `seconds` on a host, scaled for this machine (SLOWDOWN)."""
    return seconds * SLOWDOWN


# The smallest hang guard: a CI machine, however noisy, takes this long only when something hangs.
HANG_GUARD_S = guard(30.0)
POLL_S = 0.05  # between two checks of a condition: short, it only sets how soon a wait notices

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], what: str, guard_s: float = HANG_GUARD_S, poll_s: float = POLL_S
) -> T:
    """The first truthy value of `condition()`, polled every `poll_s`; AssertionError naming
    `what` (and how long it waited) once `guard_s` has passed without one."""
    started = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        waited = time.monotonic() - started
        if waited > guard_s:
            raise AssertionError(
                f"{what}: not within the {guard_s:g} s hang guard ({waited:.1f} s)"
            )
        time.sleep(poll_s)
