"""datadog_config: effective Datadog network settings, with real files and real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from tcprio import datadog, inputs
from tcprio.analysis import datadog_settings, remedies
from tcprio.kernel import datadog_agent, files
from tcprio.model import DatadogSettings, Setting

PRIO = "network.classifier_priority"
OLD_PRIO = f"runtime_security_config.{PRIO}"
NEW_PRIO = f"event_monitoring_config.{PRIO}"
EM_PRIO_ENV = "DD_EVENT_MONITORING_CONFIG_NETWORK_CLASSIFIER_PRIORITY"
RSC_PRIO_ENV = "DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY"


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def resolve(files: list[Path], environ: Mapping[str, str] | None = None, **kw) -> DatadogSettings:
    kw.setdefault("host_root", Path("/nonexistent-root"))
    return datadog.resolve_settings(files=files, environ=environ or {}, scan_processes=False, **kw)


@pytest.fixture
def sp_yaml(tmp_path: Path) -> Callable[[str], Path]:
    return lambda text: write_yaml(tmp_path / "system-probe.yaml", text)


# --- precedence ------------------------------------------------------------------------------


def test_defaults_when_nothing_is_configured(tmp_path: Path) -> None:
    s = resolve([tmp_path / "system-probe.yaml"])
    assert s.enabled == Setting(True, "default")
    assert s.classifier_priority == Setting(10, "default")
    assert s.classifier_handle == Setting(0, "default")
    assert s.ingress_enabled == Setting(True, "default")
    assert s.errors == ()
    assert any("not found" in n for n in s.notes)
    assert s.agent_version is None


def test_file_new_spelling(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("event_monitoring_config:\n  network:\n    classifier_priority: 5\n")
    s = resolve([path])
    assert s.classifier_priority == Setting(5, f"file:{path}:{NEW_PRIO}")


def test_file_deprecated_spelling_wins_over_new(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml(
        "event_monitoring_config:\n  network:\n    classifier_priority: 5\n"
        "runtime_security_config:\n  network:\n    classifier_priority: 3\n"
    )
    s = resolve([path])
    assert s.classifier_priority == Setting(3, f"file:{path}:{OLD_PRIO}")
    assert any("deprecated spelling" in n for n in s.notes)


def test_env_beats_file_within_new_spelling(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("event_monitoring_config:\n  network:\n    classifier_priority: 5\n")
    s = resolve([path], {EM_PRIO_ENV: "7"})
    assert s.classifier_priority == Setting(7, f"env:{EM_PRIO_ENV}")


def test_deprecated_env_feeds_the_new_key_and_beats_its_file(
    sp_yaml: Callable[[str], Path],
) -> None:
    path = sp_yaml("event_monitoring_config:\n  network:\n    classifier_priority: 5\n")
    s = resolve([path], {RSC_PRIO_ENV: "6"})
    assert s.classifier_priority == Setting(6, f"env:{RSC_PRIO_ENV}")


def test_new_env_beats_deprecated_env(tmp_path: Path) -> None:
    s = resolve([tmp_path / "none.yaml"], {RSC_PRIO_ENV: "6", EM_PRIO_ENV: "7"})
    assert s.classifier_priority == Setting(7, f"env:{EM_PRIO_ENV}")


def test_deprecated_file_beats_both_env_vars(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("runtime_security_config:\n  network:\n    classifier_priority: 3\n")
    s = resolve([path], {RSC_PRIO_ENV: "6", EM_PRIO_ENV: "7"})
    assert s.classifier_priority == Setting(3, f"file:{path}:{OLD_PRIO}")


def test_empty_env_var_is_ignored(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("event_monitoring_config:\n  network:\n    classifier_priority: 5\n")
    s = resolve([path], {EM_PRIO_ENV: ""})
    assert s.classifier_priority.value == 5
    assert s.errors == ()


def test_flat_dotted_keys_string_values_and_case(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml(
        "Runtime_Security_Config.network.classifier_priority: '4'\n"
        "runtime_security_config:\n  network.classifier_handle: 9\n"
        "event_monitoring_config.network.enabled: 'false'\n"
        "event_monitoring_config:\n  network:\n    ingress:\n      enabled: no\n"
    )
    s = resolve([path])
    assert s.classifier_priority.value == 4
    assert s.classifier_handle == Setting(
        9, f"file:{path}:runtime_security_config.network.classifier_handle"
    )
    assert s.enabled.value is False
    assert s.ingress_enabled == Setting(
        False, f"file:{path}:event_monitoring_config.network.ingress.enabled"
    )
    assert s.errors == ()


def test_null_value_is_not_configured(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml(
        "runtime_security_config:\n  network:\n    classifier_priority:\n"
        "event_monitoring_config:\n  network:\n    classifier_priority: 5\n"
    )
    assert resolve([path]).classifier_priority.value == 5


def test_env_booleans_follow_go_parsebool(tmp_path: Path) -> None:
    env = {
        "DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED": "F",
        "DD_EVENT_MONITORING_CONFIG_NETWORK_INGRESS_ENABLED": "1",
    }
    s = resolve([tmp_path / "none.yaml"], env)
    assert s.enabled == Setting(False, "env:DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED")
    assert s.ingress_enabled.value is True


def test_workload_protection_enabled_is_reported(tmp_path: Path) -> None:
    probe = write_yaml(
        tmp_path / "system-probe.yaml", "runtime_security_config:\n  enabled: true\n"
    )
    agent = write_yaml(tmp_path / "security-agent.yaml", "runtime_security_config.enabled: false\n")
    s = resolve([probe, agent])
    assert any(
        f"system-probe (runtime_security_config.enabled): true (file:{probe}" in n for n in s.notes
    )
    assert any(
        f"security-agent (runtime_security_config.enabled): false (file:{agent}" in n
        for n in s.notes
    )


def test_network_keys_in_security_agent_yaml_are_not_system_probe_config(tmp_path: Path) -> None:
    agent = write_yaml(tmp_path / "security-agent.yaml", f"{OLD_PRIO}: 3\n")
    assert resolve([agent]).classifier_priority == Setting(10, "default")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "literal, shown",
    [
        ("abc", "'abc'"),
        ("0", "0"),
        ("70000", "70000"),
        ("-1", "-1"),
        ("1.5", "1.5"),
        ("true", "True"),
    ],
)
def test_bad_priority_is_one_error_and_falls_back(
    sp_yaml: Callable[[str], Path], literal: str, shown: str
) -> None:
    path = sp_yaml(
        f"runtime_security_config:\n  network:\n    classifier_priority: {literal}\n"
        "event_monitoring_config:\n  network:\n    classifier_priority: 7\n"
    )
    s = resolve([path])
    assert len(s.errors) == 1, s.errors
    line = s.errors[0]
    assert line.startswith(f"{path}: {OLD_PRIO}: {shown} is not an integer in 1..65535")
    assert line.endswith("; ignored") or "wrap it to 16 bits" in line
    assert s.classifier_priority == Setting(7, f"file:{path}:{NEW_PRIO}")


def test_out_of_range_priority_says_what_the_agent_would_do(sp_yaml: Callable[[str], Path]) -> None:
    s = resolve([sp_yaml(f"{OLD_PRIO}: 70000\n")])
    assert "wrap it to 16 bits: 4464" in s.errors[0]
    assert s.classifier_priority == Setting(10, "default")


def test_bad_env_priority_names_the_variable(tmp_path: Path) -> None:
    s = resolve([tmp_path / "none.yaml"], {EM_PRIO_ENV: "abc", RSC_PRIO_ENV: "8"})
    assert s.errors == (
        f"environment variable {EM_PRIO_ENV}: {NEW_PRIO}: 'abc' is not an integer in 1..65535;"
        " ignored",
    )
    assert s.classifier_priority == Setting(8, f"env:{RSC_PRIO_ENV}")


@pytest.mark.parametrize("literal", ["70000", "-1", "x"])
def test_bad_handle(sp_yaml: Callable[[str], Path], literal: str) -> None:
    path = sp_yaml(f"event_monitoring_config:\n  network:\n    classifier_handle: {literal}\n")
    s = resolve([path])
    assert len(s.errors) == 1
    assert s.errors[0].startswith(f"{path}: event_monitoring_config.network.classifier_handle: ")
    assert "is not an integer in 0..65535" in s.errors[0]
    assert s.classifier_handle == Setting(0, "default")


def test_non_boolean_enabled(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("runtime_security_config:\n  network:\n    enabled: maybe\n")
    s = resolve([path], {"DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED": "false"})
    assert len(s.errors) == 1
    assert s.errors[0].startswith(
        f"{path}: runtime_security_config.network.enabled: 'maybe' is not a boolean"
    )
    assert s.enabled == Setting(False, "env:DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED")


def test_malformed_yaml(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("runtime_security_config:\n  network: [\n")
    s = resolve([path], {EM_PRIO_ENV: "4"})
    assert len(s.errors) == 1
    assert s.errors[0].startswith(f"{path}: malformed YAML")
    assert s.classifier_priority == Setting(4, f"env:{EM_PRIO_ENV}")


def test_yaml_root_that_is_not_a_mapping(sp_yaml: Callable[[str], Path]) -> None:
    path = sp_yaml("- 1\n- 2\n")
    s = resolve([path])
    assert s.errors == (f"{path}: YAML root is a list, not a mapping; ignored",)
    assert s.classifier_priority == Setting(10, "default")


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "system-probe.yaml"
    path.mkdir()
    s = resolve([path])
    assert s.errors == (f"{path}: is a directory, not a file; ignored",)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "system-probe.yaml"
    os.mkfifo(path)
    s = resolve([path])
    assert s.errors == (f"{path}: is not a regular file (fifo, socket or device); ignored",)


def test_oversize_file(tmp_path: Path) -> None:
    path = tmp_path / "system-probe.yaml"
    path.write_text("#" * (files.MAX_FILE_BYTES + 10))
    s = resolve([path])
    assert len(s.errors) == 1
    assert s.errors[0].startswith(f"{path}: is {files.MAX_FILE_BYTES + 10} bytes, more than the")


def test_missing_file_is_a_note_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "system-probe.yaml"
    s = resolve([path])
    assert s.errors == ()
    assert f"{path}: not found; skipped" in s.notes


def test_symlink_is_followed_within_the_root(tmp_path: Path) -> None:
    real = write_yaml(tmp_path / "data" / "real.yaml", f"{OLD_PRIO}: 12\n")
    link = tmp_path / "system-probe.yaml"
    link.symlink_to("data/real.yaml")
    s = resolve([link])
    assert s.classifier_priority.value == 12
    assert any(f"symbolic link followed to {real}" in n for n in s.notes)


def test_symlink_loop_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    s = resolve([tmp_path / "a.yaml"])
    assert len(s.errors) == 1
    assert s.errors[0].startswith(f"{tmp_path / 'a.yaml'}: more than 40 symbolic links")


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "abs").symlink_to("/etc/target.yaml")
    (root / "etc" / "up").symlink_to("../../../../../etc/target.yaml")
    assert files.resolve_in_root(root, "/etc/abs") == root / "etc" / "target.yaml"
    assert files.resolve_in_root(root, "/etc/up") == root / "etc" / "target.yaml"


# --- a real system-probe process -------------------------------------------------------------

Spawn = Callable[..., subprocess.Popen[bytes]]


def default_install(tmp_path: Path) -> Path:
    return tmp_path / "opt" / "datadog-agent"


@pytest.fixture
def spawn_probe(tmp_path: Path) -> Iterator[Spawn]:
    """Start processes named system-probe: a copy of /bin/sh blocked on `read`, by default as
    <install>/embedded/bin/system-probe of a Datadog install (a version manifest) run by root,
    which is what makes it Datadog's."""
    procs: list[subprocess.Popen[bytes]] = []
    script = write_yaml(tmp_path / "wait.sh", "read _line\n")

    def spawn(
        args: list[str], env: dict[str, str], bin_dir: Path | None = None
    ) -> subprocess.Popen[bytes]:
        exe = (bin_dir or default_install(tmp_path) / "embedded" / "bin") / "system-probe"
        exe.parent.mkdir(parents=True, exist_ok=True)
        install = exe.parent.parent.parent
        if not any((install / name).exists() for name in datadog_agent.VERSION_MANIFESTS):
            write_yaml(install / "version-manifest.json", json.dumps({"build_version": "7.70.0"}))
        if not exe.exists():
            shutil.copy2("/bin/sh", exe)
        proc = subprocess.Popen([str(exe), str(script), *args], env=env, stdin=subprocess.PIPE)
        procs.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def from_procs(
    *procs: subprocess.Popen[bytes],
    files: list[Path] | None = None,
    environ: dict[str, str] | None = None,
) -> DatadogSettings:
    return datadog.resolve_settings(
        files=files or [],
        environ=environ or {},
        host_root=Path("/nonexistent-root"),
        only_pids={p.pid for p in procs},
    )


