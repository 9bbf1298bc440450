"""The public gRPC API under generated requests, valid and not: every answer is a complete
stream or one of the documented refusals (never UNKNOWN or INTERNAL), the replica stays up,
every KV block comes back, and a good request afterwards gets the same tokens as before.

CI runs a few hundred examples; `MESHSERVE_FUZZ_EXAMPLES=10000 python3 -m pytest
tests/integration/test_fuzz.py` runs a long session (a few minutes on 2 cores)."""

from __future__ import annotations

import os
import time

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.v1 import generation_pb2 as pb
from tests.integration.conftest import NUM_KV_BLOCKS, generate, scheduler_stats

EXAMPLES = int(os.environ.get("MESHSERVE_FUZZ_EXAMPLES", "200"))
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ALREADY_EXISTS}
UINT32 = st.integers(0, 2**32 - 1)


def mostly(usual, odd):
    """usual nine times in ten, else odd: enough valid requests reach the scheduler."""
    return st.sampled_from(range(10)).flatmap(lambda i: odd if i == 9 else usual)


text = st.text(max_size=40) | st.sampled_from(["", "Hello", "é" * 300, "😀" * 100])
sampling = st.builds(
    pb.SamplingParams,
    max_tokens=mostly(st.integers(1, 8), st.sampled_from([0, 2**32 - 1, 5000])),
    temperature=mostly(st.sampled_from([0.0, 0.7, 1.0]) | st.floats(0, 2, width=32),
                       st.floats(width=32) | st.sampled_from([1e-40, -1.0])),
    top_p=mostly(st.sampled_from([0.0, 0.9, 1.0]), st.floats(width=32)),
    top_k=mostly(st.integers(0, 50), UINT32),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop=mostly(st.lists(st.text(min_size=1, max_size=4), max_size=2), st.lists(text, max_size=18)),
    ignore_eos=st.booleans())


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """One prompt in one of the three forms (sometimes none or two), and odd fields now and then."""
    forms = draw(mostly(st.sampled_from([("prompt",), ("ids",)]),
                        st.sampled_from([(), ("messages",), ("prompt", "ids"),
                                         ("ids", "messages")])))
    request = pb.GenerateRequest(
        model=draw(mostly(st.just(""), st.sampled_from(["meshserve-tiny-llama"]) | text)),
        request_id=draw(mostly(st.just(""), text)),
        cache_salt=draw(mostly(st.just(""), text)))
    if "prompt" in forms:
        request.prompt = draw(mostly(st.text(min_size=1, max_size=40), text))
    if "ids" in forms:
        request.prompt_token_ids.extend(draw(st.lists(
            mostly(st.integers(0, 255), UINT32), min_size=1, max_size=12)))
    if "messages" in forms:
        request.messages.extend(draw(st.lists(st.builds(
            pb.ChatMessage, role=st.sampled_from(["user", "system", ""]), content=text),
            max_size=3)))
    if (params := draw(mostly(sampling, st.none()))) is not None:
        request.sampling.CopyFrom(params)
    return request


def _answer(stub, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        last = None
        for last in stub.Generate(request, timeout=60):
            pass
    except grpc.RpcError as err:
        return err.code()
    assert last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED, request
    return grpc.StatusCode.OK


def test_generated_requests_get_documented_answers_and_nothing_leaks(mesh, stub):
    good = pb.GenerateRequest(prompt="The mesh serves tokens",
                              sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True))
    before = generate(stub, **{f.name: v for f, v in good.ListFields()})[0]
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests())
    def one(request: pb.GenerateRequest) -> None:
        code = _answer(stub, request)
        seen[code] = seen.get(code, 0) + 1
        assert code == grpc.StatusCode.OK or code in REFUSALS, (code, request)

    one()
    print({code.name: n for code, n in seen.items()})
    assert seen.get(grpc.StatusCode.OK, 0) > 0 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0)
    deadline = time.monotonic() + 10
    while scheduler_stats(mesh).num_free_kv_blocks != NUM_KV_BLOCKS:
        assert time.monotonic() < deadline, "KV blocks did not all come back"
        time.sleep(0.05)
    assert generate(stub, **{f.name: v for f, v in good.ListFields()})[0] == before
