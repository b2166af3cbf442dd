"""Bad input, everywhere tcprio reads it: the daemon's configuration, the Datadog files, the
environment, a system-probe's /proc entries and the namespaces' /proc entries.

Each problem is one line naming the file or variable, the key, the value (bounded, escaped) and
what is allowed; nothing raises; a fifo never blocks; a symlink never leads out of a process's
root; and the daemon keeps its last good state through a series of bad reloads.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio import datadog, inputs
from tcprio.kernel import datadog_agent, files
from tcprio.kernel.namespaces import discover_namespaces
from tcprio.model import Direction
from tcprio.service.config import MAX_CONFIG_BYTES, ConfigError, load_config
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import daemon as daemon_ctx
from tests.test_daemon import find, write_config
from tests.timing import HANG_GUARD_S

PRIO = "network.classifier_priority"
NEW_PRIO = f"event_monitoring_config.{PRIO}"
OLD_PRIO = f"runtime_security_config.{PRIO}"
EM_PRIO_ENV = "DD_EVENT_MONITORING_CONFIG_NETWORK_CLASSIFIER_PRIORITY"
RSC_PRIO_ENV = "DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY"

BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
    "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
    "h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
    "i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n"
)  # 9**9 strings once expanded: a repr of it never ends


def one_line_each(lines: object) -> None:
    for line in lines:  # type: ignore[attr-defined]
        assert isinstance(line, str) and line
        assert line.isprintable(), repr(line)  # no \n, \r, escape sequence, U+2028...
        assert len(line) < 600, line


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    one_line_each(info.value.problems)
    return info.value.problems


# --- the daemon's configuration: values --------------------------------------------------------

SECONDS = "is not a number of seconds in 5..86400"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("resync_interval_seconds: .nan\n", f"resync_interval_seconds: nan {SECONDS}"),
        ("resync_interval_seconds: .inf\n", f"resync_interval_seconds: inf {SECONDS}"),
        ("resync_interval_seconds: -.inf\n", f"resync_interval_seconds: -inf {SECONDS}"),
        (
            "resync_interval_seconds: 1000000000000000000000000000000\n",
            f"resync_interval_seconds: 1000000000000000000000000000000 {SECONDS}",
        ),
        ("resync_interval_seconds: -60\n", f"resync_interval_seconds: -60 {SECONDS}"),
        ("resync_interval_seconds: 1e3\n", f"resync_interval_seconds: '1e3' {SECONDS}"),
        ("resync_interval_seconds: yes\n", f"resync_interval_seconds: True {SECONDS}"),
        ("resync_interval_seconds: [60]\n", f"resync_interval_seconds: [60] {SECONDS}"),
        ("resync_interval_seconds: {a: 1}\n", f"resync_interval_seconds: {{'a': 1}} {SECONDS}"),
        ("live_probe: 1\n", "live_probe: 1 is not true or false"),
        ("live_probe: 'true'\n", "live_probe: 'true' is not true or false"),
        (
            "observers:\n  - name: x\n    programs: [a]\n    priority: 5.0\n",
            "observers[0].priority: 5.0 is not an integer in 1..65535",
        ),
        (
            "observers:\n  - name: x\n    programs: [a]\n    priority: 0x10000\n",
            "observers[0].priority: 65536 is not an integer in 1..65535",
        ),
        (
            "observers:\n  - name: x\n    programs: [a]\n    priority: true\n",
            "observers[0].priority: True is not an integer in 1..65535",
        ),
        ("observers: [just-a-name]\n", "observers[0]: 'just-a-name' is not a mapping"),
        ("namespaces: [a]\n", "namespaces: ['a'] is not a mapping"),
        ("namespaces:\n  include: [a, '']\n", "include: ['a', ''] is not a list of non-empty"),
        ("namespaces:\n  include: [a, 1]\n", "include: ['a', 1] is not a list of non-empty"),
        ("listen_address: '127.0.0.1:0x50'\n", "listen_address: '127.0.0.1:0x50' is not HOST"),
        ("listen_address: '127.0.0.1:+80'\n", "listen_address: '127.0.0.1:+80' is not HOST"),
        ("listen_address: 'a b:80'\n", "listen_address: 'a b:80' is not HOST:PORT"),
        ('listen_address: "a\\nb:80"\n', "listen_address: 'a\\nb:80' is not HOST:PORT"),
        ('log_level: "info\\nFAKE"\n', "log_level: 'info\\nFAKE' is not one of debug"),
        ('log_level: "\\e[31mred"\n', "log_level: '\\x1b[31mred' is not one of debug"),
        ('log_level: "a\\Lb"\n', "log_level: 'a\\u2028b' is not one of debug"),
        ('"bad\\nkey": 1\n', "bad\\nkey: unknown key (allowed: "),
        ("1: 1\n", "1: unknown key (allowed: "),
        (
            'datadog:\n  config_files: ["/etc/a\\0b"]\n',
            "datadog.config_files: ['/etc/a\\x00b'] is not a list of paths without NUL bytes",
        ),
    ],
)
def test_bad_values_are_one_line_with_file_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "tcprio.yaml"
    path.write_text(text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: ")
    assert expected in found[0], found[0]


def test_a_huge_value_is_shown_bounded(tmp_path: Path) -> None:
    path = tmp_path / "tcprio.yaml"
    path.write_text(f"log_level: '{'x' * 500_000}'\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: log_level: 'xxxx")
    assert "xxx...xxx" in line and "xxx' is not one of debug, info, warning, error" in line
    assert len(line) < len(str(path)) + 150


@pytest.mark.parametrize("key", ["listen_address", "log_level", "resync_interval_seconds"])
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, key: str) -> None:
    path = tmp_path / "tcprio.yaml"
    path.write_text(BOMB.replace("i: &i", f"{key}: &i"))
    start = time.monotonic()
    found = problems(path)
    assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
    assert any(f"{key}: [[[" in line for line in found), found


# --- the daemon's configuration: the file itself -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[" * 20000 + "]" * 20000, "not valid YAML: nested too deeply"),
        ("a: !!python/object/apply:os.system [true]\n", "not valid YAML at line 1, column 4: "),
        ("log_level: !!int abc\n", "not valid YAML at line 1: a value cannot be read"),
        ("log_level: !!float abc\n", "not valid YAML at line 1: a value cannot be read"),
        ("log_level: !!timestamp abc\n", "not valid YAML at line 1: a value cannot be read"),
        ("debounce_seconds: " + "1" * 5000 + "\n", "not valid YAML at line 1: a value cannot"),
        ("a: 1\n\tb: 2\n", "not valid YAML at line 2, column 1: "),
        (
            "log_level: info\nlive_probe: true\nlog_level: debug\n",
            "'log_level': set again at line 3",
        ),
    ],
)
def test_files_the_yaml_loader_refuses_are_one_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "tcprio.yaml"
    path.write_text(text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: ") and expected in found[0], found[0]


def special_file(tmp_path: Path, kind: str, name: str = "tcprio.yaml") -> Path:
    """A config path that is something else than a regular file on disk."""
    path = tmp_path / name
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere.yaml")
    elif kind == "loop":
        path.symlink_to(tmp_path / f"other-{name}")
        (tmp_path / f"other-{name}").symlink_to(path)
    elif kind.startswith("/"):  # a symlink to a device or a pseudo file
        path.symlink_to(kind)
    elif kind == "huge":
        path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    elif kind == "binary":
        path.write_bytes(b"log_level: info\n\xff\xfe\n")
    elif kind == "nul":
        path.write_bytes(b"log_level: info\x00\n")
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("directory", "is not a regular file"),
        ("fifo", "is not a regular file"),
        ("socket", "is not a regular file"),
        ("/dev/zero", "is not a regular file"),
        ("/dev/urandom", "is not a regular file"),
        ("/dev/null", "is not a regular file"),
        ("/proc/self/mem", "is on proc, a pseudo file system; only regular files on disk"),
        ("/proc/self/environ", "is on proc, a pseudo file system; only regular files on disk"),
        ("/sys/kernel/mm/transparent_hugepage/enabled", "is on sysfs, a pseudo file system"),
        ("dangling", "cannot read: No such file or directory"),
        ("loop", "more than 40 symbolic links (a loop?)"),
        ("huge", f"is {MAX_CONFIG_BYTES + 1} bytes; at most {MAX_CONFIG_BYTES} allowed"),
        ("binary", "is not valid UTF-8 (byte 16)"),
        ("nul", "not valid YAML at line 1, column 16: "),
    ],
)
def test_files_that_cannot_be_read_are_one_line_and_never_block(
    tmp_path: Path, kind: str, expected: str
) -> None:
    if kind.startswith("/") and not os.path.exists(kind):
        pytest.skip(f"this machine has no {kind}")
    path = special_file(tmp_path, kind)
    start = time.monotonic()
    found = problems(path)
    assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
    assert found == [f"{path}: {expected}"] or (
        len(found) == 1 and found[0].startswith(f"{path}: {expected}")
    ), found


def test_a_dangling_symlink_is_not_taken_for_an_absent_file(tmp_path: Path) -> None:
    path = special_file(tmp_path, "dangling")
    with pytest.raises(ConfigError, match="No such file or directory"):
        load_config(path, missing_ok=True)


def test_the_path_itself_is_shown_escaped(tmp_path: Path) -> None:
    path = tmp_path / "evil\nFAKE LINE.yaml"
    path.write_text("log_level: loud\n")
    [line] = problems(path)
    assert line.startswith(f"{tmp_path}/evil\\nFAKE LINE.yaml: log_level: 'loud' is not one of")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("directory", "is not a readable file (a directory, not a file)"),
        ("fifo", "is not a readable file (not a regular file (fifo, socket or device))"),
        ("/dev/zero", "is not a readable file (not a regular file (fifo, socket or device))"),
        ("/proc/self/mem", "is not a readable file (on proc, a pseudo file system;"),
        ("huge", f"is not a readable file ({MAX_CONFIG_BYTES + 1} bytes, more than the"),
    ],
)
def test_password_and_tls_files_follow_the_same_policy(
    tmp_path: Path, target: str, expected: str
) -> None:
    secret = special_file(tmp_path, target, "secret")
    cert = tmp_path / "c.pem"
    cert.write_text("cert")
    for section in (
        f"basic_auth:\n  username: prom\n  password_file: {secret}\n",
        f"tls:\n  cert_file: {cert}\n  key_file: {secret}\n",
    ):
        path = tmp_path / "tcprio.yaml"
        path.write_text(section)
        start = time.monotonic()
        [line] = problems(path)
        assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
        key = "basic_auth.password_file" if "basic" in section else "tls.key_file"
        assert line.startswith(f"{path}: {key}: '{secret}' {expected}"), line


# --- Datadog files ------------------------------------------------------------------------------


def resolve(files: list[Path], environ: dict[str, str] | None = None):
    s = datadog.resolve_settings(
        files=files,
        environ=environ or {},
        scan_processes=False,
        host_root=Path("/nonexistent-root"),
    )
    one_line_each(s.errors)
    one_line_each(s.notes)
    return s


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("socket", "is not a regular file (fifo, socket or device)"),
        ("/dev/zero", "is not a regular file (fifo, socket or device)"),
        ("/proc/self/environ", "is on proc, a pseudo file system"),
        ("binary", "is not valid UTF-8 (byte 16)"),
        ("[" * 20000, "malformed YAML: nested too deeply"),
        (f"{OLD_PRIO}: !!int abc\n", "malformed YAML: a value cannot be read"),
        (f"{OLD_PRIO}: " + "9" * 5000 + "\n", "malformed YAML: a value cannot be read"),
        ("a: !!python/name:os.system ''\n", "malformed YAML: could not determine a constructor"),
    ],
)
def test_datadog_files_that_cannot_be_used_are_one_error_each(
    tmp_path: Path, kind: str, expected: str
) -> None:
    if kind.startswith("/") and not os.path.exists(kind):
        pytest.skip(f"this machine has no {kind}")
    if kind in ("socket", "binary") or kind.startswith("/"):
        path = special_file(tmp_path, kind)
        path = path.rename(tmp_path / "system-probe.yaml")
    else:
        path = tmp_path / "system-probe.yaml"
        path.write_text(kind)
    s = resolve([path], {EM_PRIO_ENV: "4"})
    assert len(s.errors) == 1, s.errors
    assert s.errors[0].startswith(f"{path}: {expected}"), s.errors[0]
    assert s.errors[0].endswith("; ignored")
    assert s.classifier_priority.value == 4  # the next source still counts


def test_a_datadog_alias_bomb_value_is_shown_bounded(tmp_path: Path) -> None:
    path = tmp_path / "system-probe.yaml"
    path.write_text(BOMB.replace("i: &i", "runtime_security_config.network.classifier_priority:"))
    start = time.monotonic()
    s = resolve([path])
    assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
    [line] = s.errors
    assert line.startswith(f"{path}: {OLD_PRIO}: [[[")
    assert line.endswith("is not an integer in 1..65535; ignored")


def test_duplicate_datadog_keys_are_noted_and_the_last_wins(tmp_path: Path) -> None:
    path = tmp_path / "system-probe.yaml"
    path.write_text(f"{OLD_PRIO}: 3\n{OLD_PRIO}: 4\n")
    s = resolve([path])
    assert s.classifier_priority.value == 4
    assert f"{path}: duplicate key '{OLD_PRIO}' at line 2; the last one is used" in s.notes


def test_a_nul_byte_in_a_configured_path_is_one_error(tmp_path: Path) -> None:
    s = resolve([Path(f"{tmp_path}/a\0b.yaml")])
    assert s.errors == (f"{tmp_path}/a\\x00b.yaml: cannot be read: embedded null byte; ignored",)


# --- environment variables -------------------------------------------------------------------

NOT_INT = "is not an integer in 1..65535"


@pytest.mark.parametrize(
    ("raw", "shown", "allowed"),
    [
        (" 5 ", "' 5 '", NOT_INT),
        ("5.0", "'5.0'", NOT_INT),
        ("0x10", "'0x10'", NOT_INT),
        ("1e3", "'1e3'", NOT_INT),
        ("abc", "'abc'", NOT_INT),
        ("-1", "'-1'", f"{NOT_INT} (system-probe would wrap it to 16 bits: 65535)"),
        ("65536", "'65536'", f"{NOT_INT} (system-probe would wrap it to 16 bits: 0)"),
        ("0", "'0'", NOT_INT),
        ("1" * 5000, "'" + "1" * 30, NOT_INT),
        ("5\nFAKE: injected", "'5\\nFAKE: injected'", NOT_INT),
        ("\x1b[2J5", "'\\x1b[2J5'", NOT_INT),
        ("5\u2028x", "'5\\u2028x'", NOT_INT),
        ("\udcff5", "'\\udcff5'", NOT_INT),
    ],
)
def test_junk_in_an_environment_variable_is_one_line_and_falls_back(
    tmp_path: Path, raw: str, shown: str, allowed: str
) -> None:
    s = resolve([tmp_path / "none.yaml"], {EM_PRIO_ENV: raw, RSC_PRIO_ENV: "8"})
    [line] = s.errors
    prefix = f"environment variable {EM_PRIO_ENV}: {NEW_PRIO}: {shown}"
    assert line.startswith(prefix), line
    assert line.endswith(f"{allowed}; ignored"), line
    assert (
        s.classifier_priority.value == 8 and s.classifier_priority.source == f"env:{RSC_PRIO_ENV}"
    )


def test_an_empty_variable_is_unset_as_for_the_agent(tmp_path: Path) -> None:
    s = resolve([tmp_path / "none.yaml"], {EM_PRIO_ENV: "", RSC_PRIO_ENV: ""})
    assert s.errors == () and s.classifier_priority.source == "default"


# --- a /proc that vanishes or lies: system-probe ------------------------------------------------


def fake_proc(tmp_path: Path, pid: int, files: dict[str, bytes | str | None]) -> Path:
    """A fake /proc/<pid>: bytes are file contents, a str starting with '->' a symlink,
    'fifo' a fifo, None a directory."""
    proc_dir = tmp_path / "proc" / str(pid)
    proc_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = proc_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif content == "fifo":
            os.mkfifo(path)
        elif isinstance(content, str) and content.startswith("->"):
            path.symlink_to(content[2:])
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp_path / "proc"


def accept(proc: datadog_agent.AgentProcess) -> datadog_agent.Verification:
    """These fake /proc trees are about reading junk safely: take every candidate as Datadog's
    (the real verification is tested in test_datadog_config.py)."""
    return datadog_agent.Verification(proc, True, "accepted by the test")


def probe_settings(proc_root: Path, local: Path | None = None, environ=None, verify=accept):
    s = datadog.resolve_settings(
        files=[local] if local else [],
        environ=environ or {},
        proc_root=proc_root,
        host_root=Path("/nonexistent-root"),
        verify=verify,
    )
    one_line_each(s.errors)
    one_line_each(s.notes)
    return s


def test_a_container_symlink_never_leads_to_a_host_file(tmp_path: Path) -> None:
    """The process's /etc/datadog-agent/system-probe.yaml is a link to an absolute path that
    exists on the host: it must be resolved in the process's root, where it does not exist."""
    host_secret = tmp_path / "host" / "system-probe.yaml"
    host_secret.parent.mkdir()
    host_secret.write_text(f"{OLD_PRIO}: 3\n")
    root = tmp_path / "root"
    (root / "etc" / "datadog-agent").mkdir(parents=True)
    (root / "etc" / "datadog-agent" / "system-probe.yaml").symlink_to(host_secret)
    (root / "etc" / "up.yaml").symlink_to("../../../../../../../../" + str(host_secret))
    proc = fake_proc(tmp_path, 4242, {"comm": "system-probe\n", "cmdline": b"system-probe\0"})
    (proc / "4242" / "root").symlink_to(root)
    s = probe_settings(proc)
    assert s.classifier_priority.source == "default", s
    assert any("not found; skipped" in n for n in s.notes), s.notes
    # the same through `..`
    (proc / "4242" / "cmdline").write_bytes(b"system-probe\0--config=/etc/up.yaml\0")
    s = probe_settings(proc)
    assert s.classifier_priority.source == "default", s


