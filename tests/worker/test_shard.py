"""Which activation a stage takes for a plan (pure logic; the link is a scripted stand-in)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.stagelink import ActivationHeader
from services.step import StepPlan
from services.worker.shard import receive_for


class ScriptedLink:
    def __init__(self, items):
        self.items = list(items)

    async def recv(self):
        return self.items.pop(0)


def activation(step: int, epoch: int, value: float):
    tensor = torch.full((1, 4), value)
    return ActivationHeader(step, 0, (1, 4), "float32", epoch.to_bytes(8, "little")), tensor


def test_activations_of_an_earlier_scheduler_are_dropped():
    link = ScriptedLink([activation(41, 7, 1.0), activation(42, 7, 2.0), activation(0, 9, 3.0)])
    hidden = asyncio.run(receive_for(link, StepPlan(0, (), epoch=9)))
    assert hidden[0, 0].item() == 3.0 and link.items == []


def test_a_step_mismatch_within_one_epoch_is_an_error():
    link = ScriptedLink([activation(5, 9, 1.0)])
    with pytest.raises(RuntimeError, match="delivered step 5, plan is step 6"):
        asyncio.run(receive_for(link, StepPlan(6, (), epoch=9)))