def test_running_process_environment_and_config_are_the_truth(
    tmp_path: Path, spawn_probe: Spawn
) -> None:
    cfg = write_yaml(
        tmp_path / "conf" / "sp.yaml", f"{NEW_PRIO}: 3\nruntime_security_config:\n  enabled: true\n"
    )
    local = write_yaml(tmp_path / "local" / "system-probe.yaml", f"{OLD_PRIO}: 99\n")
    env = {
        "DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_HANDLE": "5",
        "DD_EVENT_MONITORING_CONFIG_NETWORK_ENABLED": "false",
    }
    proc = spawn_probe([f"--config={cfg}"], env)
    s = from_procs(proc, files=[local], environ={EM_PRIO_ENV: "42"})
    prefix = f"process {proc.pid} (system-probe) "
    assert s.classifier_priority == Setting(
        3, f"{prefix}file:/proc/{proc.pid}/root{cfg}:{NEW_PRIO}"
    )
    assert s.classifier_handle == Setting(
        5, f"{prefix}env:DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_HANDLE"
    )
    assert s.enabled == Setting(False, f"{prefix}env:DD_EVENT_MONITORING_CONFIG_NETWORK_ENABLED")
    assert any(f"pid {proc.pid}" in n and "source of truth" in n for n in s.notes)
    assert any("system-probe (runtime_security_config.enabled): true" in n for n in s.notes)
    assert s.errors == ()


