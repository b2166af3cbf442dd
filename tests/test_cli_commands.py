"""The command line's shape: subcommands, the older spellings, exit statuses (64 for a usage
error, never argparse's 2, which means "critical"), refusals of options that do nothing,
--fail-on, NO_COLOR, and the completion and man page generated from the parser."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcprio.cli import COMMANDS, EXIT_USAGE, normalized_argv
from tcprio.model import Direction
from tcprio.selftest.running_daemon import _serves
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth_in_one
from tests.test_cli import CLEAN_ENV, tcprio

E = Direction.EGRESS
ROOT = Path(__file__).resolve().parent.parent


def one_usage_line(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode == EXIT_USAGE, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


# --- the shape --------------------------------------------------------------------------------


def test_plain_tcprio_prints_its_usage_and_starts_nothing():
    proc = tcprio()
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == ""
    assert "usage: tcprio" in proc.stderr and "scan, serve, self-test or bundle" in proc.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help_with_examples(command: str):
    proc = tcprio(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: tcprio {command}" in proc.stdout
    assert "examples:" in proc.stdout and f"  tcprio {command}" in proc.stdout
    assert "64 usage error" in proc.stdout
    assert all(len(line) <= 100 for line in proc.stdout.splitlines())


def test_the_main_help_names_every_command_with_examples():
    proc = tcprio("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"  tcprio {command}" in proc.stdout
    assert "tcprio --scan works too" in proc.stdout


def test_older_spellings_map_to_the_commands():
    assert normalized_argv(["--scan", "--format", "json"]) == ["scan", "--format", "json"]
    assert normalized_argv(["--format", "json", "--scan"]) == ["scan", "--format", "json"]
    assert normalized_argv(["--config", "/etc/tcprio/tcprio.yaml"])[0] == "serve"
    assert normalized_argv(["--config=/x"])[0] == "serve"
    assert normalized_argv(["scan", "--config", "x"]) == ["scan", "--config", "x"]
    assert normalized_argv([]) == []


@pytest.mark.parametrize(
    ("argv", "daemon"),
    [
        (["/opt/tcprio/.venv/bin/tcprio", "serve", "--config", "/etc/tcprio/tcprio.yaml"], True),
        (["/opt/tcprio/.venv/bin/tcprio", "--config", "/etc/tcprio/tcprio.yaml"], True),
        (["/usr/bin/python3", "-m", "tcprio", "serve"], True),
        (["/opt/tcprio/.venv/bin/tcprio"], True),  # an older daemon: a bare tcprio exits now
        (["tcprio", "scan"], False),
        (["tcprio", "--scan"], False),
        (["tcprio", "self-test"], False),
        (["tcprio", "bundle", "--yes"], False),
    ],
)
def test_the_self_test_recognises_both_daemon_spellings(argv: list[str], daemon: bool):
    assert _serves(argv) is daemon


# --- refusals: one line, exit 64 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("scan", "--listen-address", "1.2.3.4:5"), "--listen-address"),
        (("serve", "--format", "json"), "--format"),
        (("self-test", "--netns", "x"), "--netns"),
        (("bundle", "--explain"), "--explain"),
        (("scan", "--format", "yaml"), "'yaml'"),
        (("scan", "--fail-on", "info"), "'info'"),
        (("frobnicate",), "'frobnicate'"),
        (("scan", "--cilium-version", "latest"), "'latest' is not a version"),
        (("scan", "--cilium-version", "1"), "'1' is not a version"),
        (("bundle", "--log-lines", "-1"), "-1 is negative"),
        (("bundle", "--log-lines", "many"), "'many' is not a whole number"),
    ],
)
def test_an_option_that_does_not_fit_is_one_line_and_exit_64(argv, expected):
    one_usage_line(tcprio(*argv), expected)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("scan", "--pretty"), "--pretty only applies to --format json"),
        (("scan", "--format", "json", "--detail"), "--detail only applies to the text report"),
        (("scan", "--format", "json", "--explain"), "--explain only applies to the text"),
        (("scan", "--format", "json", "--color", "never"), "--color only applies to the text"),
        (("--scan", "--pretty"), "--pretty only applies"),
        (("scan", "--datadog-config", "/nonexistent/sp.yaml"), "/nonexistent/sp.yaml: no such"),
        (("scan", "--config", "/nonexistent/tcprio.yaml"), "--config /nonexistent/tcprio.yaml"),
        (("serve", "--config", "/nonexistent/tcprio.yaml"), "--config /nonexistent/tcprio.yaml"),
        (("bundle", "--config", "/nonexistent/t.yaml"), "--config /nonexistent/t.yaml"),
        (("self-test", "--datadog-config", "/nonexistent/sp.yaml"), "--datadog-config"),
        (("scan", "--netns", "tcprio-no-such-ns-*"), "--netns tcprio-no-such-ns-*: no network"),
        (("bundle", "--yes", "--netns", "tcprio-no-such-*"), "--netns tcprio-no-such-*"),
        (("scan", "--datadog-config", "/x", "--no-datadog-config"), "cannot go together"),
    ],
)
def test_an_option_that_does_nothing_or_names_nothing_is_refused(argv, expected):
    one_usage_line(tcprio(*argv), expected)


# --- exit statuses and --fail-on -------------------------------------------------------------


@pytest.fixture
def scene(classifier_programs) -> Iterator[TestNetns]:
    with netns("cmd") as ns:
        for ifname in ("c0", "c1"):
            veth_in_one(ns, ifname, f"{ifname}p")
            add_clsact(ns, ifname)
        yield ns


def scan_status(ns: TestNetns, *extra: str) -> int:
    proc = tcprio("scan", "--netns", ns.name, "--no-datadog-config", "--assume-datadog", *extra)
    assert proc.stderr == "", proc.stderr
    return proc.returncode


def test_fail_on_sets_which_conflicts_count(scene: TestNetns):
    attach_filter(scene, "c0", E, 5, "term_shot")  # an error: classifier_priority 4 fixes it
    assert scan_status(scene) == 1
    assert scan_status(scene, "--fail-on", "warning") == 1
    assert scan_status(scene, "--fail-on", "critical") == 0
    attach_filter(scene, "c1", E, 1, "term_redirect")  # critical
    assert scan_status(scene) == 2
    assert scan_status(scene, "--fail-on", "critical") == 2
    assert scan_status(scene, "--format", "json", "--fail-on", "critical") == 2


def test_the_old_scan_spelling_still_works(scene: TestNetns):
    attach_filter(scene, "c0", E, 5, "term_shot")
    proc = tcprio("--scan", "--netns", scene.name, "--no-datadog-config", "--assume-datadog")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[2].startswith("FIXABLE: Datadog's classifier is hidden")


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(argv, stdout=slave, stderr=subprocess.PIPE, env=env, timeout=120)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    assert proc.returncode in (0, 1, 2), proc.stderr
    return b"".join(chunks).decode()


def test_no_color_is_honoured_on_a_terminal(scene: TestNetns):
    attach_filter(scene, "c0", E, 1, "term_redirect")
    argv = [sys.executable, "-m", "tcprio", "scan", "--netns", scene.name, "--no-agent-process",
            "--no-datadog-config", "--assume-datadog"]  # fmt: skip
    assert "\033[" in _on_a_terminal(argv, CLEAN_ENV)
    assert "\033[" not in _on_a_terminal(argv, {**CLEAN_ENV, "NO_COLOR": "1"})
    forced = _on_a_terminal([*argv, "--color", "always"], {**CLEAN_ENV, "NO_COLOR": "1"})
    assert "\033[" in forced


# --- completion and man page -----------------------------------------------------------------


def test_completion_and_man_page_come_from_the_parser(tmp_path: Path):
    script = ROOT / "scripts" / "shell_docs.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, timeout=60)
    bash = (tmp_path / "tcprio.bash").read_text()
    subprocess.run(["bash", "-n", str(tmp_path / "tcprio.bash")], check=True)
    for command in COMMANDS:
        assert command in bash
    words = subprocess.run(
        ["bash", "-c", f"source {tmp_path / 'tcprio.bash'}; COMP_WORDS=(tcprio scan --fail-on '');"
         " COMP_CWORD=3; _tcprio; echo ${COMPREPLY[@]}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert words == ["warning", "error", "critical"]
    zsh = (tmp_path / "_tcprio").read_text()
    assert zsh.startswith("#compdef tcprio") and "--fail-on" in zsh and "_tcprio_self_test" in zsh
    man = (tmp_path / "tcprio.8").read_text()
    assert man.startswith(".TH TCPRIO 8")
    for text in ("TCPRIO SCAN", "TCPRIO SERVE", "TCPRIO SELF\\-TEST", "TCPRIO BUNDLE",
                 "\\-\\-fail\\-on", "\\-\\-log\\-lines", "examples:"):  # fmt: skip
        assert text in man, text


def test_the_readme_shows_the_same_examples_as_the_help():
    readme = (ROOT / "README.md").read_text()
    from tcprio.cli import SCAN_EXAMPLES

    examples = [line for line in SCAN_EXAMPLES.splitlines() if line.startswith("  tcprio ")]
    assert len(examples) >= 4
    for line in examples:
        assert f"  {line}" in readme, line  # README's code blocks are indented 4
