"""The README's first command: `meshserve demo` with no model serves SmolLM2-135M-Instruct, and
it answers in English; its served greedy tokens equal transformers' on the converted folder."""

from __future__ import annotations

import subprocess
import sys

import grpc

from deploy.launcher import LocalMesh, MeshSpec
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model import packaged_models
from tests.integration.conftest import generate, hf_greedy


def test_demo_with_no_model_names_the_capital_of_france():
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "demo", "--max-tokens", "8",
                           "The capital of France is"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout, done.stdout + done.stderr


def test_served_greedy_tokens_equal_transformers():
    model_dir = packaged_models.ensure()
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    spec = MeshSpec(model=str(model_dir), port=0)
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.gateway_address) as channel:
        ids, text, _ = generate(pb_grpc.GenerationStub(channel), max_tokens=32,
                                prompt_token_ids=prompt)
    assert ids == hf_greedy(model_dir, prompt, 32)
    assert text.startswith(" Paris.")