def test_running_process_config_directory_flag_and_bad_value(
    tmp_path: Path, spawn_probe: Spawn
) -> None:
    conf_dir = tmp_path / "conf"
    write_yaml(conf_dir / "system-probe.yaml", f"{OLD_PRIO}: abc\n")
    proc = spawn_probe(["-c", str(conf_dir)], {RSC_PRIO_ENV: "6"})
    s = from_procs(proc)
    assert s.classifier_priority == Setting(
        6, f"process {proc.pid} (system-probe) env:{RSC_PRIO_ENV}"
    )
    assert s.errors == (
        f"process {proc.pid} (system-probe) /proc/{proc.pid}/root{conf_dir}/system-probe.yaml: "
        f"{OLD_PRIO}: 'abc' is not an integer in 1..65535; ignored",
    )


def test_agent_version_from_the_process_install_dir(tmp_path: Path, spawn_probe: Spawn) -> None:
    install = tmp_path / "opt" / "datadog-agent"
    write_yaml(install / "version-manifest.txt", "agent 7.38.0-1\n\nComponent ...\n")
    cfg = write_yaml(tmp_path / "sp.yaml", f"{OLD_PRIO}: 20\n")
    proc = spawn_probe([f"--config={cfg}"], {}, bin_dir=install / "embedded" / "bin")
    s = from_procs(proc)
    assert s.agent_version == "7.38.0-1"
    assert s.agent_version_source == f"/proc/{proc.pid}/root{install}/version-manifest.txt"
    assert s.classifier_priority == Setting(1, "agent 7.38.0-1: fixed priority 1 before 7.39.2")
    assert any("ignored by agent 7.38.0-1" in n for n in s.notes)


