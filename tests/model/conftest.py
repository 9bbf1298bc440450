"""The model tests share the session's checkpoints (tests/conftest.py) and one torch thread."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
