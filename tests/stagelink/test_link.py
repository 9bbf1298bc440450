"""StageLink between real processes over real UCX (shared memory / TCP on this machine).

Addresses travel through multiprocessing queues here, as they travel through the scheduler in
the mesh. The receiving process checks every tensor bit for bit against the same seeded cases.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys

import pytest

from services.stagelink import StageLink, StageLinkError
from services.stagelink import engine as engine_module
from tests.stagelink import peers

TIMEOUT_S = 60
_spawn = mp.get_context("spawn")


class Peer:
    """One spawned process running a `peers` entry point, with its two queues."""

    def __init__(self, entry, *args):
        self.inbox, self.outbox = _spawn.Queue(), _spawn.Queue()
        self.process = _spawn.Process(target=peers.run, daemon=True,
                                      args=(entry, self.inbox, self.outbox, *args))
        self.process.start()

    def get(self, expected_kind: str):
        kind, value = self.outbox.get(timeout=TIMEOUT_S)
        assert kind == expected_kind, value
        return value

    def result(self):
        value = self.get("ok")
        self.process.join(TIMEOUT_S)
        return value

    def stop(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join(TIMEOUT_S)


@pytest.fixture
def spawn():
    started: list[Peer] = []

    def start(entry, *args) -> Peer:
        started.append(Peer(entry, *args))
        return started[-1]

    yield start
    for peer in started:
        peer.stop()


def _expected(seed: int) -> list[tuple]:
    return [(header, True, str(tensor.dtype), "cpu") for header, tensor in peers.cases(seed)]


def test_two_processes_exact_and_in_order_on_two_links(spawn):
    # Two links end in the receiving process (one UCX worker); the sender interleaves them, so
    # a tag shared between links would deliver a tensor to the wrong one. The receiver's first
    # recv() times out before anything is sent: no activation may be lost to it.
    seeds = [1, 2]
    receiver = spawn(peers.receiver, seeds, True)
    sender = spawn(peers.sender, seeds, True)
    sender.inbox.put(receiver.get("address"))
    receiver.get("timed out")
    sender.inbox.put("go")
    assert sender.result() == len(seeds)
    reports, idle_cpu_s = receiver.result()
    assert reports == [_expected(s) for s in seeds]
    assert idle_cpu_s < 0.2  # of 0.5 s waiting for a message that never comes: no busy loop
    headers = [r[0] for r in reports[0]]
    assert [h.step_id for h in headers] == list(range(100, 100 + len(headers)))
    assert headers[3].shape == (0, 4096) and headers[4].nbytes == 4 << 20
    assert headers[0].meta == b"" and headers[2].meta == b"mb2mb2"


def test_two_hop_chain_forwards_unchanged(spawn):
    last = spawn(peers.receiver, [3])
    middle = spawn(peers.forwarder, len(peers.cases(3)))
    first = spawn(peers.sender, [3])
    middle.inbox.put(last.get("address"))
    first.inbox.put(middle.get("address"))
    assert first.result() == 1
    assert middle.result() == len(peers.cases(3))
    assert last.result()[0] == [_expected(3)]


def test_bad_peer_addresses_raise_clear_errors(spawn):
    peer = spawn(peers.short_lived)
    checker = spawn(peers.bad_addresses)
    checker.inbox.put(peer.get("address"))
    checker.get("connected")
    peer.inbox.put("exit")
    assert peer.result() == "exited"
    checker.inbox.put("gone")
    errors = checker.result()
    assert set(errors) == {"not_started", "garbage", "short", "truncated", "tampered",
                           "send_unconnected", "send_to_dead_peer", "dead_peer"}
    assert "start() first" in errors["not_started"]
    assert "not a stage link address" in errors["garbage"]
    assert "too short" in errors["short"]
    assert "truncated or corrupted" in errors["truncated"]
    assert "truncated or corrupted" in errors["tampered"]
    assert "connect()" in errors["send_unconnected"]
    # With error handling on, a peer that died is an error, not a stall.
    assert errors["send_to_dead_peer"].startswith("sending step 4 micro-batch 1")
    assert "cannot reach the next stage" in errors["dead_peer"]


def test_missing_ucxx_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(engine_module, "_engine", None)
    monkeypatch.setitem(sys.modules, "ucxx", None)  # what `import ucxx` sees when not installed
    with pytest.raises(StageLinkError, match="pip install ucxx-cu12"):
        asyncio.run(StageLink("cpu").start())