def test_legacy_agent_reads_only_runtime_security_config(
    tmp_path: Path, spawn_probe: Spawn
) -> None:
    install = tmp_path / "opt" / "datadog-agent"
    write_yaml(install / "version-manifest.json", json.dumps({"build_version": "7.40.1-1"}))
    cfg = write_yaml(tmp_path / "sp.yaml", f"{OLD_PRIO}: 4\n{NEW_PRIO}: 3\n")
    proc = spawn_probe(
        [f"--config={cfg}"], {RSC_PRIO_ENV: "6"}, bin_dir=install / "embedded" / "bin"
    )
    s = from_procs(proc)
    assert s.agent_version == "7.40.1-1"
    assert s.classifier_priority == Setting(
        6, f"process {proc.pid} (system-probe) env:{RSC_PRIO_ENV}"
    )
    assert s.ingress_enabled == Setting(False, "default for agent 7.40.1-1")
    assert any("ignored, this agent predates event_monitoring_config" in n for n in s.notes)


def test_disagreeing_processes_are_noted(tmp_path: Path, spawn_probe: Spawn) -> None:
    cfg = write_yaml(tmp_path / "empty.yaml", "{}\n")
    first = spawn_probe([f"--config={cfg}"], {EM_PRIO_ENV: "5"})
    second = spawn_probe([f"--config={cfg}"], {EM_PRIO_ENV: "9"})
    s = from_procs(first, second)
    low = min(first.pid, second.pid)
    assert s.classifier_priority.source == f"process {low} (system-probe) env:{EM_PRIO_ENV}"
    assert any(
        "system-probe processes disagree" in n and "classifier_priority=9" in n for n in s.notes
    )


