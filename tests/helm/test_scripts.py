"""The chart's two shell scripts, run here: the worker pod's entrypoint (stage = pod, one
process per TP rank) and the scheduler's wait for its workers."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.helm.chart import FULLNAME, render
from tests.helm.pods import start_worker_pod

STS = "demo-meshserve-r0-worker"


@pytest.fixture(scope="module")
def tp4():
    return render({"tp": 4, "pp": 2})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_rank_that_exits_takes_its_stage_down(tp4, tmp_path):
    """A TP group cannot take a rank back: when one rank ends, the others are stopped and the
    pod exits with that rank's status, so the kubelet restarts the stage whole."""
    pod = start_worker_pod(tp4, STS, 1, tmp_path, fail_rank=2)
    try:
        pod.wait_for(4)
        assert pod.proc.wait(10) == 3
    finally:
        pod.kill()
    pids = pod.pids()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def test_sigterm_stops_every_rank_and_the_pod_exits_zero(tp4, tmp_path):
    pod = start_worker_pod(tp4, STS, 0, tmp_path)
    try:
        pod.wait_for(4)
        pids = pod.pids()
        assert len(pids) == 4 and all(alive(pid) for pid in pids)
        assert pod.stop() == 0
    finally:
        pod.kill()
    assert not any(alive(pid) for pid in pids)


def wait_for_workers(addresses: list[str], tmp_path) -> subprocess.Popen:
    r = render({"tp": 2})
    scripts = r.get("ConfigMap", f"{FULLNAME}-scripts")
    script = tmp_path / "wait-for-workers.sh"
    script.write_text(scripts["data"]["wait-for-workers.sh"])
    return subprocess.Popen(["/bin/bash", str(script), *addresses], stdout=subprocess.PIPE,
                            text=True)


def test_scheduler_init_waits_until_every_worker_listens(tmp_path):
    first = socket.create_server(("127.0.0.1", 0))
    late = socket.socket()
    late.bind(("127.0.0.1", 0))  # reserved, not listening yet
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in (first, late)]
    proc = wait_for_workers(addresses, tmp_path)
    try:
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting for the second worker
        late.listen()
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        first.close()
        late.close()
    assert proc.returncode == 0
    assert f"waiting for worker {addresses[1]}" in out
    assert f"waiting for worker {addresses[0]}" not in out
    assert out.rstrip().endswith("all 2 workers are up")
