"""`tcprio` without --scan: watch every namespace, keep the analysis current, serve metrics.

One thread runs the event loop below; the HTTP endpoint's threads only read the latest
Snapshot. The loop waits on netlink sockets (one per namespace), inotify on the netns folders,
pidfds of processes holding unnamed namespaces, and a wake-up pipe for signals; timers drive
the debounce, the tcx / run-stats poll, the /proc sweep, the full resync and the watchdog.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import selectors
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tcprio.analysis import vendors
from tcprio.analysis.churn import diff_inventories
from tcprio.analysis.semantics import action_name
from tcprio.analysis.starvation import Candidate, candidates, starvations
from tcprio.datadog import resolve_settings
from tcprio.kernel import bpf_syscalls
from tcprio.kernel.containers import read_containers
from tcprio.kernel.namespaces import (
    NAMED_NETNS_DIRS,
    NamespaceGone,
    discover_namespaces,
    unmounted_named_files,
)
from tcprio.kernel.tc_inventory import read_namespace, refresh_hooks
from tcprio.kernel.versions import find_versions
from tcprio.model import (
    DatadogSettings,
    Direction,
    HookKey,
    NamespaceInventory,
    NetNamespace,
    RunStats,
    ScanResult,
    TcFilter,
    VendorVersion,
)
from tcprio.scan import ProgramCache, analyse_node, attached_program_ids, inventory_errors
from tcprio.service import sd_notify
from tcprio.service.background import BackgroundAnalysis, Finished
from tcprio.service.config import (
    ConfigError,
    DaemonConfig,
    Overrides,
    load_config,
    with_overrides,
)
from tcprio.service.endpoint import Endpoint
from tcprio.service.hook_history import HookHistory, Removals, removals
from tcprio.service.linkless_tcx import LinklessTcxWatch
from tcprio.service.logs import Log  # one line per event: json or logfmt, journald priorities
from tcprio.service.metrics import MetricsRenderer
from tcprio.service.prog_arrays import ProgArrayWatch
from tcprio.service.snapshot import Counters, LiveKey, ProbeState, Snapshot
from tcprio.service.tcx_links import DIRECTION_BY_PARENT, TcxLinks
from tcprio.service.watch import NamespaceWatch, NetnsFolderWatch, ProcessExitWatch, TcEvent

NsKey = tuple[int, int]
STALL_AFTER_S = 30.0
SETTLE_STEPS_S = (0.05, 0.2, 1.0)  # extra sweeps after a netns folder event
SETTLE_WINDOW_S = 5.0  # for at most this long after the folder changed


# How long Datadog counts as active after its classifiers were last seen attached, when
# nothing else (a verified agent, the files) shows it: long enough to page on a CNI that
# deleted them, short enough that an uninstalled agent stops the alerts within the hour.
REMEMBER_DATADOG_S = 3600.0
# Run counters are read this often at rest, and at the first poll after a scrape (a program
# each: thousands of syscalls a read on a big node).
RUN_STATS_INTERVAL_S = 5.0
FULL_LINK_LIST_S = 5.0  # a link gone with no other sign shows within this (a new one: a poll)


def release_memory() -> None:
    """A full re-read parses thousands of netlink messages: hand the freed heap back."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads their own heaps (up to 8 per CPU) and keeps them: after a burst of
    concurrent scrapes (one endpoint thread each) the daemon would stay several MiB larger.
    Two arenas serve an event loop and short request threads as well."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


def hooks_to_refresh(
    events: list[TcEvent], old: NamespaceInventory | None
) -> dict[int, set[Direction]] | None:
    """The hooks filter events touched, or None when the whole namespace must be read again
    (links, qdiscs or chains changed, notifications were lost, or the dirt has another cause)."""
    if old is None or not events:
        return None
    known = {i.ifindex for i in old.interfaces}
    targets: dict[int, set[Direction]] = {}
    for event in events:
        direction = DIRECTION_BY_PARENT.get(event.parent)
        touches_one_hook = event.kind.startswith("filter") or event.kind == "tcx-change"
        if not touches_one_hook or direction is None:
            return None
        if event.ifindex not in known:
            return None
        targets.setdefault(event.ifindex, set()).add(Direction(direction))
    return targets


@dataclass
class Watched:
    """A namespace the daemon holds a netlink socket in."""

    namespace: NetNamespace
    watch: NamespaceWatch
    exit_watch: ProcessExitWatch | None = None
    pending: list[TcEvent] = field(default_factory=list)


