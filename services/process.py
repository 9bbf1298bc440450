"""What every service process does the same way: run until SIGINT/SIGTERM, and tell whoever
started it where it listens.

Services bind port 0 when asked to (no port is picked and released first, so nothing can take
it in between) and write `host:port` to `--ready-file`, atomically, once they serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path


def announce(ready_file: str, host: str, port: int) -> None:
    if not ready_file:
        return
    path = Path(ready_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{host}:{port}")
    os.replace(tmp, path)


def configure_logging() -> None:
    """MESHSERVE_LOG_LEVEL (INFO) and MESHSERVE_LOG_FORMAT: text, or json (one object a line,
    for log collectors: time, level, logger, message, and the exception when there is one)."""
    level = getattr(logging, os.environ.get("MESHSERVE_LOG_LEVEL", "INFO").upper(), logging.INFO)
    handler = logging.StreamHandler()
    if os.environ.get("MESHSERVE_LOG_FORMAT", "text").lower() == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level",
                                                          "name": "logger", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def run_service(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Runs serve(stop) on a new event loop; SIGINT or SIGTERM sets stop (a clean shutdown)."""
    configure_logging()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(run())
