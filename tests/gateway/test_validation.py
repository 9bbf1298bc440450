"""Request checks: each bad input gets a message that says what to change."""

import pytest

from gateway.validation import InvalidRequest, ModelLimits, check_length, check_request
from meshserve.v1 import generation_pb2 as pb

LIMITS = ModelLimits("tiny", max_context_tokens=100, vocab_size=512)


def request(**fields):
    fields.setdefault("sampling", pb.SamplingParams(max_tokens=4))
    return pb.GenerateRequest(**fields)


def test_a_good_request_passes():
    check_request(request(prompt="hi"), LIMITS)
    check_request(request(prompt_token_ids=[1, 511], model="tiny"), LIMITS)
    check_length(10, 90, LIMITS)


@pytest.mark.parametrize("fields,message", [
    (dict(prompt=""), "prompt_token_ids and messages (the prompt is empty)"),
    (dict(prompt="a", prompt_token_ids=[3]), "given twice"),
    (dict(prompt="a", model="other"), "unknown model 'other'; this gateway serves 'tiny'"),
    (dict(prompt_token_ids=[3, 512]), "holds 512, outside the vocabulary [0, 512)"),
    (dict(prompt="a", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens must be >= 1"),
    (dict(prompt="a", sampling=pb.SamplingParams(max_tokens=1, temperature=-0.5)),
     "temperature must be >= 0"),
    (dict(prompt="a", sampling=pb.SamplingParams(max_tokens=1, temperature=float("nan"))),
     "temperature must be >= 0"),
    (dict(prompt="a", sampling=pb.SamplingParams(max_tokens=1, top_p=1.01)), "top_p must be in"),
    (dict(prompt="a", sampling=pb.SamplingParams(max_tokens=1, stop=[""])), "non-empty strings"),
])
def test_bad_requests(fields, message):
    with pytest.raises(InvalidRequest) as err:
        check_request(request(**fields), LIMITS)
    assert message in str(err.value)


def test_length_limits_name_the_numbers():
    with pytest.raises(InvalidRequest, match="prompt has 100 tokens; the context of 'tiny' is 100"):
        check_length(100, 1, LIMITS)
    with pytest.raises(InvalidRequest, match="lower max_tokens to at most 30"):
        check_length(70, 31, LIMITS)
    with pytest.raises(InvalidRequest, match="empty after tokenization"):
        check_length(0, 1, LIMITS)
