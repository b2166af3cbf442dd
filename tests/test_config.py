"""The daemon's configuration file: defaults, every key, and one clear line per bad input."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tcprio.service.config import (
    ConfigError,
    DaemonConfig,
    load_config,
    parse_listen_address,
    with_overrides,
)

FULL = """
listen_address: "127.0.0.1:9999"
resync_interval_seconds: 60
proc_sweep_interval_seconds: 2.5
tcx_poll_interval_seconds: 0.5
debounce_seconds: 0.1
datadog:
  config_files: [/etc/dd/system-probe.yaml]
  scan_processes: false
namespaces:
  include: ["pod:*", "host"]
  exclude: ["pod:kube-system-*"]
observers:
  - name: retina
    programs: ["endpoint_*"]
    priority: 1
  - name: mine
    filters: ["my-observer*"]
live_probe: false
log_level: debug
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tcprio.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_absent_file_gives_the_defaults_when_allowed(tmp_path):
    config = load_config(tmp_path / "none.yaml", missing_ok=True)
    assert config.listen_address == "0.0.0.0:9842"
    assert config.resync_interval == 300 and config.include_namespaces == ("*",)
    assert "absent" in config.source
    assert problems(tmp_path / "none.yaml") == [
        f"{tmp_path}/none.yaml: cannot read: No such file or directory"
    ]


def test_empty_file_is_all_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.listen_port == 9842 and config.observers == ()


def test_every_key_is_read(tmp_path):
    config = load_config(write(tmp_path, FULL))
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9999)
    assert config.resync_interval == 60 and config.proc_sweep_interval == 2.5
    assert config.tcx_poll_interval == 0.5 and config.debounce == 0.1
    assert config.datadog_files == (Path("/etc/dd/system-probe.yaml"),)
    assert config.scan_datadog_processes is False
    assert config.include_namespaces == ("pod:*", "host")
    assert config.exclude_namespaces == ("pod:kube-system-*",)
    assert [(o.name, o.programs, o.filters, o.priority) for o in config.observers] == [
        ("retina", ("endpoint_*",), (), 1),
        ("mine", (), ("my-observer*",), None),
    ]
    assert config.live_probe is False and config.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen_address: 9842\n", "listen_address: 9842 is not HOST:PORT"),
        ("listen_address: 'host:99999'\n", "listen_address: 'host:99999' is not HOST:PORT"),
        (
            "resync_interval_seconds: abc\n",
            "resync_interval_seconds: 'abc' is not a number of seconds in 5..86400",
        ),
        (
            "resync_interval_seconds: 1\n",
            "resync_interval_seconds: 1 is not a number of seconds in 5..86400",
        ),
        ("debounce_seconds: true\n", "debounce_seconds: True is not a number"),
        ("live_probe: 'yes'\n", "live_probe: 'yes' is not true or false"),
        ("log_level: loud\n", "log_level: 'loud' is not one of debug, info, warning, error"),
        ("namespaces:\n  include: pod\n", "include: 'pod' is not a list of non-empty strings"),
        ("observers:\n  - name: x\n", "observers[0]: needs programs or filters"),
        (
            "observers:\n  - name: x\n    programs: [a]\n    priority: 0\n",
            "observers[0].priority: 0 is not an integer in 1..65535",
        ),
        ("observers: {}\n", "observers: {} is not a list"),
        (
            "tls:\n  cert_file: /nonexistent.pem\n  key_file: /nonexistent.key\n",
            "tls.cert_file: '/nonexistent.pem' is not a readable file",
        ),
        (
            "basic_auth:\n  username: a:b\n",
            "basic_auth.username: 'a:b' is not a non-empty string without ':'",
        ),
        ("colour: blue\n", "colour: unknown key (allowed: "),
        ("datadog:\n  config_file: x\n", "datadog.config_file: unknown key"),
    ],
)
def test_bad_values_get_one_line_naming_file_key_value_and_what_is_allowed(
    tmp_path, text, expected
):
    path = write(tmp_path, text)
    found = problems(path)
    assert len(found) == 1 if "tls" not in text else len(found) == 2, found
    assert found[0].startswith(f"{path}: ")
    assert expected in found[0]


def test_malformed_yaml_says_where(tmp_path):
    path = write(tmp_path, "listen_address: [unclosed\nlog_level: info\n")
    found = problems(path)
    assert len(found) == 1 and "not valid YAML at line" in found[0]


def test_top_level_must_be_a_mapping(tmp_path):
    assert problems(write(tmp_path, "- a\n- b\n")) == [
        f"{tmp_path}/tcprio.yaml: the top level must be a mapping of settings"
    ]


def test_a_directory_a_fifo_and_a_huge_file_are_refused(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert problems(folder) == [f"{folder}: is not a regular file"]
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert problems(fifo) == [f"{fifo}: is not a regular file"]  # and does not block
    huge = write(tmp_path, "#" * (2 << 20))
    assert "bytes; at most 1048576 allowed" in problems(huge)[0]


def test_symlink_to_a_good_file_is_followed(tmp_path):
    target = write(tmp_path, "listen_address: '[::1]:9000'\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    config = load_config(link)
    assert (config.listen_host, config.listen_port) == ("::1", 9000)
    assert config.listen_address == "[::1]:9000"


def test_several_problems_are_all_reported(tmp_path):
    found = problems(write(tmp_path, "log_level: x\nlive_probe: 2\nresync_interval_seconds: -1\n"))
    assert len(found) == 3


def test_basic_auth_and_tls_read_their_files(tmp_path):
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    text = (
        f"basic_auth:\n  username: prom\n  password_file: {password}\n"
        f"tls:\n  cert_file: {cert}\n  key_file: {key}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.basic_auth is not None and config.basic_auth.password == "s3cret"
    assert "s3cret" not in repr(config)
    assert config.tls is not None and config.tls.cert_file == cert


def test_listen_address_flag_overrides_the_file():
    config = with_overrides(DaemonConfig(), "127.0.0.1:1234")
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 1234)
    with pytest.raises(ConfigError, match="--listen-address: 'nope' is not HOST:PORT"):
        with_overrides(DaemonConfig(), "nope")
    assert parse_listen_address("[::]:80") == ("::", 80)
    assert parse_listen_address(":80") is None


def test_the_shipped_default_file_is_valid_and_says_the_defaults():
    shipped = Path(__file__).resolve().parent.parent / "systemd" / "tcprio.yaml"
    config = load_config(shipped)
    assert dataclasses.replace(config, source="x") == dataclasses.replace(
        DaemonConfig(), source="x"
    )


def test_a_config_read_inside_a_root_cannot_follow_a_link_out_of_it(tmp_path: Path):
    """The self-test reads a running daemon's file through /proc/<pid>/root: a link in there
    names the daemon's own files, never this host's."""
    host_file = tmp_path / "host.yaml"
    host_file.write_text('listen_address: "127.0.0.1:1111"\n')
    root = tmp_path / "container"
    (root / "etc" / "tcprio").mkdir(parents=True)
    (root / "etc" / "tcprio" / "tcprio.yaml").symlink_to(host_file)  # absolute: the host's
    config = load_config(Path("/etc/tcprio/tcprio.yaml"), missing_ok=True, root=root)
    assert config.listen_port == 9842 and "absent" in config.source  # not the host's 1111
    (root / str(host_file).lstrip("/")).parent.mkdir(parents=True)
    (root / str(host_file).lstrip("/")).write_text('listen_address: "127.0.0.1:2222"\n')
    config = load_config(Path("/etc/tcprio/tcprio.yaml"), missing_ok=True, root=root)
    assert config.listen_port == 2222  # the same link, resolved inside the root
