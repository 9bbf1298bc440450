"""Redis is where replicas are found, not on any request's path: while it is down, and after
it comes back empty, every request completes (client-chosen ids included)."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import generate

PROMPT = [1, 5, 9, 13, 17]


def test_requests_complete_while_redis_is_down_and_after_it_restarts_empty(default_model_dir):
    with LocalMesh(MeshSpec(port=0, http_port=-1,
                            worker_args=("--num-kv-blocks", "64"))) as mesh, \
            grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        expected = generate(stub, max_tokens=6, prompt_token_ids=PROMPT)[0]
        results, failures, stop = [], [], threading.Event()

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    ids = generate(stub, max_tokens=6, prompt_token_ids=PROMPT,
                                   request_id=f"client-{n}-{i}")[0]
                    results.append((time.monotonic(), ids))
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(mesh.redis.pid, signal.SIGKILL)
        down_at = time.monotonic()
        time.sleep(1.5)
        mesh.supervise()  # what `meshserve up` does every second: Redis comes back, empty
        up_at = time.monotonic()
        time.sleep(4.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    assert all(ids == expected for _, ids in results)
    assert sum(down_at < t < up_at for t, _ in results) >= 4  # served while Redis was down
    assert sum(t > up_at + 1.0 for t, _ in results) >= 4  # and once it was back
