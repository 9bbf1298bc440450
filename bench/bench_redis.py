"""How many routed requests per second one Redis carries. For each prompt length, the prefix
lookup one routed request makes: its commands counted on the server (INFO commandstats, around
real lookups), then `redis-benchmark` driving that same command shape at the server; the lookup
the router uses (Registry.longest_prefix: one pipelined SMISMEMBER per replica, every block asked)
beside a Lua script that stops at each replica's first miss (fewer member checks, but one
SISMEMBER call from Lua per block), in one run.

    python bench/bench_redis.py [--replicas 4] [--blocks 17,64,256] [--clients 50]

Two placements of the cached prefix: on every replica half of the prompt's blocks (the lookup's
worst case), and on one replica all of them, on the others none (what routing by prefix makes
of a shared prefix). redis-benchmark reports commands per second: one script call is one routed
request; the pipeline is `-P replicas` commands per routed request. Prints a markdown section
for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.common import machine  # noqa: E402
from deploy.redis_server import RedisServer  # noqa: E402
from services.registry import Registry  # noqa: E402
from services.registry.schema import encode_block_hash, prefix_key  # noqa: E402

NAMESPACE = "bench"
HELD_BLOCKS = 4096  # other blocks in each replica's prefix set
IGNORED = ("info", "hello", "client", "script")  # connection set-up and the bench's own
# The alternative: the leading members of ARGV each set KEYS[i] holds, stopping at its first miss.
LEADING_MEMBERS = """
local counts = {}
for i, key in ipairs(KEYS) do
  local n = 0
  for j = 1, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[j]) == 0 then break end
    n = j
  end
  counts[i] = n
end
return counts
"""


def command_counts(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}


def server_commands(client: redis.Redis, lookup, n: int = 50) -> dict[str, float]:
    """Commands the server ran per call of lookup (scripts' own calls included)."""
    lookup()  # connection set-up out of the count
    before = command_counts(client)
    for _ in range(n):
        lookup()
    after = command_counts(client)
    return {k: (after[k] - before.get(k, 0)) / n for k in after
            if after[k] != before.get(k, 0) and not k.startswith(IGNORED)}


def redis_benchmark(port: int, args: list[str], pipeline: int, clients: int, requests: int) -> float:
    """Commands per second redis-benchmark reached sending args."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(requests), "-c",
                          str(clients), "-P", str(pipeline), "-q", *args],
                         check=True, capture_output=True, text=True).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    if not found:
        raise RuntimeError(f"redis-benchmark printed no rate:\n{out}")
    return float(found[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--blocks", default="17,64,256", help="prompt blocks per routed request")
    p.add_argument("--clients", type=int, default=50, help="redis-benchmark connections")
    p.add_argument("--requests", type=int, default=100_000, help="commands per measurement")
    a = p.parse_args()
    if shutil.which("redis-benchmark") is None:
        sys.exit("redis-benchmark not found: install redis-tools (Debian) or redis")
    rng = random.Random(0)
    rows = []
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        sha = client.script_load(LEADING_MEMBERS)
        replica_ids = [f"replica-{i}" for i in range(a.replicas)]
        keys = [prefix_key(NAMESPACE, rid) for rid in replica_ids]
        loop = asyncio.new_event_loop()
        registry = Registry(server.url, namespace=NAMESPACE)
        for num_blocks in (int(b) for b in a.blocks.split(",")):
            prompt = [rng.getrandbits(63) for _ in range(num_blocks)]
            members = list(map(encode_block_hash, prompt))
            for placement in ("half on every replica", "all on one replica"):
                client.delete(*keys)
                for i, key in enumerate(keys):
                    held = members[:num_blocks // 2] if placement.startswith("half") else (
                        members if i == 0 else [])
                    other = [encode_block_hash(rng.getrandbits(63)) for _ in range(HELD_BLOCKS)]
                    client.sadd(key, *held, *other)

                def routed():
                    loop.run_until_complete(registry.longest_prefix(replica_ids, prompt))

                def scripted():
                    client.evalsha(sha, len(keys), *keys, *members)

                shapes = {
                    "SMISMEMBER pipeline (the router's)": (
                        routed, ["SMISMEMBER", keys[0], *members], len(keys)),
                    "script, first miss stops": (
                        scripted, ["EVALSHA", sha, str(len(keys)), *keys, *members], 1),
                }
                for name, (lookup, args, per_request) in shapes.items():
                    counts = server_commands(client, lookup)
                    rate = redis_benchmark(server.port, args, per_request, a.clients, a.requests)
                    rows.append((num_blocks, placement, name, counts, rate / per_request))
        loop.run_until_complete(registry.close())
        loop.close()
    print("\n### The Redis ceiling of routing (`python bench/bench_redis.py`)\n")
    print(f"Machine: {machine()}; redis-server of deploy/redis_server.py; {a.replicas} replicas "
          f"with {HELD_BLOCKS} other blocks each; redis-benchmark with {a.clients} connections.\n")
    print("| prompt blocks | cached prefix | lookup | server commands per routed request | "
          "routed requests/s one Redis carries |")
    print("|---:|---|---|---|---:|")
    for num_blocks, placement, name, counts, routed in rows:
        shown = ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items()))
        print(f"| {num_blocks} | {placement} | {name} | {shown} | {routed:,.0f} |")


if __name__ == "__main__":
    main()
