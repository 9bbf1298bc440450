"""`meshserve status`: both replicas of a live mesh with their figures, once for a script and
live in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import generate, scheduler_stats

ROOT = Path(__file__).resolve().parents[2]
SHARED = [1] + list(range(40, 200))  # 161 tokens: 10 full blocks shared by the requests below


def status_once(redis_url: str) -> str:
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--redis-url", redis_url,
                          "--once"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def row_of(text: str, replica: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if f" {replica} " in line]
    return [cell.strip() for cell in line.strip().strip("│┃|").split("│")]


@pytest.fixture(scope="module")
def busy_mesh(default_model_dir):
    spec = MeshSpec(replicas=2, port=0, http_port=-1, worker_args=("--num-kv-blocks", "128"))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for i in range(3):  # the shared prefix is cached on whichever replica ran it
            generate(stub, max_tokens=2, prompt_token_ids=SHARED + [200 + i])
        stop = threading.Event()

        def keep_one_busy():  # one request runs at any time while the tests look
            while not stop.is_set():
                generate(stub, prompt="long",
                         sampling=pb.SamplingParams(max_tokens=1000, ignore_eos=True))

        worker = threading.Thread(target=keep_one_busy, daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while not any(scheduler_stats(mesh, r).num_running for r in ("replica-0", "replica-1")):
            assert time.monotonic() < deadline, "the long request never ran"
            time.sleep(0.05)
        yield mesh
        stop.set()
        worker.join(timeout=60)


def test_status_once_shows_both_replicas_with_their_figures(busy_mesh):
    deadline = time.monotonic() + 20
    while True:  # the figures arrive with the next heartbeats
        text = status_once(busy_mesh.redis_url)
        rows = {r: row_of(text, r) for r in ("replica-0", "replica-1")}
        busy = [r for r, cells in rows.items() if cells[4] == "1" and float(cells[8]) > 0]
        if busy:
            busy = busy[0]
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.5)
    assert "2 replica(s)" in text
    for replica, cells in rows.items():
        assert cells[:4] == [replica, "meshserve-tiny-llama", "1 x 1", "serving"], cells
        assert cells[6].endswith("%")  # KV use
    assert rows[busy][6] != "0 %"  # its long request holds blocks
    hit_rates = [cells[7] for cells in rows.values()]  # "-" until a replica has had a prompt
    assert all(rate == "-" or rate.endswith(" %") for rate in hit_rates), hit_rates
    assert any(rate.endswith(" %") for rate in hit_rates), hit_rates


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_the_live_view_draws_in_a_real_terminal(busy_mesh):
    session = f"meshserve-status-{time.monotonic_ns()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "180", "-y", "24",
                    "-c", str(ROOT), "env -u COLUMNS -u LINES "  # the terminal's own size
                    f"{sys.executable} -m deploy.cli status --redis-url "
                    f"{busy_mesh.redis_url} --interval 0.2"], check=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            shot = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True)
            screen = shot.stdout + shot.stderr
            if "replica-0" in screen and "replica-1" in screen:
                break
            assert time.monotonic() < deadline, screen
            time.sleep(0.2)
        assert "tokens/s" in screen and "serving" in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
