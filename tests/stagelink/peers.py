"""Stage-link peers that the tests start as real processes (multiprocessing spawn).

Each entry point reads its inputs from `inbox`, puts ("ok", value) or ("error", traceback) on
`outbox`. Tensors never cross the queues: both ends rebuild `cases()` from a fixed seed, and the
receiving end reports what it checked.
"""

from __future__ import annotations

import asyncio
import time
import traceback

import torch

from services.stagelink import ActivationHeader, StageLink, StageLinkError

ONE_MIB = 1 << 20


def cases(seed: int = 0) -> list[tuple[ActivationHeader, torch.Tensor]]:
    """Activations of every kind a link must carry: dtypes, 0 rows, 0 dims, 4 MiB, and both
    sides of the inline limit."""
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(5, 16, generator=g),                                    # float32
        torch.randn(3, 64, generator=g).to(torch.bfloat16),
        torch.randint(-2**40, 2**40, (7,), generator=g),                    # int64
        torch.empty(0, 4096, dtype=torch.bfloat16),                         # 0 rows
        torch.randn(ONE_MIB, generator=g).reshape(1024, 1024),              # 4 MiB float32
        torch.randn(1, 16384, generator=g),             # 64 KiB: the largest inline payload
        torch.randn(1, 16385, generator=g),             # 4 bytes more: a message of its own
        torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        torch.tensor(2.5),                                                  # 0-dim
        torch.empty(0, dtype=torch.int64),
    ]
    return [(ActivationHeader.for_tensor(seed * 100 + i, i % 3, t, meta=(b"mb%d" % i) * i), t)
            for i, t in enumerate(tensors)]  # meta: empty for the first, longer for each next


async def _get(inbox):
    """The next inbox item, with this process's event loop (and UCX progress) still running."""
    return await asyncio.get_running_loop().run_in_executor(None, inbox.get)


def run(entry, inbox, outbox, *args) -> None:
    try:
        torch.set_num_threads(1)
        outbox.put(("ok", asyncio.run(entry(inbox, outbox, *args))))
    except BaseException:
        outbox.put(("error", traceback.format_exc()))


async def _check_received(link: StageLink, seed: int) -> list:
    """Receives len(cases(seed)) activations; returns (header, exact?, dtype, device) each."""
    report = []
    for _, expected in cases(seed):
        header, got = await link.recv()
        exact = got.dtype == expected.dtype and torch.equal(got, expected)
        report.append((header, exact, str(got.dtype), str(got.device)))
    return report


async def receiver(inbox, outbox, seeds: list[int], cancel_first_recv: bool = False):
    """One link per seed, all in this process (one UCX worker), received concurrently.
    With `cancel_first_recv`, a recv() times out before the sender is let go (by the test)."""
    links = [StageLink("cpu") for _ in seeds]
    outbox.put(("address", [await link.start() for link in links]))
    if cancel_first_recv:
        try:
            await asyncio.wait_for(links[0].recv(), 0.2)
        except TimeoutError:
            outbox.put(("timed out", None))
    reports = await asyncio.gather(*(_check_received(link, s) for link, s in zip(links, seeds)))
    cpu_start, idle_cpu_s = time.process_time(), None
    try:  # nothing more comes: a receive waits 0.5 s, which must not keep a core busy
        await asyncio.wait_for(links[0].recv(), 0.5)
    except TimeoutError:
        idle_cpu_s = time.process_time() - cpu_start
    for link in links:
        await link.close()
    return reports, idle_cpu_s


async def sender(inbox, outbox, seeds: list[int], wait_for_go: bool = False):
    """Sends cases(seed) on one link per seed, the links interleaved."""
    addresses = await _get(inbox)
    links = [StageLink("cpu") for _ in seeds]
    for link, address in zip(links, addresses):
        await link.start()
        await link.connect(address)
    if wait_for_go:
        assert await _get(inbox) == "go"

    async def send_all(link, seed):
        for header, tensor in cases(seed):
            await link.send(header, tensor)
            await asyncio.sleep(0)

    await asyncio.gather(*(send_all(link, s) for link, s in zip(links, seeds)))
    for link in links:
        await link.close()
    return len(seeds)


async def forwarder(inbox, outbox, num_messages: int):
    """A middle stage: receives from the previous stage, sends each activation on unchanged."""
    link = StageLink("cpu")
    outbox.put(("address", [await link.start()]))
    await link.connect((await _get(inbox))[0])
    for _ in range(num_messages):
        header, tensor = await link.recv()
        await link.send(header, tensor)
    await link.close()
    return num_messages


async def short_lived(inbox, outbox):
    """Publishes a link address, exits when told: what a crashed next stage leaves behind."""
    link = StageLink("cpu")
    outbox.put(("address", await link.start()))
    assert await _get(inbox) == "exit"
    return "exited"


async def bad_addresses(inbox, outbox):
    """Tries every kind of unusable peer address, and a send to a peer that died; returns the
    StageLinkError text of each."""
    peer_address = await _get(inbox)
    link = StageLink("cpu")
    errors = {}
    try:
        await link.connect(peer_address)
    except StageLinkError as e:
        errors["not_started"] = str(e)
    good = await link.start()
    tampered = bytearray(good)
    tampered[-5] ^= 0xFF
    candidates = {"garbage": b"definitely not a UCX address", "short": good[:10],
                  "truncated": good[:-20], "tampered": bytes(tampered)}
    for name, address in candidates.items():
        try:
            await link.connect(address)
        except StageLinkError as e:
            errors[name] = str(e)
    try:
        await link.send(*cases()[0])
    except StageLinkError as e:
        errors["send_unconnected"] = str(e)

    watched = StageLink("cpu", error_handling=True)
    await watched.start()
    await watched.connect(peer_address)
    await watched.send(*cases()[0])
    outbox.put(("connected", None))
    assert await _get(inbox) == "gone"
    try:
        await asyncio.wait_for(watched.send(*cases()[4]), 10)
    except StageLinkError as e:
        errors["send_to_dead_peer"] = str(e)
    try:
        await link.connect(peer_address)
    except StageLinkError as e:
        errors["dead_peer"] = str(e)
    await link.close()
    await watched.close()
    return errors
