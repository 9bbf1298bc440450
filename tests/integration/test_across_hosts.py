"""A replica whose pipeline stages live on different hosts: network namespaces on this machine
(deploy/netns.py), each with its own address and interface. Redis, the scheduler and the gateway
on host 0, stage 0 on host 1, stage 1 on host 2; every service binds and announces its host's
address, the stage link runs over UCX's TCP transport on the host's own interface (no shared
memory between "hosts"), and the client reaches the gateway from this process's namespace.
Root only (skipped elsewhere)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from deploy.netns import (GATEWAY_PORT as GATEWAY, REDIS_PORT as REDIS,
                          SCHEDULER_PORT as SCHEDULER, WORKER_PORT as WORKER, NamespaceHosts,
                          available, cli, stage_env, start_pp_mesh)
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from tests.integration.conftest import hf_greedy, replica_records
from tests.serving import logs, wait_serving

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "")

PROMPTS = [[1, 50, 60, 70, 80], [1] + list(range(100, 130)), [1, 7]]
NUM_TOKENS = 24


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
@pytest.mark.parametrize("tp", [1, 2])
def test_pp2_with_its_stages_on_two_hosts_gives_transformers_tokens(default_model_dir, tmp_path,
                                                                    tp):
    """PP=2 and TP2 x PP2: each stage (its TP group inside) on a host of its own."""
    with NamespaceHosts(3) as hosts:
        at = hosts.address
        procs = start_pp_mesh(hosts, str(default_model_dir), 2, tmp_path, tp=tp)
        gateway = f"{at(0)}:{GATEWAY}"
        wait_serving(gateway, "meshserve.v1.Generation", procs, tmp_path, timeout_s=90)

        with grpc.insecure_channel(gateway) as channel:
            stub = pb_grpc.GenerationStub(channel)

            def one(prompt):
                sampling = pb.SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
                return [t for m in stub.Generate(pb.GenerateRequest(
                    prompt_token_ids=prompt, sampling=sampling), timeout=120) for t in m.token_ids]

            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                served = list(pool.map(one, PROMPTS))
        expected = [hf_greedy(default_model_dir, p, NUM_TOKENS, stop_at_eos=False)
                    for p in PROMPTS]
        assert served == expected, logs(tmp_path)
        scheduler_log = (tmp_path / "scheduler.log").read_text()
        assert at(0) in scheduler_log and "127.0.0.1" not in scheduler_log
    assert hosts.leftovers() == []


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_cut_stage_link_fails_the_replica_over_and_it_rejoins(default_model_dir, tmp_path):
    """Replica A: PP=2 on hosts 1 and 2; replica B: PP=1 on host 3; both schedulers and the
    gateway on host 0. Host 1's link goes down under 16 streams: A's scheduler finds its stage
    gone (keepalive), leaves the registry, every stream finishes on B with the tokens it would
    have had; with the link back, A's scheduler started again (as the kubelet would) rejoins."""
    with NamespaceHosts(4) as hosts:
        at = hosts.address
        redis_url = f"redis://{at(0)}:{REDIS}/0"
        procs = []

        def start(host: int, name: str, args: list[str], env=None):
            log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 (the child writes it)
            proc = hosts.spawn(host, args, log, {"OMP_NUM_THREADS": "1", **(env or {})})
            procs.append(proc)
            return proc

        def worker(host: int, stage: int, stages: int, name: str):
            return start(host, name, cli(
                "worker", "--model", str(default_model_dir), "--pp-rank", str(stage),
                "--pp-size", str(stages), "--host", at(host), "--port", str(WORKER),
                "--num-kv-blocks", "128", "--device", "cpu"), stage_env(hosts, host))

        def scheduler(name: str, port: int, workers: list[int]):
            return start(0, name, cli(
                "scheduler", "--workers", ",".join(f"{at(h)}:{WORKER}" for h in workers),
                "--redis-url", redis_url, "--host", at(0), "--port", str(port),
                "--advertise-host", at(0), "--replica-id", name, "--heartbeat-ttl", "3"))

        start(0, "redis", ["redis-server", "--bind", at(0), "--port", str(REDIS), "--save", "",
                           "--appendonly", "no"])
        worker(1, 0, 2, "a-pp0"), worker(2, 1, 2, "a-pp1"), worker(3, 0, 1, "b-pp0")
        for host in (1, 2, 3):
            wait_serving(f"{at(host)}:{WORKER}", "", procs, tmp_path, timeout_s=90)
        a = scheduler("a", SCHEDULER, [1, 2])
        scheduler("b", SCHEDULER + 1, [3])
        start(0, "gateway", cli("gateway", "--model", str(default_model_dir), "--redis-url",
                                redis_url, "--host", at(0), "--port", str(GATEWAY),
                                "--http-port", "-1", "--routing-policy", "round-robin"))
        gateway = f"{at(0)}:{GATEWAY}"
        wait_serving(gateway, "meshserve.v1.Generation", procs, tmp_path, timeout_s=90)
        deadline = time.monotonic() + 30
        while set(replica_records(f"redis://{at(0)}:{REDIS}/0")) != {"a", "b"}:
            assert time.monotonic() < deadline, logs(tmp_path)
            time.sleep(0.1)

        prompts = [[1, 20 + i, 30 + i, 40] for i in range(16)]
        tokens = 120
        with grpc.insecure_channel(gateway) as channel:
            stub = pb_grpc.GenerationStub(channel)
            first_token = []

            def one(prompt):
                out = []
                for m in stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt,
                                                          sampling=pb.SamplingParams(
                                                              max_tokens=tokens,
                                                              ignore_eos=True)), timeout=180):
                    out += m.token_ids
                    first_token.append(True)
                return out

            with ThreadPoolExecutor(len(prompts)) as pool:
                streams = [pool.submit(one, p) for p in prompts]
                while len(first_token) < 4 * len(prompts):  # all of them under way
                    time.sleep(0.01)
                hosts.cut(1)
                cut_at = time.monotonic()
                while "a" in replica_records(redis_url):
                    assert time.monotonic() - cut_at < 20, f"A still registered\n{logs(tmp_path)}"
                    time.sleep(0.05)
                detected_s = time.monotonic() - cut_at
                served = [s.result() for s in streams]
        expected = [hf_greedy(default_model_dir, p, tokens, stop_at_eos=False) for p in prompts]
        assert served == expected, logs(tmp_path)
        assert detected_s < 10, detected_s  # keepalive 1 + 2 s (link.py), then it leaves
        assert a.wait(timeout=30) != 0  # it failed (its stage is gone) and said so
        print(f"replica A left the registry {detected_s:.2f} s after its link was cut")
        # and said which stage it lost
        assert f"worker {at(1)}:{WORKER} failed: the step stream broke" in (
            tmp_path / "a.log").read_text()

        hosts.mend(1)  # the link is back; the kubelet restarts the failed scheduler
        scheduler("a", SCHEDULER, [1, 2])
        deadline = time.monotonic() + 60
        while "a" not in replica_records(redis_url):
            assert time.monotonic() < deadline, f"A did not rejoin\n{logs(tmp_path)}"
            time.sleep(0.2)
    assert hosts.leftovers() == []