def test_openat2_refuses_a_link_swapped_in_after_resolution(tmp_path: Path) -> None:
    """What RESOLVE_IN_ROOT buys over resolving by hand: a directory of the path replaced by a
    link to the host between the check and the open still resolves inside the root."""
    host = tmp_path / "host" / "etc"
    host.mkdir(parents=True)
    (host / "sp.yaml").write_text("x: 1\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "sp.yaml").write_text("y: 2\n")
    assert files.read_small_file(Path("/etc/sp.yaml"), root) == "y: 2\n"
    (root / "etc" / "sp.yaml").unlink()
    (root / "etc").rmdir()
    (root / "etc").symlink_to(host)  # absolute: must restart at `root`
    with pytest.raises(inputs.ConfigReadError) as info:
        files.read_small_file(Path("/etc/sp.yaml"), root)
    assert info.value.kind == "missing"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"environ": "fifo"}, "environment cannot be read: not a regular file; ignored"),
        ({"environ": "->/dev/zero"}, "environment cannot be read: not a regular file; ignored"),
        ({"environ": None}, "environment cannot be read: not a regular file; ignored"),
        ({"environ": b"A=1\0" * (1 << 20) + b"B=2\0"},
         f"environment is more than {datadog_agent.MAX_ENVIRON_BYTES} bytes; "
         "only the 1048576 variables"),
        ({"root/etc/datadog-agent/system-probe.yaml": "fifo"},
         "/root/etc/datadog-agent/system-probe.yaml: is not a regular file"),
        ({"root/etc/datadog-agent/system-probe.yaml": "->/dev/zero"},
         "/root/etc/datadog-agent/system-probe.yaml: not found; skipped"),
        ({"root/etc/datadog-agent/system-probe.yaml": f"{OLD_PRIO}: [junk\n"},
         "/root/etc/datadog-agent/system-probe.yaml: malformed YAML"),
        ({"root/etc/datadog-agent/system-probe.yaml": f"{OLD_PRIO}: \"7\\n8\"\n"},
         f"/root/etc/datadog-agent/system-probe.yaml: {OLD_PRIO}: '7\\n8' is not an integer"),
        ({"cmdline": b"system-probe\0--config=/etc/evil\nFAKE.yaml\0",
          "root/etc/evil\nFAKE.yaml": f"{OLD_PRIO}: x\n"},
         f"/root/etc/evil\\nFAKE.yaml: {OLD_PRIO}: 'x' is not an integer"),
        ({"root/opt/datadog-agent/version-manifest.json": "[" * 100000},
         None),
    ],
)  # fmt: skip
def test_a_system_probe_with_junk_is_one_line_each(
    tmp_path: Path, files: dict, expected: str | None
) -> None:
    base = {"comm": "system-probe\n", "cmdline": b"system-probe\0", "root": None}
    base.update(files)
    if "root" in base and any(k.startswith("root/") for k in files):
        base.pop("root")
    proc = fake_proc(tmp_path, 77, {"environ": b"", **base})
    start = time.monotonic()
    s = probe_settings(proc, environ={EM_PRIO_ENV: "3"})
    assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
    assert any("source of truth: 1 running system-probe" in n for n in s.notes)
    if expected is None:
        assert s.errors == () and s.agent_version is None
        return
    lines = [*s.errors, *s.notes]
    assert any(
        expected in line and line.startswith("process 77 (system-probe) ") for line in lines
    ), lines


