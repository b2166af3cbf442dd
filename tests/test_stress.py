"""The churn stress run (bench/churn_stress.py) in its short CI form.

The long form (`.venv/bin/python bench/churn_stress.py`, 180 s, 50 scrapers) is a documented
command; here the same script runs for at least 20 s with 15 concurrent scrapers, and on until
it has made 1,000 changes and served 1,000 scrapes (a slow machine runs longer rather than
failing; at most MAX_CHURN_S). It must pass every one of its checks: no crash, no traceback, no
failed scrape, thousands of changes seen, the final /metrics equal to a fresh `tcprio --scan`,
no series left for the deleted namespaces, fds and threads back at the baseline, RSS near it, a
clean stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.timing import HANG_GUARD_S

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "churn_stress.py"
SECONDS = 20  # how long the churn runs at least: the run's shape, not a bound
MAX_CHURN_S = 240  # the churn stops here even if the work is not done (the checks then fail)
RUN_GUARD_S = 600.0  # the whole run takes about 26 s here: 10x that, and more than MAX_CHURN_S


def test_churn_stress_short_form(tmp_path: Path):
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", str(SECONDS), "--scrapers", "15",
         "--workers", "2", "--max-namespaces", "6", "--resync", "5", "--min-changes", "1000",
         "--until-enough", "--min-scrapes", "1001", "--max-seconds", str(MAX_CHURN_S),
         "--parse-every", "5", "--settle-timeout", str(HANG_GUARD_S), "--json", str(summary)],
        capture_output=True, text=True, timeout=RUN_GUARD_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads(summary.read_text())
    assert result["ok"] and all(c["ok"] for c in result["checks"]), proc.stdout
    names = {c["name"] for c in result["checks"]}
    for expected in (
        "no failed scrape", "final /metrics equal a fresh --scan",
        "no series left for vanished namespaces", "fds back at the baseline",
        "threads back at the baseline", "no traceback in the daemon's log",
    ):  # fmt: skip
        assert expected in names
    figures = result["figures"]
    assert figures["changes_total"] >= 1000
    changes = figures["changes"]
    for kind in ("netns add", "netns del", "veth add", "veth del", "qdisc add", "qdisc del",
                 "cls_bpf add", "cls_bpf replace", "cls_bpf del", "u32 add", "u32 del",
                 "tcx attach", "tcx close"):  # fmt: skip
        assert changes.get(kind, 0) > 0, kind
    scrapes = figures["scrapes"]
    assert scrapes["requests"] > 1000 and not scrapes["failures"] and scrapes["parsed"] > 0
    assert figures["final_compare"]["classifier_series"] > 0
    resources = figures["resources"]
    assert resources["final"]["fds"] == resources["baseline"]["fds"]
    assert resources["final"]["Threads"] == resources["baseline"]["Threads"]
    assert resources["peak"]["fds"] > resources["baseline"]["fds"]  # it did watch namespaces
    assert figures["scans"]["incremental"] > 0 and figures["scans"]["full"] > 0
    tag = figures["tag"]  # every namespace of the run is gone
    assert tag.startswith("tcprios-") and not list(Path("/run/netns").glob(f"{tag}-*"))
