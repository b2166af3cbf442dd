"""The self-test's end-to-end step: do the scene's conflicts reach a running daemon's /metrics?

The daemon is found among this node's processes (`tcprio serve`, or the older spelling: `tcprio`
without `--scan` or another command);
its address, TLS and basic auth come from its command line and its configuration file (read
through /proc/<pid>/root, so a daemon in a container is found too). Its /metrics is fetched from
inside its own network namespace, so `0.0.0.0` means its loopback, whichever namespace it is in.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tcprio.kernel.namespaces import entered_path
from tcprio.service.config import DEFAULT_CONFIG_PATH, ConfigError, DaemonConfig, load_config

FETCH_TIMEOUT_S = 5.0
NOT_THE_DAEMON = {"--scan", "scan", "self-test", "bundle", "--help", "-h", "--version"}


@dataclass(frozen=True)
class DaemonTarget:
    pid: int | None
    url: str
    netns_path: str | None  # enter it to connect; None: ours
    config: DaemonConfig | None


def _is_tcprio(argv: list[str]) -> bool:
    if not argv:
        return False
    if Path(argv[0]).name == "tcprio":
        return True
    # python -m tcprio / python /path/to/tcprio
    return len(argv) > 1 and (argv[1:3] == ["-m", "tcprio"] or Path(argv[1]).name == "tcprio")


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def daemon_processes(proc: Path = Path("/proc"), exclude: Iterable[int] = ()) -> list[int]:
    skip = set(exclude)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            argv = _argv(int(entry.name))
        except OSError:
            continue
        if _is_tcprio(argv) and _serves(argv):
            found.append(int(entry.name))
    return sorted(found)


def _serves(argv: list[str]) -> bool:
    """`tcprio serve ...`, or an older daemon: `tcprio [--config F] ...` (a bare `tcprio`
    prints its usage and exits now, so a long-lived one is an older daemon)."""
    return "serve" in argv or not NOT_THE_DAEMON & set(argv)


def _argv(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _config_of(pid: int, argv: list[str]) -> DaemonConfig:
    """The daemon's configuration file, as the daemon sees it: inside its own root (a link
    there cannot lead to this host's files), relative paths from its working directory."""
    path = Path(_option(argv, "--config") or DEFAULT_CONFIG_PATH)
    if not path.is_absolute():
        path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
    return load_config(path, missing_ok=True, root=Path(f"/proc/{pid}/root"))


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def target_of(pid: int) -> DaemonTarget:
    """Where daemon `pid` serves /metrics; ConfigError when its configuration cannot be read."""
    argv = _argv(pid)
    config = _config_of(pid, argv)
    from tcprio.service.config import Overrides, with_overrides

    flags = Overrides(
        listen_address=_option(argv, "--web.listen-address"),
        legacy_listen_address=_option(argv, "--listen-address"),
        web_config_file=_option(argv, "--web.config.file"),
        telemetry_path=_option(argv, "--web.telemetry-path"),
    )
    config = with_overrides(config, flags)
    host = _connect_host(config.listen_host)
    scheme = "https" if config.serves_tls else "http"
    host_part = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{host_part}:{config.listen_port}{config.telemetry_path}"
    return DaemonTarget(pid, url, f"/proc/{pid}/ns/net", config)


def find_daemon(own_pid: int) -> tuple[DaemonTarget | None, str]:
    """The daemon to check, or None with the reason."""
    pids = daemon_processes(exclude=[own_pid])
    if not pids:
        return None, "no tcprio daemon is running on this node"
    try:
        return target_of(pids[0]), ""
    except (ConfigError, OSError) as exc:
        return None, f"tcprio daemon pid {pids[0]}: cannot read its configuration: {exc}"


def excluded_by(config: DaemonConfig | None, names: Iterable[str]) -> str:
    """Why the daemon's namespace globs leave out one of `names` ("" when it watches them)."""
    if config is None:
        return ""
    for name in names:
        if not any(fnmatch.fnmatchcase(name, g) for g in config.include_namespaces):
            return f"its namespaces.include {list(config.include_namespaces)} leaves out {name}"
        if any(fnmatch.fnmatchcase(name, g) for g in config.exclude_namespaces):
            return f"its namespaces.exclude {list(config.exclude_namespaces)} leaves out {name}"
    return ""


def _request(target: DaemonTarget) -> urllib.request.Request:
    request = urllib.request.Request(target.url)
    auth = target.config.basic_auth if target.config else None
    if auth is not None:
        token = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _tls_context() -> ssl.SSLContext:
    # The daemon's own certificate is often self-signed for its node: the self-test checks what
    # it serves on this node, not who it is.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def fetch_metrics(target: DaemonTarget) -> str:
    def fetch() -> str:
        context = _tls_context() if target.url.startswith("https") else None
        request = _request(target)
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S, context=context) as reply:
            return reply.read().decode()

    if target.netns_path is None:
        return fetch()
    with entered_path(target.netns_path):  # sockets made here stay in the daemon's namespace
        return fetch()


ConflictKey = tuple[str, str, str, str, str]  # netns, interface, direction, severity, prog tag


def conflicts_in(metrics_text: str, namespaces: set[str]) -> tuple[set[ConflictKey], int]:
    """The conflicts shown for `namespaces`, and how many conflict series the daemon left out
    (metrics.max_hook_series)."""
    found, omitted = set(), 0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "tcprio_metrics_omitted_series":
            omitted = int(sum(s.value for s in family.samples
                              if s.labels.get("family") == "tcprio_conflict"))  # fmt: skip
        if family.name != "tcprio_conflict":
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("netns") in namespaces and sample.value == 1:
                found.add((labels["netns"], labels["interface"], labels["direction"],
                           labels["severity"], labels.get("blocker_tag", "")))  # fmt: skip
    return found, omitted


@dataclass(frozen=True)
class Propagation:
    seen: set[ConflictKey]
    seconds: float
    error: str = ""
    omitted: int = 0  # conflict series the daemon left out of /metrics


def wait_for_conflicts(
    target: DaemonTarget,
    want: set[ConflictKey],
    namespaces: set[str],
    timeout_s: float,
    since: float | None = None,
) -> Propagation:
    """Poll /metrics until exactly `want` shows for `namespaces`, or `timeout_s` is up.
    `seconds` counts from `since` (a time.monotonic(): when the scene was complete)."""
    started = time.monotonic() if since is None else since
    polling_since = time.monotonic()
    seen: set[ConflictKey] = set()
    error, omitted = "", 0
    while True:
        try:
            (seen, omitted), error = conflicts_in(fetch_metrics(target), namespaces), ""
        except (OSError, urllib.error.URLError, ValueError) as exc:
            error = f"{target.url}: {exc}"
        elapsed = time.monotonic() - started
        if seen == want or time.monotonic() - polling_since > timeout_s:
            return Propagation(seen, elapsed, error, omitted)
        time.sleep(0.2)
