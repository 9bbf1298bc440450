"""The stage link between two namespace hosts against the same link on one host (root only):
activations/s and bytes/s of StageLink sends, side by side in one run.

    sudo python bench/bench_stagelink_hosts.py [--hidden 4096] [--tokens 1 16 256] [--count 200]

Three placements of the sending and the receiving stage (one process each, deploy/netns.py):

    one host, UCX's choice     both on host 0, UCX picks its transports (shared memory here)
    one host, TCP              both on host 0, UCX_TLS=tcp,self over the host's interface
    two hosts, TCP             sender on host 0, receiver on host 1, the same transports

The receiver times WARMUP + count activations of [tokens, hidden] float32 from the first one
after the warm-up to the last and prints bytes/s; the median of --rounds rounds. Prints one
markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WARMUP = 20


async def receive(tokens: list[int], hidden: int, count: int) -> None:
    from services.stagelink import StageLink

    link = StageLink("cpu")
    print((await link.start()).hex(), flush=True)
    for num_tokens in tokens:
        for _ in range(WARMUP):
            await link.recv()
        start = time.perf_counter()
        for _ in range(count):
            await link.recv()
        elapsed = time.perf_counter() - start
        print(json.dumps({"tokens": num_tokens, "bytes_per_s": count * num_tokens * hidden * 4
                          / elapsed, "per_s": count / elapsed}), flush=True)
    await link.close()


async def send(peer: str, tokens: list[int], hidden: int, count: int) -> None:
    import torch

    from services.stagelink import ActivationHeader, StageLink

    link = StageLink("cpu")
    await link.start()
    await link.connect(bytes.fromhex(peer))
    for num_tokens in tokens:
        tensor = torch.randn(num_tokens, hidden)
        for step in range(WARMUP + count):
            await link.send(ActivationHeader.for_tensor(step, 0, tensor), tensor)
    await asyncio.sleep(1.0)  # let the last sends drain before the link closes
    await link.close()


def one_round(hosts, placement: str, a) -> dict[int, dict]:
    """{tokens: {"bytes_per_s", "per_s"}} of one placement: receiver and sender processes in
    their hosts' namespaces, the receiver's link address passed to the sender."""
    from deploy.netns import stage_env

    receiver_host = 1 if placement == "two hosts, TCP" else 0
    tcp = placement != "one host, UCX's choice"
    role = [sys.executable, __file__, "--tokens", *map(str, a.tokens), "--hidden",
            str(a.hidden), "--count", str(a.count), "--role"]

    def run(host: int, args: list[str], **kwargs) -> subprocess.Popen:
        env = {**os.environ, **(stage_env(hosts, host) if tcp else {})}
        return subprocess.Popen(["ip", "netns", "exec", hosts.name(host), *args], env=env,
                                **kwargs)

    receiver = run(receiver_host, [*role, "receive"], stdout=subprocess.PIPE, text=True)
    address = receiver.stdout.readline().strip()
    sender = run(0, [*role, "send", "--peer", address])
    results = {}
    for _ in a.tokens:
        row = json.loads(receiver.stdout.readline())
        results[row["tokens"]] = row
    sender.wait(60)
    receiver.wait(60)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--role", choices=("receive", "send"), default=None)
    p.add_argument("--peer", default="")
    a = p.parse_args()
    if a.role == "receive":
        asyncio.run(receive(a.tokens, a.hidden, a.count))
        return
    if a.role == "send":
        asyncio.run(send(a.peer, a.tokens, a.hidden, a.count))
        return
    from bench.common import machine
    from deploy.netns import NamespaceHosts, available

    if why := available():
        sys.exit(f"error: {why}")
    placements = ("one host, UCX's choice", "one host, TCP", "two hosts, TCP")
    runs: dict[str, list[dict]] = {pl: [] for pl in placements}
    with NamespaceHosts(2) as hosts:
        for _ in range(a.rounds):
            for placement in placements:
                runs[placement].append(one_round(hosts, placement, a))
    print(f"\n### The stage link across namespace hosts vs on one host (`sudo python "
          f"bench/bench_stagelink_hosts.py`)\n\nMachine: {machine()}; activations "
          f"[tokens, {a.hidden}] float32, {a.count} per figure, median of {a.rounds} rounds\n")
    print("| tokens | bytes | " + " | ".join(f"{pl}: MB/s, activations/s" for pl in placements)
          + " | two hosts / one host, TCP |")
    print("|---:|---:|" + "---:|" * (len(placements) + 1))
    for num_tokens in a.tokens:
        cells, rates = [], {}
        for pl in placements:
            bps = statistics.median(r[num_tokens]["bytes_per_s"] for r in runs[pl])
            per_s = statistics.median(r[num_tokens]["per_s"] for r in runs[pl])
            rates[pl] = bps
            cells.append(f"{bps / 1e6:,.0f}, {per_s:,.0f}")
        ratio = rates["two hosts, TCP"] / rates["one host, TCP"]
        print(f"| {num_tokens} | {num_tokens * a.hidden * 4:,} | " + " | ".join(cells)
              + f" | {ratio:.2f} |")


if __name__ == "__main__":
    main()
