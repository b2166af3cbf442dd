"""The Prometheus alerting rules in deploy/prometheus: valid, and their unit tests pass.

Runs Prometheus' own checker on them: `promtool check rules` (syntax, PromQL, templates,
duplicate rules) and `promtool test rules` (alerts_test.yml: every alert firing and not
firing on synthetic series). promtool comes from Debian's `prometheus` package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = RULES_DIR / "alerts_test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`; scripts/setup.sh installs it)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    """A new alert in alerts.yml needs its firing and not-firing cases in alerts_test.yml."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [c for t in tests for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in checks if c.get("exp_alerts")}
    silent = {c["alertname"] for c in checks if not c.get("exp_alerts")}
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested not firing"
    assert fired | silent <= alerts, "tests name alerts that alerts.yml does not define"
