"""The benchmarks run on machines CI is not (GPUs, long runs): here each one at least imports
and parses its flags, so that a change to the code they drive cannot break them unseen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("__init__.py", "common.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_imports_and_parses_its_flags(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
