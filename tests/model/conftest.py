"""Checkpoints shared by the model tests, written once per session into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.model.default_model import write_tiny_checkpoint
from tests.checkpoints import GQA_CONFIG, save_hf_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("gqa"), tiny_dir, **GQA_CONFIG)
