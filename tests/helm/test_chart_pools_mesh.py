"""One LeaderWorkerSet group of the chart, run for real on this machine: the worker pod
(LWS worker index 1: stage 0, its two TP ranks) and the leader pod (scheduler.sh: names its
workers, waits for them, runs the scheduler), with the environment the LeaderWorkerSet
controller gives them, a gateway from the rendered Deployment and a real Redis. Only what a
cluster provides is stood in for: pod DNS names become 127.0.0.1 (the ports stay), /cache this
machine's model cache. Then the leader's preStop hook, run as the kubelet would at scale-down,
under load: it returns once the replica has finished every request and left, none lost."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model.default_model import default_model_dir, ensure_default_model
from tests.helm.chart import FULLNAME, expand, render
from tests.helm.pods import start_lws_pod
from tests.helm.test_chart_mesh import free_ports, spawn, stop
from tests.integration.conftest import replica_records
from tests.serving import logs, wait_for_models, wait_serving

# the real wait for workers, on 127.0.0.1 at the ports of the pod DNS names it is given
LOCAL_WAIT = 'exec /bin/bash "$(dirname "$0")/wait-real.sh" ' \
             '$(printf "%s\\n" "$@" | sed "s/^[^:]*:/127.0.0.1:/")\n'


def test_one_group_serves_and_its_prestop_drain_loses_nothing(redis_url, tmp_path):
    ensure_default_model()
    worker_ports = free_ports(2, consecutive=True)
    gateway_port, scheduler_port, dist_init_port = free_ports(3, avoid=tuple(worker_ports))
    r = render({"lws": {"enabled": True}, "tp": 2, "redis": {"enabled": False, "url": redis_url},
                "gateway": {"port": gateway_port, "httpPort": -1},
                "scheduler": {"port": scheduler_port, "metricsPort": -1, "drainTimeout": 30},
                "worker": {"port": worker_ports[0], "distInitPort": dist_init_port,
                           "metricsPort": -1, "numKvBlocks": 128, "device": "cpu"}})
    name = f"{FULLNAME}-main"
    leader_name = f"{name}-0"
    cache = {"MESHSERVE_CACHE": str(default_model_dir().parents[1]), "OMP_NUM_THREADS": "1"}
    scripts = r.get("ConfigMap", f"{FULLNAME}-scripts")["data"]
    worker = start_lws_pod(r, name, 0, 1, tmp_path, real_env=cache)
    leader = start_lws_pod(r, name, 0, 0, tmp_path, real_env=cache, scripts={
        "wait-for-workers.sh": LOCAL_WAIT, "wait-real.sh": scripts["wait-for-workers.sh"]})
    gateway = r.get("Deployment", f"{FULLNAME}-gateway")
    procs = []
    try:
        (c,) = gateway["spec"]["template"]["spec"]["containers"]
        with open(tmp_path / "log.gateway", "wb") as log:
            procs.append(spawn(c["args"], log))
        address = f"127.0.0.1:{gateway_port}"
        wait_serving(f"127.0.0.1:{scheduler_port}", "meshserve.internal.v1.Scheduler",
                     [worker.proc, leader.proc, *procs], tmp_path, timeout_s=180)
        wait_serving(address, "meshserve.v1.Generation", [worker.proc, leader.proc, *procs],
                     tmp_path)
        assert leader_name in replica_records(redis_url)  # the replica id is the leader pod's
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            wait_for_models(stub, tmp_path)

            def one(i: int) -> int:
                msgs = stub.Generate(pb.GenerateRequest(
                    prompt_token_ids=[1, 5 + i, 9, 17 + i],
                    sampling=pb.SamplingParams(max_tokens=80, ignore_eos=True)), timeout=120)
                return sum(len(m.token_ids) for m in msgs)

            with ThreadPoolExecutor(8) as pool:
                streams = [pool.submit(one, i) for i in range(8)]
                time.sleep(0.5)  # every stream under way
                # the leader container's preStop hook, with its env, as the kubelet runs it
                leader_spec = r.get("LeaderWorkerSet", name)["spec"]["leaderWorkerTemplate"]
                (sc,) = leader_spec["leaderTemplate"]["spec"]["containers"]
                env = {"PATH": f"{leader.pod_dir / 'bin'}:/usr/bin:/bin", "POD_NAME": leader_name,
                       "POD_DIR": str(leader.pod_dir)}
                for e in sc["env"]:
                    if "value" in e:
                        env[e["name"]] = expand([e["value"]], env, strict=False)[0]
                try:
                    hook = subprocess.run(sc["lifecycle"]["preStop"]["exec"]["command"], env=env,
                                          capture_output=True, text=True, timeout=90)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the preStop hook did not return\n{logs(tmp_path)}")
                left = leader_name not in replica_records(redis_url)
                tokens = [s.result() for s in streams]
        assert hook.returncode == 0, hook.stderr
        assert f"replica {leader_name} finished its requests and left" in hook.stdout, \
            f"{hook.stdout}{hook.stderr}\n{logs(tmp_path)}"
        assert left
        assert tokens == [80] * 8  # every stream answered whole: none lost to the drain
        assert leader.proc.wait(timeout=30) == 0, logs(tmp_path)  # it left by itself
        assert worker.stop(timeout_s=30) == 0, logs(tmp_path)
    finally:
        for p in procs:
            stop(p)
        leader.kill()
        worker.kill()
