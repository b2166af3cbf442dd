"""Shared pytest set-up: the tests need root and the real kernel."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

if os.geteuid() != 0:
    raise SystemExit("tcprio's tests need root: they build namespaces and load BPF programs")

# A shell starts a background job (`cmd &` without job control) with SIGINT ignored, and an
# ignored signal stays ignored across exec: the tcprio processes the tests interrupt with SIGINT
# would then never see it. A handler (Python's own) is reset to the default at exec instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Hypothesis: CI and `./run.sh test` draw the same examples every run (derandomized), so a red
# run always means a change broke something. To explore new examples (fuzzing for real), run
#   HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest tests/test_verdicts_fuzz.py
# and turn anything it finds into a plain regression test.
from hypothesis import settings  # noqa: E402

from tests.bpf_programs import classifier_programs  # noqa: E402, F401  (session fixture)

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