def test_the_verified_process_running_detection_is_taken(
    tmp_path: Path, spawn_probe: Spawn
) -> None:
    off = spawn_probe([f"--config={write_yaml(tmp_path / 'off.yaml', '{}')}"], {EM_PRIO_ENV: "5"})
    on_cfg = write_yaml(tmp_path / "on.yaml", "runtime_security_config:\n  enabled: true\n")
    on = spawn_probe([f"--config={on_cfg}"], {EM_PRIO_ENV: "9"})
    s = from_procs(off, on)
    assert s.found == "process"
    assert s.classifier_priority.source == f"process {on.pid} (system-probe) env:{EM_PRIO_ENV}"
    assert s.wp_enabled is not None and s.wp_enabled.value is True
    (taken,) = s.found_evidence
    assert taken.startswith(
        f"system-probe pid {on.pid} taken (of 2 verified, the lowest pid with network detection"
    )
    assert "uid 0" in taken and "7.70.0" in taken


def test_a_system_probe_outside_an_install_is_not_taken(tmp_path: Path, spawn_probe: Spawn) -> None:
    cfg = write_yaml(tmp_path / "sp.yaml", "{}\n")
    fake = spawn_probe([f"--config={cfg}"], {EM_PRIO_ENV: "5"}, bin_dir=tmp_path / "bin")
    s = from_procs(fake)
    assert s.found == "none" and s.classifier_priority == Setting(10, "default")
    (note,) = [n for n in s.notes if "not taken" in n]
    assert note == (
        f"process {fake.pid} (system-probe) not taken as Datadog's system-probe: its executable "
        f"{tmp_path}/bin/system-probe is not <install>/embedded/bin/system-probe; its settings "
        "are not used"
    )


def test_local_agent_version(tmp_path: Path) -> None:
    manifest = write_yaml(
        tmp_path / "opt" / "datadog-agent" / "version-manifest.json",
        json.dumps({"build_version": "7.50.3-1", "manifest_format": 2}),
    )
    s = resolve([tmp_path / "none.yaml"], host_root=tmp_path)
    assert (s.agent_version, s.agent_version_source) == ("7.50.3-1", str(manifest))
    assert s.ingress_enabled == Setting(False, "default for agent 7.50.3-1")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sp"], None),
        (["sp", "--config=/a/b.yaml"], "/a/b.yaml"),
        (["sp", "--config", "/a"], "/a"),
        (["sp", "-c", "/a"], "/a"),
        (["sp", "-c/a"], "/a"),
        (["sp", "-c=/a"], "/a"),
        (["sp", "run", "-c", "/a", "--config=/b.yaml"], "/b.yaml"),
        (["sp", "--", "--config=/a"], None),
    ],
)
def test_config_flag(argv: list[str], expected: str | None) -> None:
    assert datadog_agent.config_flag(argv) == expected


@pytest.mark.parametrize(
    "flag, path",
    [
        (None, "/etc/datadog-agent/system-probe.yaml"),
        ("/etc/dd/custom.yaml", "/etc/dd/custom.yaml"),
        ("/etc/dd/", "/etc/dd/system-probe.yaml"),
    ],
)
def test_config_file_for(flag: str | None, path: str) -> None:
    assert datadog_agent.config_file_for(flag) == path


# --- versions and the known incompatibility --------------------------------------------------


