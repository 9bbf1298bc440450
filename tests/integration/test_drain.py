"""Scale-down is graceful: a replica told to stop (SIGTERM to its processes, as Kubernetes
sends, or `meshserve drain`) takes no new requests, finishes those it has, then leaves the
registry. No request fails and none is recomputed elsewhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import (generate, replica_addresses, replica_records,
                                        scheduler_stats)

NUM_TOKENS = 120
PROMPTS = [[1] + [(5 * i + j) % 200 + 3 for j in range(6 + i)] for i in range(8)]


def _greedy(stub, prompt) -> list[int]:
    return generate(stub, prompt_token_ids=prompt,
                    sampling=pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True))[0]


def _drain_under_load(mesh: LocalMesh, stub, stop_replica) -> None:
    """Streams PROMPTS twice over while stop_replica() stops replica-0 mid-way; checks that
    every stream completes with the tokens of a quiet run and that replica-0 left the
    registry only after its last request."""
    expected = {i: _greedy(stub, p) for i, p in enumerate(PROMPTS)}
    seen, done = [], threading.Event()

    def watch():  # replica-0's record while it drains
        while not done.is_set():
            seen.append(replica_records(mesh.redis_url).get("replica-0"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    with ThreadPoolExecutor(16) as pool:
        first = [pool.submit(_greedy, stub, p) for p in PROMPTS]
        deadline = time.monotonic() + 30
        while scheduler_stats(mesh, "replica-0").num_running == 0:
            assert time.monotonic() < deadline, "replica-0 never got a request"
            time.sleep(0.02)
        watcher.start()
        stop_replica()
        second = [pool.submit(_greedy, stub, p) for p in PROMPTS]  # arrive while it drains
        results = [f.result() for f in first + second]
    scheduler = next(c for c in mesh.children if c.name == "replica-0-scheduler")
    assert scheduler.proc.wait(timeout=60) == 0
    done.set()
    watcher.join()
    assert results == [expected[i] for i in range(len(PROMPTS))] * 2
    assert any(r is not None and r.draining for r in seen)  # it said so while it finished
    assert "replica-0" not in replica_addresses(mesh.redis_url)
    gateway_log = next(c for c in mesh.children if c.name == "gateway").log.read_text()
    assert "recomputed there" not in gateway_log


def test_sigterm_to_a_replica_under_load_fails_and_recomputes_nothing(default_model_dir):
    spec = MeshSpec(port=0, http_port=-1, replicas=2, worker_args=("--num-kv-blocks", "128"))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def sigterm_every_process_of_replica_0():  # as Kubernetes scales a replica down
            for child in mesh.children:
                if child.name.startswith("replica-0-"):
                    os.killpg(child.proc.pid, signal.SIGTERM)

        _drain_under_load(mesh, stub, sigterm_every_process_of_replica_0)
        worker = next(c for c in mesh.children if c.name == "replica-0-worker-pp0-tp0")
        assert worker.proc.wait(timeout=30) == 0  # it left with its scheduler


def test_meshserve_drain_marks_the_replica_and_it_leaves_once_idle(default_model_dir):
    """`meshserve drain --wait`, the chart's preStop hook: it returns once the replica has
    finished its requests and left, while later requests went elsewhere."""
    spec = MeshSpec(port=0, http_port=-1, replicas=2, worker_args=("--num-kv-blocks", "128"))
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        hook = ThreadPoolExecutor(1)  # a preStop hook runs beside the pod's processes

        def drain() -> tuple[subprocess.CompletedProcess, dict]:
            out = subprocess.run([sys.executable, "-m", "deploy.cli", "drain", "--redis-url",
                                  mesh.redis_url, "--wait", "60", "replica-0"],
                                 capture_output=True, text=True, timeout=90)
            return out, replica_records(mesh.redis_url)

        def meshserve_drain_replica_0():
            hook_result.append(hook.submit(drain))

        hook_result = []

        _drain_under_load(mesh, stub, meshserve_drain_replica_0)
        out, records_then = hook_result[0].result(timeout=90)
        assert out.returncode == 0, out.stderr
        assert "replica-0 finished its requests and left" in out.stdout
        assert "replica-0" not in records_then  # it returned only once the replica had left
        missing = subprocess.run([sys.executable, "-m", "deploy.cli", "drain", "--redis-url",
                                  mesh.redis_url, "replica-0"], capture_output=True, text=True,
                                 timeout=60)
        assert missing.returncode == 1 and "no live replica 'replica-0'" in missing.stderr
