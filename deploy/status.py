"""`meshserve status`: every replica of the mesh as Redis knows it (each one's scheduler writes
its figures there at every heartbeat), live in the terminal, or one frame with --once.

    meshserve status --redis-url redis://127.0.0.1:6379/0 [--once] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from redis.exceptions import RedisError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.arg_types import SECONDS
from services.registry import Registry, ReplicaRecord

STALE_S = 10.0  # a record not rewritten for this long belongs to a replica that stalled


async def read_replicas(redis_url: str) -> list[ReplicaRecord]:
    async with Registry(redis_url) as registry:
        return sorted(await registry.list_replicas(), key=lambda r: r.replica_id)


def render(records: list[ReplicaRecord], redis_url: str, now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = Table(title=f"meshserve: {len(records)} replica(s) in {redis_url}",
                  title_justify="left")
    for column, justify in (("replica", "left"), ("model", "left"), ("tp x pp", "right"),
                            ("state", "left"), ("running", "right"), ("waiting", "right"),
                            ("KV use", "right"), ("prefix hits", "right"),
                            ("tokens/s", "right"), ("address", "left")):
        table.add_column(column, justify=justify)
    for r in records:
        state = "draining" if r.draining else "serving"
        if now - r.updated_at > STALE_S:
            state += f" (silent {now - r.updated_at:.0f} s)"
        hits = (f"{100 * r.num_prefix_hit_tokens / r.num_prefix_query_tokens:.0f} %"
                if r.num_prefix_query_tokens else "-")
        table.add_row(r.replica_id, r.model, f"{r.tp_size} x {r.pp_size}", state,
                      str(r.num_running), str(r.num_waiting), f"{100 * r.kv_usage:.0f} %", hits,
                      f"{r.generation_throughput:.0f}", r.address)
    if not records:
        table.caption = "no live replica: none registered, or every record expired"
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshserve status", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True, help="the mesh's Redis (`meshserve up` prints it)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    p.add_argument("--interval", type=SECONDS, default=1.0, help="seconds between frames")
    a = p.parse_args(argv)
    console = Console()
    try:
        if a.once:
            console.print(render(asyncio.run(read_replicas(a.redis_url)), a.redis_url))
            return 0
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                live.update(render(asyncio.run(read_replicas(a.redis_url)), a.redis_url),
                            refresh=True)
                time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0
    except (OSError, RedisError) as exc:
        console.print(f"error: cannot read {a.redis_url}: {exc}")
        return 1
