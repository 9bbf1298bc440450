"""Shared fixtures.

Redis: one private redis-server for the whole session (`redis_url`); a test that needs an empty
database asks for `clean_redis`, which flushes it first and gives the same URL.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import torch

# Triton kernels run in Triton's interpreter on machines without a GPU (set before any import
# of triton: its decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deploy.redis_server import RedisServer  # noqa: E402
from services.model.default_model import write_tiny_checkpoint  # noqa: E402
from tests.checkpoints import GQA_CONFIG, save_hf_llama  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def triton_interpreter_fixes():
    """Kernels in Triton's interpreter: the two fixes of tests/triton_interpreter.py."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        from tests.triton_interpreter import patched

        mp = patched()
    except ImportError:  # no triton: its tests skip
        yield
        return
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny checkpoint, written once per session."""
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("gqa"), tiny_dir, **GQA_CONFIG)


@pytest.fixture(scope="session")
def redis_url():
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def clean_redis(redis_url):
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


# -- mesh fixtures (real processes) ---------------------------------------------------------------
