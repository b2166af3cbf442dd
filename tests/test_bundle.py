"""`tcprio bundle` as a user runs it, against a real scene: what the archive holds (cross-checked
with tc and bpftool), that no planted secret survives anywhere in it, the confirmation prompt on
a pseudo-terminal, failing collectors, and that it changes nothing on the node."""

from __future__ import annotations

import gzip
import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcprio import __version__
from tcprio.bundle.archive import final_redaction
from tcprio.bundle.collect import Collector, CollectorFailed, Item, Member, run_collector
from tcprio.bundle.collectors import hooked_interfaces, kernel_config_text, netns_collector
from tcprio.bundle.common import human_size, safe_name, unique_name
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import Direction
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, run, veth_in_one

E, IN = Direction.EGRESS, Direction.INGRESS
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DD_")}
# Every classifier of the scene: (interface, direction, priority, program).
FILTERS = (
    ("veth0", E, 5, "term_shot"),
    ("veth0", E, 10, "classifier_egress"),
    ("veth0", IN, 3, "pass_unspec"),
)


def tcprio_bundle(
    *args: str, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcprio", "bundle", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**CLEAN_ENV, **(env or {})},
        timeout=120,
        **kwargs,
    )


def read_archive(path: Path) -> dict[str, bytes]:
    """Every member, by its path below the archive's one top folder."""
    members = {}
    with tarfile.open(path) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        assert tops == {path.name.removesuffix(".tar.gz")}, tops
        for m in tar.getmembers():
            assert m.isfile() and m.mode == 0o600, m.name
            f = tar.extractfile(m)
            assert f is not None
            members[m.name.split("/", 1)[1]] = f.read()
    return members


def ns_state(ns: TestNetns) -> dict:
    """The test namespace's qdiscs and filters, as tc reports them (no counters)."""
    state: dict = {"qdiscs": ns.tc_json("qdisc", "show")}
    for ifname in ("veth0", "veth1"):
        for direction in ("ingress", "egress"):
            state[f"{ifname}/{direction}"] = ns.tc_json("filter", "show", "dev", ifname, direction)
    return state


def attached_prog_ids(state: dict) -> set[int]:
    ids = set()
    for key, filters in state.items():
        if key != "qdiscs":
            ids |= {f["options"]["prog"]["id"] for f in filters if "prog" in f.get("options", {})}
    return ids


def loaded_prog_ids() -> set[int]:
    return {p["id"] for p in json.loads(run("bpftool", "-j", "prog", "show").stdout)}


# --- the scene and its bundle ----------------------------------------------------------------

SECRETS = {
    "api_key": "plantedApiKey0001",
    "app_key": "planted-app-key-0002",
    "nested token": "planted-nested-token-0003",
    "url password": "planted-url-password-0004",
    "32-hex under an innocuous key": "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
    "password block item 1": "planted-block-password-0006",
    "password block item 2": "planted-block-password-0007",
    "kubernetes env value": "planted-k8s-env-value-0008",
    "bearer token": "plantedBearerToken0009",
    "DD_API_KEY= style": "planted-env-style-key-0010",
    "export style": "planted-exported-key-0011",
    "token in a comment": "planted-comment-token-0012",
    "basic_auth password file contents": "planted-password-file-content-0013",
    "process environment": "planted-process-env-0014",
    "40-hex app key": "0123456789abcdef0123456789abcdef76543210",
}

