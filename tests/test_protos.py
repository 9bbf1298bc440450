"""protos/ is the single source of truth: the generated Python must match it exactly."""

from __future__ import annotations

import re

from deploy.protogen import proto_files, stale_files
from meshserve.internal.v1 import scheduler_pb2, worker_pb2
from meshserve.v1 import generation_pb2


def test_generated_code_matches_the_protos():
    assert stale_files() == [], "run `python3 -m deploy.protogen` and commit the result"


FIELD = re.compile(r"^(optional |repeated )?[\w.]+ \w+ = \d+;")


def test_every_rpc_and_field_is_commented():
    missing = []
    for path in proto_files():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("rpc ") or FIELD.match(stripped):
                if "//" not in stripped and not lines[i - 1].strip().startswith("//"):
                    missing.append(f"{path.name}:{i + 1}: {stripped}")
    assert missing == []


def test_public_contract_names():
    fields = {f.name for f in generation_pb2.GenerateRequest.DESCRIPTOR.fields}
    assert {"prompt", "prompt_token_ids", "model", "sampling", "request_id"} <= fields
    sampling = {f.name for f in generation_pb2.SamplingParams.DESCRIPTOR.fields}
    assert sampling == {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                        "ignore_eos"}
    assert generation_pb2.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "meshserve.v1.Generation"
    assert {m.name for m in service.methods} == {"Generate", "ListModels"}
    assert scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]
    assert worker_pb2.DESCRIPTOR.services_by_name["Worker"]
