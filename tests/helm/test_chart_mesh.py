"""The chart's commands, run for real on this machine: one replica with tp=2 (one worker pod
whose worker.sh starts both ranks), its scheduler after its init container, and the gateway,
against a real Redis. Only what a cluster provides is stood in for: pod DNS names and the pod
IP become 127.0.0.1, /cache becomes this machine's model cache. The rest is the manifest."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from deploy.launcher import free_port
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model.default_model import default_model_dir, ensure_default_model
from tests.helm.chart import FULLNAME, container, expand, render
from tests.helm.pods import start_worker_pod
from tests.serving import logs, wait_for_models, wait_serving

LOCAL = {"POD_IP": "127.0.0.1"}


def free_ports(count: int, consecutive: bool = False, avoid: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct ports free now (`consecutive`: p, p + 1, ...), none of `avoid`."""
    for _ in range(100):
        if consecutive:
            base = free_port()
            ports = list(range(base, base + count))
        else:
            ports = list({free_port() for _ in range(count)})
        if len(ports) == count and not set(ports) & set(avoid) and all(map(_is_free, ports)):
            return ports
    raise RuntimeError("no free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def to_local(workers: str) -> str:
    return ",".join(f"127.0.0.1:{a.rsplit(':', 1)[1]}" for a in workers.split(","))


def spawn(args: list[str], log) -> subprocess.Popen:
    """The image's entrypoint (`meshserve`) with a container's args."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 15) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def test_the_rendered_commands_make_a_working_mesh(redis_url, tmp_path):
    ensure_default_model()
    worker_ports = free_ports(2, consecutive=True)
    gateway_port, scheduler_port, dist_init_port = free_ports(3, avoid=tuple(worker_ports))
    r = render({"tp": 2, "redis": {"enabled": False, "url": redis_url},
                "gateway": {"port": gateway_port}, "scheduler": {"port": scheduler_port},
                "worker": {"port": worker_ports[0], "distInitPort": dist_init_port,
                           "numKvBlocks": 64, "device": "cpu"}})
    sts = r.worker_sets()[0]
    scheduler = [d for d in r.of_kind("Deployment") if d["metadata"]["name"].endswith("-scheduler")][0]
    gateway = [d for d in r.of_kind("Deployment") if d["metadata"]["name"].endswith("-gateway")][0]
    init = container(scheduler, "wait-for-workers", init=True)
    scheduler_args = expand(container(scheduler, "scheduler")["args"], LOCAL)
    workers_at = scheduler_args.index("--workers") + 1
    scheduler_args[workers_at] = to_local(scheduler_args[workers_at])

    cache = {"MESHSERVE_CACHE": str(default_model_dir().parents[1]), "OMP_NUM_THREADS": "1"}
    pod = start_worker_pod(r, sts["metadata"]["name"], 0, tmp_path, real_env=cache)
    procs = []
    try:
        scripts = r.get("ConfigMap", f"{FULLNAME}-scripts")
        (tmp_path / "init.sh").write_text(scripts["data"]["wait-for-workers.sh"])
        try:  # the scheduler's init container: until both ranks listen (TP group formed)
            wait = subprocess.run(["/bin/bash", str(tmp_path / "init.sh"),
                                   *to_local(",".join(init["args"])).split(",")],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the workers never listened\n{logs(tmp_path)}")
        assert wait.returncode == 0, f"{wait.stdout}\n{logs(tmp_path)}"
        with open(tmp_path / "log.scheduler", "wb") as log:
            procs.append(spawn(scheduler_args, log))
        with open(tmp_path / "log.gateway", "wb") as log:
            procs.append(spawn(container(gateway, "gateway")["args"], log))
        address = f"127.0.0.1:{gateway_port}"
        for service in ("", "meshserve.v1.Generation"):
            wait_serving(address, service, [pod.proc, *procs], tmp_path)

        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            (model,) = wait_for_models(stub, tmp_path)
            assert model.num_replicas == 1
            msgs = list(stub.Generate(pb.GenerateRequest(
                prompt="The mesh", sampling=pb.SamplingParams(max_tokens=6)), timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == 6
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH

        # SIGTERM as at a rollout: every process ends cleanly, the worker pod with status 0
        assert [stop(p) for p in reversed(procs)] == [0, 0], logs(tmp_path)
        assert pod.stop(timeout_s=20) == 0, logs(tmp_path)
    finally:
        for p in procs:
            stop(p)
        pod.kill()
    ranks = sorted(argv[argv.index("--tp-rank") + 1] for argv in pod.argvs())
    assert ranks == ["0", "1"]