SYSTEM_PROBE_YAML = f"""\
# system-probe.yaml planted by tcprio's tests
api_key: {SECRETS["api_key"]}
app_key: "{SECRETS["app_key"]}"
site: datadoghq.eu
runtime_security_config:
  enabled: true
  network:
    classifier_priority: 5
    classifier_handle: 0
  remote_configuration:
    token: {SECRETS["nested token"]}
proxy:
  https: http://proxyuser:{SECRETS["url password"]}@proxy.example:3128
network_config:
  sidecar_id: {SECRETS["32-hex under an innocuous key"]}
database:
  password:
    - {SECRETS["password block item 1"]}
    - {SECRETS["password block item 2"]}
  host: db.example
"""
SECURITY_AGENT_YAML = f"""\
runtime_security_config:
  enabled: true
env:
  - name: DD_APP_KEY
    value: {SECRETS["kubernetes env value"]}
  - name: DD_SITE
    value: datadoghq.eu
http_headers:
  Authorization: Bearer {SECRETS["bearer token"]}
  X-Build: {SECRETS["40-hex app key"]}
"""
ENVIRONMENT_FILE = f"""\
DD_API_KEY={SECRETS["DD_API_KEY= style"]}
export DD_APP_KEY="{SECRETS["export style"]}"
DD_SITE=datadoghq.eu
"""


def tcprio_yaml(password_file: Path) -> str:
    return f"""\
# tcprio configuration planted by the tests. Old metrics token: {SECRETS["token in a comment"]}
listen_address: "127.0.0.1:9842"
log_level: debug
basic_auth:
  username: prometheus
  password_file: {password_file}
"""


@dataclass
class BundleRun:
    ns: TestNetns
    proc: subprocess.CompletedProcess[str]
    path: Path
    archive: bytes
    members: dict[str, bytes]
    before: dict
    after: dict
    loaded_after: set[int]
    seconds: float
    password_file: Path
    datadog_files: list[Path]

    def member(self, path: str) -> bytes:
        assert path in self.members, sorted(self.members)
        return self.members[path]

    def json(self, path: str):
        return json.loads(self.member(path))

    def folder(self) -> str:
        return next(
            entry["archive_folder"]
            for entry in self.json("namespaces.json")
            if entry["name"] == self.ns.name
        )


@pytest.fixture(scope="module")
def bundle_run(classifier_programs, tmp_path_factory) -> Iterator[BundleRun]:
    tmp = tmp_path_factory.mktemp("bundle")
    password_file = tmp / "metrics-password"
    password_file.write_text(SECRETS["basic_auth password file contents"] + "\n")
    config = tmp / "tcprio.yaml"
    config.write_text(tcprio_yaml(password_file))
    datadog_files = [tmp / "system-probe.yaml", tmp / "security-agent.yaml", tmp / "datadog.env"]
    for path, text in zip(
        datadog_files, (SYSTEM_PROBE_YAML, SECURITY_AGENT_YAML, ENVIRONMENT_FILE), strict=True
    ):
        path.write_text(text)
    output = tmp / "b.tar.gz"
    with netns("bundle") as ns:
        for ifname in ("veth0", "veth1"):
            veth_in_one(ns, ifname, f"{ifname}p")
        add_clsact(ns, "veth0")
        ns.tc("qdisc", "add", "dev", "veth1", "ingress")  # legacy: only an ingress hook
        for ifname, direction, prio, prog in FILTERS:
            attach_filter(ns, ifname, direction, prio, prog)
        before = ns_state(ns)
        dd_args = [a for f in datadog_files for a in ("--datadog-config", str(f))]
        started = time.monotonic()
        proc = tcprio_bundle(
            "--yes", "--output", str(output), "--netns", ns.name, "--config", str(config),
            *dd_args, "--no-agent-process",
            env={"DD_API_KEY": SECRETS["process environment"]},
        )  # fmt: skip
        seconds = time.monotonic() - started
        after = ns_state(ns)
        loaded_after = loaded_prog_ids()
        assert proc.returncode == 0, proc.stderr
        archive = output.read_bytes()
        yield BundleRun(
            ns, proc, output, archive, read_archive(output), before, after, loaded_after,
            seconds, password_file, datadog_files,
        )  # fmt: skip


# --- what the archive holds ------------------------------------------------------------------