@pytest.mark.parametrize(
    "text, version",
    [
        ("7.39.1", (7, 39, 1)),
        ("v1.9.18", (1, 9, 18)),
        ("agent 7.50.3-1", (7, 50, 3)),
        ("1.10", (1, 10)),
        ("7.39.2-rc.3", (7, 39, 2)),
        ("", None),
        ("latest", None),
        (None, None),
    ],
)
def test_parse_version(text: str | None, version: tuple[int, ...] | None) -> None:
    assert inputs.parse_version(text) == version


@pytest.mark.parametrize(
    "cilium, agent, bad",
    [
        ("1.9.18", "7.35.2", False),
        ("1.9.18", "7.36.0", True),
        ("1.9.0", "7.39.1", True),
        ("1.9.18", "7.39.2", False),
        ("1.8.5", "7.37.0-1", True),
        ("1.10.0", "7.37.0", False),
        ("1.10", "7.36.0", False),
        ((1, 9, 3), (7, 38), True),
        (None, "7.37.0", False),
        ("1.9.1", None, False),
        ("unknown", "7.37.0", False),
    ],
)
def test_known_incompatibility(cilium: object, agent: object, bad: bool) -> None:
    result = datadog_settings.known_incompatibility(cilium, agent)  # type: ignore[arg-type]
    assert (result is not None) is bad
    if result:
        assert "\n" not in result and "7.39.2" in result


# --- remedies --------------------------------------------------------------------------------


def key_of(snippet: str, key: str) -> object:
    value: object = yaml.safe_load(snippet)
    for part in key.split("."):
        assert isinstance(value, dict)
        value = value[part]
    return value


def test_priority_snippet_uses_the_deprecated_spelling_by_default() -> None:
    snippet = remedies.system_probe_yaml_snippet(9)
    assert snippet == "runtime_security_config:\n  network:\n    classifier_priority: 9\n"
    assert key_of(snippet, OLD_PRIO) == 9
    assert remedies.env_line(9) == f"{RSC_PRIO_ENV}=9"


def test_priority_snippet_follows_where_the_value_is_set() -> None:
    in_file = Setting(5, f"file:/etc/datadog-agent/system-probe.yaml:{NEW_PRIO}")
    assert key_of(remedies.system_probe_yaml_snippet(9, in_file), NEW_PRIO) == 9
    deprecated = Setting(5, f"process 7 (system-probe) file:/proc/7/root/x.yaml:{OLD_PRIO}")
    remedy = remedies.priority_remedy(9, deprecated)
    assert key_of(remedy.system_probe_yaml, OLD_PRIO) == 9
    assert "/proc/7/root/x.yaml" in remedy.extra[0] and "no effect" in remedy.extra[0]
    from_env = Setting(5, f"env:{EM_PRIO_ENV}")
    assert remedies.env_line(9, from_env) == f"{EM_PRIO_ENV}=9"


def test_helm_priority_snippet_sets_the_system_probe_variable() -> None:
    values = yaml.safe_load(remedies.helm_values_snippet(9))
    env = values["agents"]["containers"]["systemProbe"]["env"]
    assert env == [{"name": RSC_PRIO_ENV, "value": "9"}]


def test_priority_remedy_rejects_bad_priorities() -> None:
    for bad in (0, 65536, True, "9"):
        with pytest.raises(ValueError):
            remedies.priority_remedy(bad)  # type: ignore[arg-type]


def test_disable_network_remedy() -> None:
    remedy = remedies.disable_network_remedy()
    assert key_of(remedy.system_probe_yaml, "runtime_security_config.network.enabled") is False
    assert key_of(remedy.helm_values, "datadog.securityAgent.runtime.network.enabled") is False
    assert remedy.environment == "DD_RUNTIME_SECURITY_CONFIG_NETWORK_ENABLED=false"
    assert any("systemctl restart datadog-agent" in line for line in remedy.extra)
    assert any("rollout restart daemonset" in line for line in remedy.extra)


def test_disable_workload_protection_remedy() -> None:
    remedy = remedies.disable_workload_protection_remedy()
    assert key_of(remedy.system_probe_yaml, "runtime_security_config.enabled") is False
    assert key_of(remedy.helm_values, "datadog.securityAgent.runtime.enabled") is False
    assert remedy.environment == "DD_RUNTIME_SECURITY_CONFIG_ENABLED=false"
    assert any("security-agent.yaml" in line for line in remedy.extra)