@pytest.mark.parametrize(
    "files",
    [
        {"comm": b"", "cmdline": b""},  # a kernel thread, or a zombie
        {"comm": "fifo", "cmdline": "fifo"},
        {"comm": "->/dev/urandom"},
        {"comm": b"\xff\xfe" * 40000},
        {"comm": "system-probe\n"},  # gone before its cmdline was read
    ],
)
def test_processes_that_are_not_or_no_longer_system_probe_are_skipped(
    tmp_path: Path, files: dict
) -> None:
    proc = fake_proc(tmp_path, 55, files)
    (proc / "self").mkdir()  # not a pid
    (proc / "\u0663").mkdir()  # an Arabic-Indic digit: str.isdigit() says yes, int() says no
    local = tmp_path / "system-probe.yaml"
    local.write_text(f"{OLD_PRIO}: 9\n")
    start = time.monotonic()
    s = probe_settings(proc, local)
    assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
    assert s.classifier_priority.value == 9 and s.errors == ()
    assert any("no verified system-probe running" in n for n in s.notes)


def test_an_unverified_system_probe_with_junk_is_one_note_and_never_used(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path, 66, {"comm": "system-probe\n", "cmdline": b"system-probe\0", "environ": "fifo"}
    )
    local = tmp_path / "system-probe.yaml"
    local.write_text(f"{OLD_PRIO}: 9\n")
    s = probe_settings(proc, local, environ={EM_PRIO_ENV: "3"}, verify=datadog_agent.verify_process)
    assert s.classifier_priority.value == 9 and s.errors == () and s.found == "files"
    (line,) = [n for n in s.notes if n.startswith("process 66 (system-probe) not taken")]
    assert "its executable cannot be read" in line and "settings are not used" in line