def test_written_with_mode_0600_and_its_path_printed(bundle_run: BundleRun):
    assert f"Bundle written: {bundle_run.path}\n" in bundle_run.proc.stdout
    assert "Nothing was uploaded" in bundle_run.proc.stdout
    assert stat.S_IMODE(bundle_run.path.stat().st_mode) == 0o600
    leftovers = [p.name for p in bundle_run.path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file left next to it
    print(
        f"bundle of 1 namespace: {len(bundle_run.members)} files, "
        f"{human_size(sum(map(len, bundle_run.members.values())))} uncompressed, "
        f"{human_size(len(bundle_run.archive))} compressed, {bundle_run.seconds:.2f} s"
    )


def test_manifest_lists_every_member_with_its_size_and_collector(bundle_run: BundleRun):
    manifest = bundle_run.json("manifest.json")
    assert manifest["schema"] == "tcprio.bundle" and manifest["tcprio_version"] == __version__
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(bundle_run.members) - {"manifest.json"}
    for path, entry in listed.items():
        assert entry["size"] == len(bundle_run.members[path]), path
    collectors = {c["name"]: c for c in manifest["collectors"]}
    assert {entry["collector"] for entry in listed.values()} <= {*collectors, "bundle"}
    folder = bundle_run.folder()
    assert f"netns-{folder.rpartition('/')[2]}" in collectors
    for name in ("namespaces", "scan", "bpf", "tcprio-config", "datadog", "kernel", "versions"):
        assert collectors[name]["ok"], collectors[name]
    # This machine may have no journal at all: then the logs collector says so, in errors/.
    logs = collectors["logs"]
    assert logs["ok"] or "journal" in logs["error"], logs
    assert ("errors/logs.txt" in bundle_run.members) is (not logs["ok"])
    failed = {name for name, c in collectors.items() if not c["ok"]}
    assert failed <= {"logs"}, failed
    command = listed[f"{folder}/tc-qdisc.txt"]["command"]
    assert command == f"nsenter --net=/run/netns/{bundle_run.ns.name} tc -s -d qdisc show"


def test_only_the_selected_namespace_is_listed(bundle_run: BundleRun):
    names = [entry["name"] for entry in bundle_run.json("namespaces.json")]
    assert names == [bundle_run.ns.name]
    folders = {p.split("/")[1] for p in bundle_run.members if p.startswith("namespaces/")}
    assert folders == {bundle_run.folder().split("/")[1]}


def test_scan_json_lists_the_namespace_classifiers(bundle_run: BundleRun):
    scan = bundle_run.json("scan.json")
    assert scan["schema"] == "tcprio.scan"
    [namespace] = scan["namespaces"]
    assert namespace["name"] == bundle_run.ns.name
    found = set()
    for interface in namespace["interfaces"]:
        for hook in interface["hooks"]:
            for c in hook["classifiers"]:
                found.add((interface["name"], hook["direction"], c["priority"], c["name"]))
    assert found == {(i, str(d), p, n) for i, d, p, n in FILTERS}
    assert scan["datadog"]["classifier_priority"]["value"] == 5  # from the planted file
    assert "CLASSIFIERS" in bundle_run.member("scan.txt").decode()


def test_tc_outputs_match_what_tc_says(bundle_run: BundleRun):
    folder, ns = bundle_run.folder(), bundle_run.ns
    expected_files = {
        "tc-filter-veth0-ingress.txt",
        "tc-filter-veth0-egress.txt",
        "tc-filter-veth1-ingress.txt",  # legacy ingress qdisc: no egress hook
    }
    present = {p.rpartition("/")[2] for p in bundle_run.members if "/tc-filter-" in p}
    assert present == expected_files
    for ifname, direction in (("veth0", "ingress"), ("veth0", "egress"), ("veth1", "ingress")):
        text = bundle_run.member(f"{folder}/tc-filter-{ifname}-{direction}.txt").decode()
        assert text == ns.tc("-s", "-d", "filter", "show", "dev", ifname, direction).stdout
        for f_if, f_dir, prio, prog in FILTERS:
            if (f_if, str(f_dir)) == (ifname, direction):
                # the filter's name (the program's full name; the kernel cuts it at 15)
                assert re.search(rf"pref {prio} bpf chain 0 handle .* {prog} direct-action", text)
    qdiscs = bundle_run.member(f"{folder}/tc-qdisc.txt").decode()
    assert "qdisc clsact ffff: dev veth0" in qdiscs and "qdisc ingress ffff: dev veth1" in qdiscs
    qdisc_json = {(q["kind"], q["dev"]) for q in bundle_run.json(f"{folder}/tc-qdisc.json")}
    assert {("clsact", "veth0"), ("ingress", "veth1")} <= qdisc_json
    links = {link["ifname"] for link in bundle_run.json(f"{folder}/ip-link.json")}
    assert links == {"lo", "veth0", "veth0p", "veth1", "veth1p"}


def test_bpftool_outputs_are_there(bundle_run: BundleRun):
    folder = bundle_run.folder()
    attached = attached_prog_ids(bundle_run.before)
    programs = {p["id"]: p for p in bundle_run.json("bpf/bpftool-prog.json")}
    assert attached <= set(programs)
    prog_text = bundle_run.member("bpf/bpftool-prog.txt").decode()
    for prog_id in attached:
        assert re.search(rf"^{prog_id}: sched_cls ", prog_text, re.M), prog_id
    assert isinstance(bundle_run.json("bpf/bpftool-link.json"), list)
    assert "bpf/bpftool-link.txt" in bundle_run.members
    [net] = bundle_run.json(f"{folder}/bpftool-net.json")
    in_ns = {(t["devname"], t["kind"], t["id"]) for t in net["tc"]}
    expected = json.loads(bundle_run.ns.exec("bpftool", "-j", "net", "show").stdout)[0]["tc"]
    assert in_ns == {(t["devname"], t["kind"], t["id"]) for t in expected}
    assert {t[2] for t in in_ns} == attached
    assert "veth0(" in bundle_run.member(f"{folder}/bpftool-net.txt").decode()


def test_kernel_and_versions(bundle_run: BundleRun):
    release = os.uname().release
    assert release in bundle_run.member("kernel/uname.txt").decode()
    assert bundle_run.member("kernel/proc-version.txt") == Path("/proc/version").read_bytes()
    assert b"ID=" in bundle_run.member("kernel/os-release.txt")
    config = bundle_run.member("kernel/config.txt").decode()
    assert "CONFIG_BPF_SYSCALL=y" in config and "CONFIG_NET_CLS_BPF" in config
    assert len(config.splitlines()) == 20  # the source, then the 19 options
    sysctls = bundle_run.member("kernel/sysctl.txt").decode()
    jit = Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip()
    assert f"net.core.bpf_jit_enable = {jit}" in sysctls
    versions = bundle_run.member("versions.txt").decode()
    for expected in (f"tcprio {__version__}", "pyroute2 0.9.7", "prometheus_client ", "bcc "):
        assert expected in versions
    for tool in ("$ tc -V", "$ ip -V", "$ bpftool version", "$ nsenter --version"):
        assert tool in versions
    assert "iproute2" in versions and "util-linux" in versions and "libbpf" in versions


def test_datadog_settings_and_files(bundle_run: BundleRun):
    settings = bundle_run.json("datadog/settings.json")
    priority = settings["classifier_priority"]
    assert priority["value"] == 5 and "system-probe.yaml" in priority["source"]
    assert settings["network_enabled"]["value"] is True
    files = {entry["path"]: entry for entry in bundle_run.json("datadog/files.json")}
    for path in bundle_run.datadog_files:
        assert files[str(path)]["status"] == "included"
        assert files[str(path)]["archive_path"] in bundle_run.members


# --- redaction -------------------------------------------------------------------------------


def test_no_planted_secret_survives_anywhere(bundle_run: BundleRun):
    everything = gzip.decompress(bundle_run.archive)  # every member and every member name
    outputs = (bundle_run.proc.stdout + bundle_run.proc.stderr).encode()
    for label, secret in SECRETS.items():
        for path, data in bundle_run.members.items():
            assert secret.encode() not in data, f"{label} in {path}"
        assert secret.encode() not in everything, label
        assert secret.encode() not in outputs, label


def _datadog_member(run: BundleRun, name: str) -> str:
    files = {Path(e["path"]).name: e for e in run.json("datadog/files.json")}
    return run.member(files[name]["archive_path"]).decode()


def test_what_is_not_secret_stays_readable(bundle_run: BundleRun):
    system_probe = _datadog_member(bundle_run, "system-probe.yaml")
    for kept in (
        "api_key: ********",
        'app_key: "********"',
        "site: datadoghq.eu",
        "classifier_priority: 5",
        "classifier_handle: 0",
        "    token: ********",
        "http://proxyuser:********@proxy.example:3128",
        "sidecar_id: ********",
        "  password:\n    - ********\n    - ********\n  host: db.example",
    ):
        assert kept in system_probe, kept
    security_agent = _datadog_member(bundle_run, "security-agent.yaml")
    assert "- name: DD_APP_KEY\n    value: ********" in security_agent
    assert "- name: DD_SITE\n    value: datadoghq.eu" in security_agent
    assert "Authorization: Bearer ********" in security_agent
    environment = _datadog_member(bundle_run, "datadog.env")
    assert (
        environment == 'DD_API_KEY=********\nexport DD_APP_KEY="********"\nDD_SITE=datadoghq.eu\n'
    )
    tcprio_yaml = bundle_run.member("tcprio/tcprio.yaml").decode()
    assert f"password_file: {bundle_run.password_file}" in tcprio_yaml
    assert "username: prometheus" in tcprio_yaml and "log_level: debug" in tcprio_yaml
    effective = bundle_run.json("tcprio/effective-config.json")
    assert effective["config"]["basic_auth"] == {"username": "prometheus", "password": "********"}
    assert effective["config"]["log_level"] == "debug"


# --- read-only -------------------------------------------------------------------------------


def test_the_bundle_changes_nothing_on_the_node(bundle_run: BundleRun):
    assert bundle_run.after == bundle_run.before
    attached = attached_prog_ids(bundle_run.before)
    assert len(attached) == len(FILTERS)
    assert attached <= bundle_run.loaded_after


# --- failing collectors ----------------------------------------------------------------------


@pytest.fixture
def small_node(classifier_programs) -> Iterator[TestNetns]:
    with netns("bundlef") as ns:
        veth_in_one(ns, "veth0", "veth0p")
        add_clsact(ns, "veth0")
        attach_filter(ns, "veth0", E, 5, "term_ok")
        yield ns


def _collectors(members: dict[str, bytes]) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(members["manifest.json"])["collectors"]}


