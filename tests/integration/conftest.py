"""A real mesh (redis-server, worker, scheduler, gateway processes) started once per session,
and the transformers reference it is measured against."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from functools import lru_cache

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model.default_model import ensure_default_model
from services.registry import Registry

NUM_KV_BLOCKS = 256


@pytest.fixture(scope="session")
def default_model_dir():
    return ensure_default_model()


@pytest.fixture(scope="session")
def mesh(default_model_dir):
    spec = MeshSpec(port=0, worker_args=("--num-kv-blocks", str(NUM_KV_BLOCKS)))
    with LocalMesh(spec) as running:
        yield running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a mesh carries the log tails of every mesh process that has
    exited: a replica that died explains itself in CI's output."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, LocalMesh):
            dead = [c for c in value.children if c.proc.poll() is not None]
            for child in dead:
                lines = child.log.read_text(errors="replace").splitlines()[-40:]
                report.sections.append((f"{child.name} exited ({child.proc.returncode})",
                                        "\n".join(lines)))


@pytest.fixture(scope="session")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        yield pb_grpc.GenerationStub(channel)


def replica_records(redis_url: str) -> dict:
    """{replica id: its ReplicaRecord} of every live replica in the registry."""
    async def read():
        async with Registry(redis_url) as registry:
            return {r.replica_id: r for r in await registry.list_replicas()}

    return asyncio.run(read())


def replica_addresses(redis_url: str) -> dict[str, str]:
    return {rid: r.address for rid, r in replica_records(redis_url).items()}


def scheduler_stats(mesh: LocalMesh, replica_id: str = "replica-0") -> scheduler_pb2.ReplicaStats:
    address = replica_addresses(mesh.redis_url)[replica_id]
    with grpc.insecure_channel(address) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


def generate(stub, max_tokens: int = 16, **request) -> tuple[list[int], str, pb.GenerateResponse]:
    """Runs one request to the end: (all token ids, all text, last message)."""
    sampling = request.pop("sampling", None) or pb.SamplingParams(max_tokens=max_tokens)
    ids, text, last = [], "", None
    for msg in stub.Generate(pb.GenerateRequest(sampling=sampling, **request), timeout=120):
        ids += msg.token_ids
        text += msg.text
        last = msg
    return ids, text, last


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of every meshserve sample."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("meshserve:") for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum over the samples of name whose labels include these."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


@lru_cache(maxsize=4)
def _hf_model(path: str):
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int,
              stop_at_eos: bool = True) -> list[int]:
    """transformers' greedy generate on the same checkpoint: the reference."""
    model = _hf_model(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=model.config.eos_token_id
                             if stop_at_eos else None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@contextmanager
def extra_gateway(mesh: LocalMesh, tmp_dir, *args: str):
    """A second gateway process in front of the mesh's replicas; yields a channel to it."""
    ready = tmp_dir / "gateway.address"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "gateway", "--redis-url",
                             mesh.redis_url, "--port", "0", "--ready-file", str(ready), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        with grpc.insecure_channel(ready.read_text()) as channel:
            yield channel
    finally:
        proc.terminate()
        proc.wait(timeout=30)
