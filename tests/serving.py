"""Waiting on real mesh processes, as the tests that start them by hand need: for a gRPC health
answer (what a kubelet's probe asks), for the gateway to list a model, and the processes' logs
for the failure message."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import generation_pb2 as pb


def logs(log_dir: Path) -> str:
    """The tail of every log file under log_dir (named log* or *.log)."""
    files = {p for p in [*log_dir.rglob("log*"), *log_dir.rglob("*.log")] if p.is_file()}
    return "\n".join(f"--- {p.relative_to(log_dir)} ---\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(files))


def wait_serving(address: str, service: str, procs, log_dir: Path, timeout_s: float = 120) -> None:
    """Until grpc.health.v1.Health/Check(service) at address says SERVING; fails if one of procs
    exits first or time runs out, with the logs."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            dead = [p.args for p in procs if p.poll() is not None]
            assert not dead, f"exited: {dead}\n{logs(log_dir)}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{address} not serving\n{logs(log_dir)}"
            time.sleep(0.2)


def wait_for_models(stub, log_dir: Path, timeout_s: float = 60) -> list:
    """The gateway's ListModels once it lists one (a replica registered and was seen)."""
    deadline = time.monotonic() + timeout_s
    while not (models := stub.ListModels(pb.ListModelsRequest(), timeout=5).models):
        assert time.monotonic() < deadline, logs(log_dir)
        time.sleep(0.2)
    return list(models)
