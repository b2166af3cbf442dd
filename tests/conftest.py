"""Shared pytest set-up: the tests need root and the real kernel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

if os.geteuid() != 0:
    raise SystemExit("tcprio's tests need root: they build namespaces and load BPF programs")

from tests.bpf_programs import classifier_programs  # noqa: E402, F401  (session fixture)
