"""Every Triton kernel the model launches compiles for Hopper (sm_90) with programmatic
dependent launch on, here on a CPU machine (tests/model/hopper_build.py): the interpreter tests
check what the kernels compute, this what only the GPU build sees (the PDL prologue and its
prefetches, the tensor-core tiles, inline PTX)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_builds_for_hopper_with_pdl():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "protos"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "tests.model.hopper_build"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("ok ") >= 14, done.stdout
