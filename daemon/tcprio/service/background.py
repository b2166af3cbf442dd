"""Program analysis on its own thread, off the daemon's event loop.

Reading the kernel is quick; analysing programs nobody has seen yet is not (up to the work bound
of `AnalysisLimits.max_work` each, about 2 s for a crafted program). While new programs are
analysed here, the event loop goes on: /healthz stays healthy, systemd's watchdog is fed, events
are queued, and the endpoint serves the last snapshot. When the analysis ends, the loop is
woken through its wake-up pipe and publishes with the fresh verdicts.

Only this thread touches the cache's shared analyses while it runs: the loop asks the cache for
verdicts only when none are missing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tcprio.kernel.programs import ProgramCatalogue
from tcprio.scan import ProgramCache


@dataclass(frozen=True)
class Finished:
    """An analysis that ended: the flush to run again, and since when it has been waiting."""

    kind: str
    started: float
    error: str | None = None


class BackgroundAnalysis:
    def __init__(self, cache: ProgramCache, wake_fd: int) -> None:
        self.cache = cache
        self._wake_fd = wake_fd
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tcprio-analysis")
        self._job: Future | None = None
        self._kind = "incremental"
        self._started = 0.0

    @property
    def running(self) -> bool:
        return self._job is not None

    def defer(
        self, catalogue: ProgramCatalogue, roots: Sequence[int], kind: str, started: float
    ) -> bool:
        """True when the flush must wait: an analysis is running, or starts now for the roots
        without a verdict. The flush runs again (with `kind`, "full" winning) once it ends."""
        if self._job is not None:
            self._kind = "full" if "full" in (kind, self._kind) else kind
            return True
        missing = self.cache.missing(catalogue, roots)
        if not missing:
            return False
        self._kind, self._started = kind, started
        self._job = self._executor.submit(self.cache.analyse, catalogue, missing)
        self._job.add_done_callback(self._wake)
        return True

    def _wake(self, _job: Future) -> None:
        # a full pipe wakes the loop anyway; a closed one means it is shutting down
        with contextlib.suppress(OSError):
            os.write(self._wake_fd, b"a")

    def collect(self) -> Finished | None:
        """The analysis that ended since the last call, its verdicts now in the cache."""
        if self._job is None or not self._job.done():
            return None
        job, self._job = self._job, None
        try:
            self.cache.store(job.result())
        except Exception as exc:  # a bug in the analysis: the loop logs it and goes on
            return Finished(self._kind, self._started, f"{type(exc).__name__}: {exc}")
        return Finished(self._kind, self._started)

    def close(self) -> None:
        """Stop taking work; a running analysis ends within its work bound."""
        self._executor.shutdown(wait=False, cancel_futures=True)
