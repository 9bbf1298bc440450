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


def test_the_mesh_bench_runs_the_real_mesh_at_its_paced_workers_pace():
    """bench_mesh.py's stand-in worker speaks the step stream the scheduler drives: a short
    run through the real gateway and scheduler streams every token, never faster than the
    stand-in's device step."""
    done = subprocess.run([sys.executable, str(BENCH / "bench_mesh.py"), "--step-ms", "2",
                           "--batches", "2", "--api-servers", "1", "--tokens", "24",
                           "--engine-rounds", "1"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| 2.0 | 1 | 2 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    tpot_ms, tokens_per_s = float(cells[5]), float(cells[6])
    # The device's pace, plus what the mesh adds on 2 cores: a stream's first token can arrive
    # late and its last on time, so its own TPOT can fall a little under the step...
    assert 1.5 < tpot_ms < 20, row
    # ...but the run's tokens never come faster than 2 streams at one token per 2 ms step.
    assert 0 < tokens_per_s <= 2 * 1000 / 2.0, row
    (alone,) = [line for line in done.stdout.splitlines() if "step loop alone" in line]
    wall_ms = float(alone.rsplit("per round: ", 1)[1].split(" ms per step")[0])
    assert 1.95 < wall_ms < 20, alone  # the scheduler alone keeps the device's pace too