def test_a_system_probe_that_exits_while_being_read_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = fake_proc(tmp_path, 88, {"comm": "system-probe\n", "cmdline": b"system-probe\0"})
    local = tmp_path / "system-probe.yaml"
    local.write_text(f"{OLD_PRIO}: 9\n")
    real_environ = datadog.read_environ

    def vanish(p, log):  # the process exits right after it was found
        for child in sorted(p.proc_dir.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() and not child.is_symlink() else child.unlink()
        p.proc_dir.rmdir()
        return real_environ(p, log)

    monkeypatch.setattr(datadog, "read_environ", vanish)
    s = probe_settings(proc, local)
    assert s.errors == ()
    assert s.classifier_priority.value == 9
    assert any("no verified system-probe running" in n for n in s.notes)


# --- a /proc that lies: namespaces ---------------------------------------------------------------


def test_namespace_discovery_ignores_what_is_not_a_namespace(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_proc(tmp_path, 1, {"ns/net": b"not a namespace"})
    fake_proc(tmp_path, 10, {"ns/net": None, "comm": "fifo"})
    fake_proc(tmp_path, 11, {"ns/net": "fifo", "cgroup": "fifo"})
    fake_proc(tmp_path, 12, {"ns/net": "->/dev/zero"})
    fake_proc(tmp_path, 13, {"comm": b"x"})  # no ns at all: gone
    (proc / "\u0663").mkdir()
    # a real one, whose comm, cgroup and environ lie
    fake_proc(tmp_path, 20, {
        "ns/net": f"->/proc/{os.getpid()}/ns/net", "comm": "fifo", "cgroup": "->/dev/urandom",
        "environ": "fifo",
    })  # fmt: skip
    fake_proc(tmp_path, 21, {
        "ns/net": f"->/proc/{os.getpid()}/ns/net", "comm": b"evil\nname\x1b[0m\n",
    })  # fmt: skip
    start = time.monotonic()
    found = discover_namespaces(proc=proc, named_dirs=[])
    assert time.monotonic() - start < HANG_GUARD_S  # a hang, not a speed requirement
    mine = os.stat(f"/proc/{os.getpid()}/ns/net")
    assert len(found) == 1, found  # pid 21 is in the same namespace
    ns = found[0]
    assert (ns.dev, ns.inode) == (mine.st_dev, mine.st_ino)
    assert (ns.name, ns.pid, ns.container, ns.pod) == ("pid:20", 20, None, None)


def test_a_comm_with_a_newline_gives_a_one_line_namespace_name(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_proc(tmp_path, 1, {"ns/net": b"not a namespace"})
    (proc / "self").mkdir()
    (proc / "self" / "ns").mkdir()
    (proc / "self" / "ns" / "net").write_bytes(b"nope")
    fake_proc(tmp_path, 21, {
        "ns/net": f"->/proc/{os.getpid()}/ns/net", "comm": b"evil\nname\x1b[0m\n",
    })  # fmt: skip
    [ns] = discover_namespaces(proc=proc, named_dirs=[])
    assert ns.name == "pid:21 (evil\\nname\\x1b[0m)"


# --- the daemon keeps its last good state ----------------------------------------------------


def bad_configs(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(what, the line the daemon must log) after the config file was made bad that way."""
    config = tmp_path / "tcprio.yaml"
    config.write_text("log_level: [broken\n")
    yield "malformed", "not valid YAML at line"
    config.write_text("resync_interval_seconds: '30'\n")
    yield "wrong type", "resync_interval_seconds: '30' is not a number of seconds in 5..86400"
    config.unlink()
    os.mkfifo(config)
    yield "fifo", f"{config}: is not a regular file"
    config.unlink()
    config.symlink_to("/dev/zero")
    yield "device", f"{config}: is not a regular file"
    config.unlink()
    config.write_bytes(b"#" * (MAX_CONFIG_BYTES + 5))
    yield "huge", f"is {MAX_CONFIG_BYTES + 5} bytes; at most {MAX_CONFIG_BYTES} allowed"
    config.write_text("[" * 50000)
    yield "deep", "not valid YAML: nested too deeply"


def test_the_daemon_keeps_its_last_good_state_through_bad_reloads(tmp_path, classifier_programs):
    def steady(samples) -> dict:
        """Everything but the counters a reload or a scrape moves."""
        moving = ("config_", "scrape", "scans_total", "analysis_", "last_analysis", "process_",
                  "python_", "classifier_run", "tcprio_live")  # fmt: skip
        return {k: v for k, v in samples.items() if not any(m in k[0] for m in moving)}

    with daemon_ctx(tmp_path) as running, netns("d-bad") as ns:
        veth_in_one(ns, "b0", "b1")
        add_clsact(ns, "b0")
        attach_filter(ns, "b0", Direction.EGRESS, 10, "classifier_egress",
                      filter_name="classifier/egress_1_2")  # fmt: skip
        attach_filter(ns, "b0", Direction.EGRESS, 1, "term_ok")
        where = {"netns": ns.name, "interface": "b0", "direction": "egress"}
        before = running.wait_for(
            "the critical conflict",
            lambda s: find(s, "tcprio_conflict", **where, severity="critical") == [1.0],
        )
        assert len(find(before, "tcprio_classifier_info", **where)) == 2
        assert find(before, "tcprio_config_last_reload_successful") == [1.0]
        for failures, (what, logged) in enumerate(bad_configs(tmp_path), start=1):
            running.proc.send_signal(signal.SIGHUP)
            samples = running.wait_for(
                f"a failed reload ({what})",
                lambda s, n=failures: (
                    find(s, "tcprio_config_reloads_total", result="failure") == [float(n)]
                ),
            )
            assert running.proc.poll() is None, what
            assert find(samples, "tcprio_config_last_reload_successful") == [0.0], what
            assert steady(samples) == steady(before), what
            rejected = [
                line for line in running.log().splitlines() if "configuration rejected" in line
            ]
            assert len(rejected) == failures, rejected  # one line per problem, per reload
            assert logged in rejected[-1], (what, rejected[-1])
        assert "Traceback" not in running.log() and '"step failed"' not in running.log()
        assert running.get("/readyz")[0] == 200
        config = tmp_path / "tcprio.yaml"
        config.unlink()
        write_config(config, running.port)
        running.proc.send_signal(signal.SIGHUP)
        samples = running.wait_for(
            "a good reload",
            lambda s: find(s, "tcprio_config_reloads_total", result="success") == [1.0],
        )
        assert find(samples, "tcprio_config_last_reload_successful") == [1.0]
        assert find(samples, "tcprio_conflict", **where, severity="critical") == [1.0]