def test_a_missing_bpftool_is_recorded_and_the_bundle_still_written(small_node, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("tc", "ip", "nsenter", "journalctl", "uname"):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        assert found, f"{tool} is needed by this test"
        (bin_dir / tool).symlink_to(found)
    output = tmp_path / "b.tar.gz"
    proc = tcprio_bundle(
        "--yes", "--output", str(output), "--netns", small_node.name, "--no-agent-process",
        env={"PATH": str(bin_dir)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "! bpf failed: bpftool show prog" not in proc.stdout  # the shown command is real
    assert "! bpf failed: bpftool prog show: bpftool: command not found" in proc.stdout
    members = read_archive(output)
    error = members["errors/bpf.txt"].decode()
    assert "collector: bpf" in error and "bpftool: command not found" in error
    collectors = _collectors(members)
    assert not collectors["bpf"]["ok"] and "bpftool" in collectors["bpf"]["error"]
    assert not collectors["versions"]["ok"]
    ns_collector = next(c for c in collectors.values() if c["name"].startswith("netns-"))
    assert not ns_collector["ok"] and "bpftool net show" in ns_collector["error"]
    assert collectors["scan"]["ok"] and collectors["tcprio-config"]["ok"]
    folder = json.loads(members["namespaces.json"])[0]["archive_folder"]
    assert b"term_ok" in members[f"{folder}/tc-filter-veth0-egress.txt"]
    assert f"{folder}/bpftool-net.txt" not in members
    assert "bpf/bpftool-prog.txt" not in members
    effective = json.loads(members["tcprio/effective-config.json"])
    assert effective["file_status"].startswith("absent")  # absent is not an error
    assert (
        "bpftool version\n[failed: bpftool: command not found" in members["versions.txt"].decode()
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("listen_address: [unclosed\n", "not valid YAML"),
        ("log_level: loud\nno_such_setting: 1\n", "unknown key"),
        (None, "is a directory"),
    ],
)
def test_a_bad_tcprio_config_is_recorded(small_node, tmp_path, content, expected):
    config = tmp_path / "tcprio.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_text(content)
    output = tmp_path / "b.tar.gz"
    proc = tcprio_bundle(
        "--yes", "--output", str(output), "--netns", small_node.name, "--no-agent-process",
        "--config", str(config),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    members = read_archive(output)
    collectors = _collectors(members)
    assert not collectors["tcprio-config"]["ok"]
    assert expected in collectors["tcprio-config"]["error"]
    assert expected in members["errors/tcprio-config.txt"].decode()
    if content is not None:
        assert members["tcprio/tcprio.yaml"].decode() == content  # the file itself is kept
    assert collectors["scan"]["ok"] and "scan.json" in members


# --- the prompt ------------------------------------------------------------------------------


class Terminal:
    """The bundle run on a pseudo-terminal: stdin, stdout and stderr on its slave side."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tcprio", "bundle", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=CLEAN_ENV,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in {self.output!r}"
            if not self._read(left):
                break
        assert marker in self.output, self.output
        return self.output.decode()

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the other side is closed
            return False
        self.output += chunk
        return bool(chunk)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self._read(max(0.01, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                break
        status = self.proc.wait(timeout=timeout)
        os.close(self.master)
        return status, self.output.decode()


PROMPT = b"? [y/N] "


def test_the_prompt_lists_the_files_and_yes_writes(small_node, tmp_path):
    output = tmp_path / "b.tar.gz"
    term = Terminal("--output", str(output), "--netns", small_node.name, "--no-agent-process")
    shown = term.read_until(PROMPT)
    assert f"Write this bundle to {output}? [y/N] " in shown
    assert not output.exists()  # nothing written before the answer
    listed = re.findall(r"^ +([\d.]+ (?:B|KiB|MiB)) +(\S+)\r?$", shown, re.M)
    paths = [path for _, path in listed]
    assert "manifest.json" in paths and "scan.json" in paths and "versions.txt" in paths
    assert re.search(r"tcprio bundle: \d+ files, [\d.]+ (B|KiB|MiB) before compression", shown)
    os.write(term.master, b"y\n")
    status, text = term.finish()
    assert status == 0, text
    assert f"Bundle written: {output}" in text
    members = read_archive(output)
    assert sorted(members) == sorted(paths)
    sizes = dict((path, size) for size, path in listed)
    assert sizes["scan.json"] == human_size(len(members["scan.json"]))


@pytest.mark.parametrize("answer", [b"n\n", b"\n", b"\x04"])
def test_anything_but_yes_writes_nothing(small_node, tmp_path, answer):
    output = tmp_path / "b.tar.gz"
    term = Terminal("--output", str(output), "--netns", small_node.name, "--no-agent-process")
    term.read_until(PROMPT)
    os.write(term.master, answer)  # \x04: end of input (Ctrl-D)
    status, text = term.finish()
    assert status == 1, text
    assert "Not written." in text
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_at_the_prompt_writes_nothing(small_node, tmp_path):
    output = tmp_path / "b.tar.gz"
    term = Terminal("--output", str(output), "--netns", small_node.name, "--no-agent-process")
    term.read_until(PROMPT)
    os.kill(term.proc.pid, signal.SIGINT)
    status, text = term.finish()
    assert status == 130, text
    assert "Traceback" not in text and "nothing written" in text
    assert list(tmp_path.iterdir()) == []


def test_not_on_a_terminal_without_yes_refuses_with_exit_2(tmp_path):
    output = tmp_path / "b.tar.gz"
    proc = tcprio_bundle("--output", str(output), "--no-agent-process")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "tcprio bundle: not on a terminal and --yes not given: refusing to wait for a "
        "confirmation\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("/proc/tcprio-bundle.tar.gz", "cannot write /proc/tcprio-bundle.tar.gz"),
        ("/nonexistent-dir/b.tar.gz", "cannot write /nonexistent-dir/b.tar.gz"),
        ("/etc/hostname", "/etc/hostname already exists"),
    ],
)
def test_an_unwritable_output_is_one_line_and_exit_3(output, expected):
    before = Path(output).read_bytes() if Path(output).is_file() else None
    proc = tcprio_bundle("--yes", "--output", output, "--no-agent-process")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    if before is not None:
        assert Path(output).read_bytes() == before


def test_an_output_folder_gets_the_default_name(small_node, tmp_path):
    proc = tcprio_bundle(
        "--yes", "--output", str(tmp_path), "--netns", small_node.name, "--no-agent-process"
    )
    assert proc.returncode == 0, proc.stderr
    [written] = list(tmp_path.iterdir())
    assert re.fullmatch(r"tcprio-bundle-[\w.-]+-\d{8}T\d{6}Z\.tar\.gz", written.name)
    assert f"Bundle written: {written}\n" in proc.stdout
    assert "manifest.json" in read_archive(written)


# --- the pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("host", "host"),
        ("pod:coredns-5d78c9869d-abcde", "pod_coredns-5d78c9869d-abcde"),
        ("pid:1234 (containerd-shim)", "pid_1234_containerd-shim"),
        ("container:0123456789ab", "container_0123456789ab"),
        ("../../etc/passwd", "etc_passwd"),
        ("...", "_"),
        ("é", "_"),
    ],
)
def test_safe_names(name: str, safe: str):
    assert safe_name(name) == safe
    assert re.fullmatch(r"[A-Za-z0-9._-]+", safe_name(name))


def test_unique_names():
    taken: set[str] = set()
    assert [unique_name(n, taken) for n in ("a", "a", "b", "a")] == ["a", "a-2", "b", "a-3"]


def test_hooked_interfaces_from_the_qdisc_list():
    qdiscs = json.dumps(
        [
            {"kind": "noqueue", "dev": "lo"},
            {"kind": "clsact", "dev": "eth0"},
            {"kind": "ingress", "dev": "eth1"},
            {"kind": "mq", "dev": "eth2"},
        ]
    ).encode()
    links = b'[{"ifname": "lo"}, {"ifname": "eth0"}]'
    assert hooked_interfaces(qdiscs, links) == [
        ("eth0", ("ingress", "egress")),
        ("eth1", ("ingress",)),
    ]
    # Without a readable qdisc list: every interface, both directions.
    assert hooked_interfaces(b"", links) == [
        ("eth0", ("ingress", "egress")),
        ("lo", ("ingress", "egress")),
    ]


def test_kernel_config_from_a_gzipped_file_and_when_there_is_none(tmp_path):
    config = tmp_path / "config.gz"
    config.write_bytes(gzip.compress(b"CONFIG_BPF=y\n# CONFIG_KPROBES is not set\nCONFIG_X=m\n"))
    text = kernel_config_text(("CONFIG_BPF", "CONFIG_KPROBES", "CONFIG_NETKIT"), [config])
    assert text == (
        f"# from {config}\nCONFIG_BPF=y\n# CONFIG_KPROBES is not set\n"
        "# CONFIG_NETKIT: not in this configuration\n"
    )
    missing = [tmp_path / "config-6.18", tmp_path / "nope.gz"]
    with pytest.raises(FileNotFoundError) as info:
        kernel_config_text(sources=missing)
    assert str(missing[0]) in str(info.value) and str(missing[1]) in str(info.value)


def test_a_namespace_gone_before_it_is_read_is_not_an_error():
    with netns("bundleg") as ns:
        [found] = [n for n in discover_namespaces() if n.name == ns.name]
    # `ns` is deleted now: the collector finds it gone, like the scan does.
    members, outcome = run_collector(netns_collector(found, "namespaces/gone"))
    assert outcome.error is None
    paths = {m.path: m.data for m in members}
    assert set(paths) == {"namespaces/gone/namespace.json", "namespaces/gone/vanished.txt"}
    assert paths["namespaces/gone/vanished.txt"].startswith(b"vanished before it could be read")


def test_the_guard_records_an_exception_and_keeps_partial_files():
    def boom() -> list[Item]:
        raise RuntimeError("the collector broke")

    def partial() -> list[Item]:
        raise CollectorFailed("one command failed", [Item("part/a.txt", b"kept")])

    members, outcome = run_collector(Collector("boom", boom))
    assert outcome.error == "RuntimeError: the collector broke"
    [error] = members
    assert error.path == "errors/boom.txt"
    assert b"RuntimeError: the collector broke" in error.data and b"Traceback" in error.data
    members, outcome = run_collector(Collector("partial", partial))
    assert outcome.error == "one command failed"
    assert [m.path for m in members] == ["part/a.txt", "errors/partial.txt"]


def test_a_running_system_probe_config_is_read_through_its_root(small_node, tmp_path):
    """Datadog's system-probe (a copy of /bin/sh waiting on stdin, in an install with its
    version manifest, run by root) started with --config: its own file is included (redacted)
    and its settings are the truth."""
    config = tmp_path / "conf" / "sp.yaml"
    config.parent.mkdir()
    config.write_text(
        f"api_key: {SECRETS['api_key']}\n"
        "event_monitoring_config:\n  network:\n    classifier_priority: 7\n"
    )
    install = tmp_path / "opt" / "datadog-agent"
    exe = install / "embedded" / "bin" / "system-probe"
    exe.parent.mkdir(parents=True)
    (install / "version-manifest.json").write_text(json.dumps({"build_version": "7.70.0"}))
    shutil.copy2("/bin/sh", exe)
    script = tmp_path / "wait.sh"
    script.write_text("read _line\n")
    agent = subprocess.Popen(
        [str(exe), str(script), f"--config={config}"], env=CLEAN_ENV, stdin=subprocess.PIPE
    )
    try:
        output = tmp_path / "b.tar.gz"
        proc = tcprio_bundle("--yes", "--output", str(output), "--netns", small_node.name)
    finally:
        agent.kill()
        agent.wait()
    assert proc.returncode == 0, proc.stderr
    members = read_archive(output)
    files = json.loads(members["datadog/files.json"])
    [entry] = [e for e in files if e.get("read_through") == f"/proc/{agent.pid}/root"]
    assert entry["status"] == "included" and entry["path"] == str(config)
    assert entry["archive_path"].startswith(f"datadog/process-{agent.pid}/")
    text = members[entry["archive_path"]].decode()
    assert "api_key: ********" in text and "classifier_priority: 7" in text
    settings = json.loads(members["datadog/settings.json"])
    assert settings["classifier_priority"]["value"] == 7
    assert f"process {agent.pid}" in settings["classifier_priority"]["source"]
    assert all(SECRETS["api_key"].encode() not in data for data in members.values())


def test_the_final_pass_redacts_every_member_whatever_its_collector():
    members = [
        Member("logs/journal.txt", b"tcprio[1]: connecting with password=hunter2-journal\n", "x"),
        Member("bpf/x.json", b'[{"id":1,"token":"tok-json"}]\n', "x"),
        Member("a.txt", b"ok\n", "x", command="run --api-key=cmd-secret", stderr="token: err"),
    ]
    redacted = final_redaction(members)
    assert redacted[0].data == b"tcprio[1]: connecting with password=********\n"
    assert json.loads(redacted[1].data) == [{"id": 1, "token": "********"}]
    assert redacted[2].command == "run --api-key=********"
    assert redacted[2].stderr == "token: ********"
    assert [m.path for m in redacted] == [m.path for m in members]