def selected(namespaces: Iterable[NetNamespace], config: DaemonConfig) -> list[NetNamespace]:
    def wanted(ns: NetNamespace) -> bool:
        included = any(ns.matches(p) for p in config.include_namespaces)
        excluded = any(ns.matches(p) for p in config.exclude_namespaces)
        return included and not excluded

    return [ns for ns in namespaces if wanted(ns)]


class Daemon(TcxLinks):
    def __init__(self, config: DaemonConfig, config_path: Path, overrides: Overrides):
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.log = Log(config.log_level, config.log_format)
        self.kernel = platform.release()
        self.selector = selectors.DefaultSelector()
        self.watched: dict[NsKey, Watched] = {}
        self.inventories: dict[NsKey, NamespaceInventory] = {}
        # Verdicts are cached per program; new programs are analysed on the analysis thread
        # (each within the analysis' work bound) while the loop goes on.
        self.cache = ProgramCache()
        self.counters = Counters()
        self.datadog: DatadogSettings | None = None
        self.datadog_seen_at: float | None = None  # when Datadog's classifiers were last attached
        self.vendor_versions: dict[str, VendorVersion] = {}  # from their containers' images
        self.snapshot = Snapshot.empty(self.kernel)
        self.dirty: set[NsKey] = set()
        self.full_reads: set[NsKey] = set()  # dirty namespaces to read whole, not hook by hook
        self.dirty_since: float | None = None
        self.heartbeat = time.monotonic()
        self.stop_requested = False
        self.reload_requested = False
        self.config_ok = True
        self.link_ids: frozenset[int] = frozenset()
        self._full_link_list_due = 0.0
        self.tcx_links: dict[int, tuple[int, int]] = {}  # link id -> (ifindex, parent)
        # link id -> (ifindex, parent, until): hooks to check again against the link list
        self.tcx_rechecks: dict[int, tuple[int, int, float]] = {}
        self.netkit_links: dict[int, float] = {}  # netkit link id -> until when to look for it
        self.xdp_links: dict[int, tuple[int, int]] = {}  # XDP link id -> (ifindex, program id)
        self.xdp_rechecks: dict[int, tuple[int, int, bool, float]] = {}
        self.xdp_unlinked: set[tuple[NsKey, int, int]] = set()  # XDP programs without a link
        self.run_history: list[tuple[float, dict[int, RunStats]]] = []
        self.starved: frozenset[HookKey] = frozenset()  # as last logged
        self._starvation_candidates: tuple[ScanResult | None, tuple[Candidate, ...]] = (None, ())
        self.history = HookHistory()  # dated tcx attaches and qdisc deletions, per hook
        self.prog_arrays = ProgArrayWatch()
        self.linkless_tcx = LinklessTcxWatch()
        self.inventory_generation = 0  # bumped whenever a namespace's reading changes
        self._walked: tuple[frozenset[int], int] | None = None  # (links, generation) last walked
        self._run_stats_due = 0.0
        self._scraped = False  # a scrape came since the run counters were last read
        self.probe = ProbeState(False, "none", "live probe not started")
        self.stats_fd: int | None = None
        self.live_probe = None  # a tcprio.live_probe.LiveProbe when the kernel lets it attach
        self.endpoint: Endpoint | None = None
        self.folder_watch: NetnsFolderWatch | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.analysis = BackgroundAnalysis(self.cache, self._wake_w)
        # the watchdog timer only runs under systemd with WatchdogSec= (else it would spin)
        watchdog = 0.0 if sd_notify.watchdog_interval() is not None else float("inf")
        self._timers = {
            "sweep": 0.0, "resync": 0.0, "poll": 0.0, "watchdog": watchdog, "settle": math.inf,
        }  # fmt: skip
        self._settle_until = 0.0
        self._settle_steps: list[float] = []

    # --- lifecycle ----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def _start_stats(self) -> None:
        try:
            self.stats_fd = bpf_syscalls.enable_run_stats()
        except OSError as exc:
            self.log("warning", "BPF run statistics unavailable", error=str(exc))

    def _start_probe(self) -> None:
        if not self.config.live_probe:
            self.probe = ProbeState(False, "none", "disabled in the configuration")
            return
        try:
            from tcprio.service.live_probe import LiveProbe, probe_support

            status = probe_support()  # cheap: no BCC compile (LLVM costs ~90 MB of RSS)
            if not status.available:
                self.probe = ProbeState(False, str(status.mode), status.reason)
                self.log("warning", "live verdict probe unavailable", reason=status.reason)
                return
            probe = LiveProbe()
            status = probe.start()
            self.probe = ProbeState(status.available, str(status.mode), status.reason)
            if status.available:
                self.live_probe = probe
            else:
                probe.close()
        except Exception as exc:  # the probe is evidence, never a reason to stop
            self.probe = ProbeState(False, "none", f"live probe failed: {exc}")
        if not self.probe.available:
            self.log("warning", "live verdict probe unavailable", reason=self.probe.reason)

    def _live_verdicts(self) -> dict[LiveKey, int]:
        """The probe's counts, labelled with the names of namespaces and interfaces."""
        if self.live_probe is None:
            return {}
        namespaces = {key[1]: key for key in self.inventories}
        counts: dict[LiveKey, int] = {}
        for key, n in self.live_probe.counts().items():
            ns_key = namespaces.get(key.netns_inode)
            inventory = self.inventories.get(ns_key) if ns_key else None
            if inventory is None:
                continue
            ifname = next((i.name for i in inventory.interfaces if i.ifindex == key.ifindex), None)
            if ifname is None:
                continue
            label = (
                inventory.namespace.name,
                ifname,
                str(key.direction or ""),
                "" if key.priority is None else str(key.priority),
                action_name(key.retval),
            )
            counts[label] = counts.get(label, 0) + n  # fmt: skip
        return counts

    def _start_endpoint(self) -> None:
        render = MetricsRenderer(self._scraped_snapshot, lambda: self.config.metrics)
        self.endpoint = Endpoint(self.config, render, lambda: self.snapshot.ready, self.healthy)
        self.endpoint.start()
        self.log("info", "serving metrics", address=self.config.listen_address,
                 telemetry_path=self.config.telemetry_path, tls=self.config.serves_tls)  # fmt: skip

    def _log_deprecations(self) -> None:
        for line in self.config.deprecations:
            self.log("warning", "deprecated", detail=line)

    def _scraped_snapshot(self) -> Snapshot:
        """The snapshot a scrape renders (on the endpoint's thread)."""
        self._scraped = True
        return self.snapshot

    def healthy(self) -> bool:
        return time.monotonic() - self.heartbeat < STALL_AFTER_S

    def run(self) -> int:
        self._log_deprecations()
        self._install_signals()
        self._start_stats()
        self._start_probe()
        self.folder_watch = NetnsFolderWatch(NAMED_NETNS_DIRS)
        self.selector.register(self.folder_watch, selectors.EVENT_READ, ("folders", None))
        try:
            self._start_endpoint()
        except OSError as exc:
            self.log("error", "cannot listen", address=self.config.listen_address, error=str(exc))
            self.shutdown()
            return 1
        self.full_resync()
        now = time.monotonic()
        self._timers.update(
            sweep=now + self.config.proc_sweep_interval,
            resync=now + self.config.resync_interval,
        )
        sd_notify.ready()
        self.log("info", "ready", namespaces=len(self.watched))
        while not self.stop_requested:
            self._iterate()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        sd_notify.stopping()
        if self.endpoint is not None:
            self.endpoint.stop()
        for key in list(self.watched):
            self._unwatch(key)
        if self.folder_watch is not None:
            self.selector.unregister(self.folder_watch)
            self.folder_watch.close()
        if self.stats_fd is not None:
            os.close(self.stats_fd)
        if self.live_probe is not None:
            self.live_probe.close()
        signal.set_wakeup_fd(-1)
        self.analysis.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.log("info", "stopped")

    # --- the loop ----------------------------------------------------------------------------

    def _next_deadline(self, now: float) -> float:
        deadlines = list(self._timers.values())
        if self.dirty_since is not None:
            deadlines.append(self.dirty_since + self.config.debounce)
        return max(0.0, min(deadlines) - now)

    def _iterate(self) -> None:
        now = time.monotonic()
        self.heartbeat = now
        for key, _mask in self.selector.select(timeout=min(self._next_deadline(now), 1.0)):
            self._guarded(self._dispatch, *key.data)
        finished = self.analysis.collect()
        if finished is not None:
            self._guarded(self._analysed, finished)
        if self.reload_requested:
            self.reload_requested = False
            self._guarded(self.reload)
        self._guarded(self._run_timers, time.monotonic())

    def _guarded(self, step, *args: object) -> None:
        """A failing step is logged and counted; the loop and the last good state go on."""
        try:
            step(*args)
        except Exception as exc:
            self.counters.scan_errors["analyse"] += 1
            self.log("error", "step failed", step=step.__name__,
                     error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    def _dispatch(self, kind: str, ns_key: NsKey | None) -> None:
        if kind == "wake":
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        elif kind == "folders" and self.folder_watch is not None:
            if self.folder_watch.drain():
                self.sweep()
                self._settle_named_namespaces(time.monotonic(), first=True)
        elif kind == "netlink" and ns_key in self.watched:
            self._on_netlink(ns_key)
        elif kind == "exit" and ns_key in self.watched:
            self._on_process_exit(ns_key)

    def _mark_dirty(self, key: NsKey) -> None:
        self.dirty.add(key)
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    def _on_netlink(self, key: NsKey) -> None:
        watched = self.watched[key]
        try:
            events = watched.watch.drain()
        except OSError as exc:
            self.log("warning", "netlink read failed", namespace=watched.namespace.name,
                     error=str(exc))  # fmt: skip
            events = [TcEvent("overrun")]
        if events:
            watched.pending.extend(events)
            self._mark_dirty(key)

    def _on_process_exit(self, key: NsKey) -> None:
        watched = self.watched[key]
        if watched.exit_watch is not None:
            self.selector.unregister(watched.exit_watch)
            watched.exit_watch.close()
            watched.exit_watch = None
        self.sweep()  # another process may still live there; if none, it goes

    def _settle_named_namespaces(self, now: float, first: bool = False) -> None:
        """`ip netns add` creates the file, then mounts the namespace on it, and the mount sends
        no inotify event (nor does a file that another mount namespace creates): after a folder
        event, sweep again a few times, and while a file is not a namespace yet."""
        if first:
            self._settle_until = now + SETTLE_WINDOW_S
            self._settle_steps = list(SETTLE_STEPS_S)
        self._timers["settle"] = math.inf
        if now >= self._settle_until:
            return
        if self._settle_steps:
            self._timers["settle"] = now + self._settle_steps.pop(0)
        elif unmounted_named_files(NAMED_NETNS_DIRS):
            self._timers["settle"] = now + SETTLE_STEPS_S[0]

    def _run_timers(self, now: float) -> None:
        if now >= self._timers["settle"]:
            self.sweep()
            self._settle_named_namespaces(now)
        if self.dirty_since is not None and now >= self.dirty_since + self.config.debounce:
            self.flush()
        if now >= self._timers["poll"]:
            self._timers["poll"] = now + self.config.tcx_poll_interval
            self.poll_links_and_stats()
        if now >= self._timers["sweep"]:
            self._timers["sweep"] = now + self.config.proc_sweep_interval
            self.sweep()
        if now >= self._timers["resync"]:
            self._timers["resync"] = now + self.config.resync_interval
            self.full_resync()
        interval = sd_notify.watchdog_interval()
        if interval is not None and now >= self._timers["watchdog"]:
            self._timers["watchdog"] = now + interval  # already half of WatchdogSec
            sd_notify.watchdog_ping()

    # --- namespaces --------------------------------------------------------------------------

    def _watch(self, ns: NetNamespace) -> None:
        try:
            watch = NamespaceWatch(ns)
        except (OSError, NamespaceGone) as exc:
            self.log("debug", "cannot watch namespace", namespace=ns.name, error=str(exc))
            return
        watched = Watched(ns, watch)
        self.selector.register(watch, selectors.EVENT_READ, ("netlink", ns.key))
        if ns.source == "process" and ns.pid is not None:
            with contextlib.suppress(OSError):
                watched.exit_watch = ProcessExitWatch(ns.pid)
                self.selector.register(watched.exit_watch, selectors.EVENT_READ, ("exit", ns.key))
        self.watched[ns.key] = watched
        self._mark_dirty(ns.key)
        self.log("debug", "watching namespace", namespace=ns.name)

    def _unwatch(self, key: NsKey) -> None:
        watched = self.watched.pop(key)
        self.selector.unregister(watched.watch)
        watched.watch.close()  # our socket must not keep the namespace alive
        if watched.exit_watch is not None:
            self.selector.unregister(watched.exit_watch)
            watched.exit_watch.close()
        self.inventories.pop(key, None)
        self.inventory_generation += 1
        self.dirty.discard(key)
        self.full_reads.discard(key)
        self.counters.forget(watched.namespace.name)
        self.log("debug", "namespace gone", namespace=watched.namespace.name)

    def _discover(self) -> list[NetNamespace] | None:
        try:
            containers = read_containers(self.config.container_roots)
            versions = find_versions(containers).versions
            if versions != self.vendor_versions:  # published with the next flush, debounced
                self.vendor_versions = versions
                self.dirty_since = self.dirty_since or time.monotonic()
            return selected(discover_namespaces(containers=containers), self.config)
        except OSError as exc:
            self.counters.scan_errors["discover"] += 1
            self.log("error", "namespace discovery failed", error=str(exc))
            return None

    def sweep(self) -> None:
        """Watch new namespaces, drop vanished ones (the /proc sweep and folder events)."""
        found = self._discover()
        if found is None:
            return
        if self.folder_watch is not None:
            self.folder_watch.refresh()
        current = {ns.key: ns for ns in found}
        for key in [k for k in self.watched if k not in current]:
            self._unwatch(key)
            self.dirty_since = self.dirty_since or time.monotonic()
        for key, ns in current.items():
            if key not in self.watched:
                self._watch(ns)
                continue
            if self.watched[key].namespace.name != ns.name:
                self._rename(key, ns)
            if self.watched[key].exit_watch is None and ns.pid is not None:
                self._rewatch_exit(key, ns)

    def _rename(self, key: NsKey, ns: NetNamespace) -> None:
        """A pod's namespace can be pinned before its runtime writes the sandbox's config.json:
        it is named `cni-...` first and by its pod later. Re-read it under the new name."""
        watched = self.watched[key]
        old = watched.namespace.name
        watched.namespace = ns
        self.counters.forget(old)
        self.full_reads.add(key)
        self._mark_dirty(key)
        self.log("info", "namespace renamed", namespace=ns.name, previous=old)

    def _rewatch_exit(self, key: NsKey, ns: NetNamespace) -> None:
        watched = self.watched[key]
        if ns.source != "process":
            return
        with contextlib.suppress(OSError):
            watched.exit_watch = ProcessExitWatch(ns.pid)  # type: ignore[arg-type]
            self.selector.register(watched.exit_watch, selectors.EVENT_READ, ("exit", key))

    def full_resync(self) -> None:
        self.sweep()
        self.dirty.update(self.watched)
        self.full_reads.update(self.watched)
        self._refresh_datadog()
        self.flush(kind="full")

    def _refresh_datadog(self) -> None:
        try:
            settings = resolve_settings(
                files=self.config.datadog_files,
                scan_processes=self.config.scan_datadog_processes,
            )
        except Exception as exc:  # keep the last good settings
            self.counters.scan_errors["datadog_config"] += 1
            self.log("error", "Datadog settings unreadable", error=str(exc))
            return
        if self.datadog is None or settings.errors != self.datadog.errors:
            for error in settings.errors:
                self.counters.scan_errors["datadog_config"] += 1
                self.log("warning", "Datadog configuration problem", detail=error)
        self.datadog = settings

    # --- analysis ----------------------------------------------------------------------------

    def _is_datadog(self, f: TcFilter) -> bool:
        program = self.cache.infos.get(f.prog_id) if f.prog_id is not None else None
        name = (program.full_name or program.name) if program else None
        rule = vendors.identify(name, f.name)
        return bool(rule and rule.datadog_classifier)

    def _reread(self, key: NsKey) -> None:
        watched = self.watched.get(key)
        if watched is None:
            return
        old = self.inventories.get(key)
        full = key in self.full_reads
        self.full_reads.discard(key)
        targets = None if full else hooks_to_refresh(watched.pending, old)
        if old is not None and targets is not None:
            inventory = refresh_hooks(old, targets)
        else:
            inventory = read_namespace(watched.namespace)
        if inventory is None:  # vanished between the event and now
            self._unwatch(key)
            return
        if inventory.error:
            self.counters.scan_errors["enumerate"] += 1
        removed = self._note_history(watched, old, inventory)
        self._count_events(watched, inventory, old)
        for change in diff_inventories(old, inventory, self._is_datadog) if old else ():
            if change.kind == "datadog-disappeared":
                change = self.history.explain(change, removed, self._program_name, time.time())
            if change.kind in ("replace", "datadog-disappeared"):
                self.counters.count_change(change)
                self.log("warning" if change.kind != "replace" else "info", change.kind,
                         **change.as_log())  # fmt: skip
        self._forget_vanished_interfaces(watched.namespace.name, old, inventory)
        self._start_disappearance_counters(watched.namespace.name, inventory)
        self.inventories[key] = inventory
        self.inventory_generation += 1

    def _note_history(
        self, watched: Watched, old: NamespaceInventory | None, new: NamespaceInventory
    ) -> Removals:
        """Date what this reading shows (filter and qdisc deletions, new tcx programs)."""
        names = {i.ifindex: i.name for inv in (old, new) if inv for i in inv.interfaces}
        name = watched.namespace.name
        removed = removals(name, names, watched.pending)
        now = time.time()
        self.history.note_reading(name, old, new, removed, self._program_name, now)
        for change in self.history.late_causes(now):
            self.log("warning", change.kind, **change.as_log())
        return removed

    def _program_name(self, prog_id: int) -> str | None:
        program = self.cache.infos.get(prog_id)
        if program is None:
            try:
                program = bpf_syscalls.prog_info(prog_id, with_insns=False)
            except OSError:
                return None
        return program.full_name or program.name

    def _start_disappearance_counters(self, namespace: str, inventory: NamespaceInventory) -> None:
        """A hook with a Datadog classifier gets its counter at 0, so increase() sees a 1."""
        for interface in inventory.interfaces:
            for hook in interface.hooks:
                if any(self._is_datadog(f) for f in hook.filters):
                    key = (namespace, interface.name, str(hook.direction))
                    self.counters.disappearances.setdefault(key, 0)

    def _count_events(
        self, watched: Watched, new: NamespaceInventory, old: NamespaceInventory | None
    ) -> None:
        names = {i.ifindex: i.name for inv in (old, new) if inv for i in inv.interfaces}
        for event in watched.pending:
            if not event.kind.startswith("filter"):
                continue
            direction = DIRECTION_BY_PARENT.get(event.parent)
            ifname = names.get(event.ifindex)
            if direction is None or ifname is None:
                continue
            change = "add" if event.kind == "filter-add" else "delete"
            hook = (watched.namespace.name, ifname, direction)
            self.counters.count_filter_event(hook, event.priority, change)
            self.log("debug", f"filter-{change}", namespace=hook[0], interface=ifname,
                     direction=direction, priority=event.priority, handle=event.handle)  # fmt: skip
        watched.pending.clear()

    def _forget_vanished_interfaces(
        self, namespace: str, old: NamespaceInventory | None, new: NamespaceInventory
    ) -> None:
        if old is None:
            return
        gone = {i.name for i in old.interfaces} - {i.name for i in new.interfaces}
        if gone:
            self.counters.forget(namespace, gone)

    def _analysed(self, finished: Finished) -> None:
        if finished.error is not None:
            self.counters.scan_errors["analyse"] += 1
            self.log("error", "analysis failed", error=finished.error)
        self.flush(finished.kind, finished.started)

    def flush(self, kind: str = "incremental", started: float | None = None) -> None:
        """Read the dirty namespaces again and publish; when programs are new, their analysis
        runs on the analysis thread first and the flush runs again when it ends."""
        started = time.monotonic() if started is None else started
        for count, key in enumerate(list(self.dirty), start=1):
            self._reread(key)
            if count % 25 == 0:
                release_memory()  # a full re-read of hundreds of namespaces: keep the peak low
        self.dirty.clear()
        self.dirty_since = None
        if self.datadog is None:
            self._refresh_datadog()
        if self.datadog is None:
            return
        inventories = list(self.inventories.values())
        try:
            roots = attached_program_ids(inventories)
            catalogue = self.cache.catalogue(roots)
            if self.analysis.defer(catalogue, roots, kind, started):
                return  # published when the analysis thread is done
            node = analyse_node(
                inventories, self.datadog, self.cache, observers=self.config.observer_rules,
                catalogue=catalogue, assume_datadog=self.config.assume_datadog,
                datadog_seen_before=self._datadog_seen_before(),
                vendor_versions=self.vendor_versions,
            )  # fmt: skip
        except Exception as exc:  # keep serving the last good state
            self.counters.scan_errors["analyse"] += 1
            self.log("error", "analysis failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.counters.scan_errors["programs"] += len(node.catalogue.errors)
        for error in inventory_errors(inventories):
            self.log("warning", "namespace read error", detail=error)
        self.counters.scans[kind] += 1
        self._note_datadog_hooks(node.result)
        self._publish(node, time.monotonic() - started)
        if kind == "full":
            release_memory()

    def _note_datadog_hooks(self, result: ScanResult) -> None:
        """Hooks where the analysis names a Datadog classifier: their disappearance counters
        start at 0 in this very snapshot (a reading can precede the program's info, which names
        it), and Datadog counts as seen now."""
        for hook in result.hooks:
            if any(c.is_datadog for c in hook.classifiers):
                key = (hook.namespace, hook.interface, str(hook.direction))
                self.counters.disappearances.setdefault(key, 0)
                self.datadog_seen_at = time.time()

    def _datadog_seen_before(self) -> str | None:
        """Datadog's classifiers were attached a short while ago: it still counts as active
        (a CNI moving to tcx deletes them while the agent runs; see decide_presence)."""
        if self.datadog_seen_at is None:
            return None
        ago = time.time() - self.datadog_seen_at
        if ago > REMEMBER_DATADOG_S:
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.datadog_seen_at))
        return (
            f"Datadog's classifiers were last seen attached at {when} ({ago:.0f} s ago, by this "
            "daemon); none is attached now"
        )

    def _publish(self, node, seconds: float) -> None:
        prev = self.snapshot
        self.prog_arrays.published(node.catalogue.maps.values())
        self.snapshot = Snapshot(
            ready=True,
            taken_at=time.time(),
            analysis_seconds=seconds,
            result=node.result,
            programs=dict(node.catalogue.programs),
            datadog=self.datadog,
            namespaces=len(self.watched),
            interfaces=sum(len(i.interfaces) for i in self.inventories.values()),
            counters=self.counters.frozen(),
            run_stats=prev.run_stats,
            starved=self._starved(node.result),
            probe=self.probe,
            config_ok=self.config_ok,
            kernel=self.kernel,
            generation=prev.generation + 1,
            versions=dict(self.vendor_versions),
        )

    def poll_links_and_stats(self) -> None:
        """tcx, netkit and XDP links send no netlink event: new and removed links are polled."""
        links = self._current_links()
        changed: list[tuple[int, int, int]] = []
        other_links = False  # freplace links among them: they change what programs run
        if links != self.link_ids:
            changed = self._tcx_hooks_changed(links)
            self.log("debug", "bpf links changed", appeared=sorted(links - self.link_ids),
                     went=sorted(self.link_ids - links), tcx=[c[0] for c in changed])  # fmt: skip
            other_links = bool((links ^ self.link_ids) - {c[0] for c in changed})
            self.link_ids = links
            self.history.links_listed(links, time.time())
        if changed:
            self._mark_tcx_hooks(changed)
        if changed or self._walk_needed(links):
            self._mark_tcx_shown_but_gone(links)
            self._recheck_tcx(changed)
            self._mark_netkit_namespaces(links)
            self._mark_xdp_namespaces(links)
            self._walked = (links, self.inventory_generation)
        interval = self.config.tcx_poll_interval
        linkless = self.linkless_tcx.changed(
            self.inventories, self.watched, interval, self.inventory_generation
        )
        for key, events in linkless.items():
            self.watched[key].pending.extend(events)  # attached without a link: no event
            self._mark_dirty(key)
        changed = self.prog_arrays.changed()
        if changed is not None:
            self.log("debug", "prog array changed", map_id=changed)
        if changed is not None or other_links:
            # same inventories; the catalogue reads the prog arrays and freplace links afresh
            self.flush()
        now = time.monotonic()
        if self._scraped or now >= self._run_stats_due:
            self._scraped = False
            self._run_stats_due = now + RUN_STATS_INTERVAL_S
            self._refresh_run_stats()

    def _current_links(self) -> frozenset[int]:
        """The BPF links: a new one at every poll (one syscall: ids only grow), the whole list,
        which also shows the links gone, every FULL_LINK_LIST_S (a syscall per link: 100 tcx
        links listed every second cost a daemon at rest half its CPU)."""
        now = time.monotonic()
        try:
            if now >= self._full_link_list_due or not self.link_ids:
                self._full_link_list_due = now + FULL_LINK_LIST_S
                return frozenset(bpf_syscalls.list_link_ids())
            new = bpf_syscalls.link_ids_after(max(self.link_ids))
        except OSError:
            return self.link_ids
        return self.link_ids | frozenset(new) if new else self.link_ids

    def _walk_needed(self, links: frozenset[int]) -> bool:
        """Whether the readings must be walked for hooks to read again: the link list or a
        reading changed since the last walk, or a recheck is still running (else the walk
        would find what the last one found, and marked)."""
        now = time.monotonic()
        return (
            self._walked != (links, self.inventory_generation)
            or bool(self.tcx_rechecks or self.xdp_rechecks)
            or any(now <= until for until in self.netkit_links.values())
        )

    def _refresh_run_stats(self) -> None:
        stats: dict[int, RunStats] = {}
        for prog_id in self.snapshot.programs:
            with contextlib.suppress(OSError):
                info = bpf_syscalls.prog_info(prog_id, with_insns=False)
                stats[prog_id] = RunStats(info.run_cnt, info.run_time_ns)
        now = time.monotonic()
        self.run_history = [(t, s) for t, s in self.run_history if now - t <= 60] + [(now, stats)]
        prev = self.snapshot
        self.snapshot = Snapshot(
            **{
                **prev.__dict__,
                "run_stats": stats,
                "starved": self._starved(prev.result),
                "live_verdicts": self._live_verdicts(),
            }
        )

    def _starved(self, result: ScanResult) -> frozenset[HookKey]:
        """The starved hooks; a hook that becomes starved is logged with the classifiers
        before Datadog's that ran (whatever their verdict class), one that recovers too."""
        if self._starvation_candidates[0] is not result:  # once per analysis, not per reading
            self._starvation_candidates = (result, candidates(result))
        among = self._starvation_candidates[1]
        found = {s.hook: s for s in starvations(result, self.run_history, among=among)}
        for hook in sorted(found.keys() - self.starved):
            self.log("warning", "datadog-starved", **found[hook].as_log())
        ended = self.starved - found.keys()
        present = (
            {(h.namespace, h.interface, str(h.direction)) for h in result.hooks} if ended else set()
        )
        for namespace, interface, direction in sorted(ended & present):
            self.log("info", "datadog-starvation-ended", event="datadog-starvation-ended",
                     namespace=namespace, interface=interface, direction=direction)  # fmt: skip
        self.starved = frozenset(found)
        return self.starved

    # --- configuration -----------------------------------------------------------------------

    def reload(self) -> None:
        sd_notify.reloading()
        try:
            config = with_overrides(load_config(self.config_path), self.overrides)
        except Exception as exc:  # ConfigError, or a bug: either way the last good one stays
            problems = exc.problems if isinstance(exc, ConfigError) else [
                f"{self.config_path}: {type(exc).__name__}: {exc}"
            ]
            self.counters.reloads["failure"] += 1
            self.config_ok = False
            for problem in problems:
                self.log("error", "configuration rejected, keeping the last good one",
                         detail=problem)  # fmt: skip
            self._republish()
            sd_notify.ready()
            return
        endpoint_changed = endpoint_settings(config) != endpoint_settings(self.config)
        self.config = config
        self.log = Log(config.log_level, config.log_format)
        self._log_deprecations()
        self.config_ok = True
        self.counters.reloads["success"] += 1
        if endpoint_changed and self.endpoint is not None:
            self.endpoint.stop()
            self._start_endpoint()
        self.log("info", "configuration reloaded", source=config.source)
        self.full_resync()
        sd_notify.ready()

    def _republish(self) -> None:
        prev = self.snapshot
        self.snapshot = Snapshot(
            **{
                **prev.__dict__,
                "counters": self.counters.frozen(),
                "config_ok": self.config_ok,
                "generation": prev.generation + 1,
            }
        )


def endpoint_settings(config: DaemonConfig) -> tuple:
    """What the endpoint is built from: a reload that changes it restarts the endpoint (a web
    config file's certificates count by their contents)."""
    return (config.listen_host, config.listen_port, config.tls, config.basic_auth, config.web,
            config.telemetry_path)  # fmt: skip


def run_daemon(config_path: Path, overrides: Overrides | None = None) -> int:
    overrides = overrides or Overrides()
    try:
        config = with_overrides(load_config(config_path, missing_ok=True), overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tcprio: {problem}", file=sys.stderr)
        return 2
    limit_malloc_arenas()
    return Daemon(config, config_path, overrides).run()
