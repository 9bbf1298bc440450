"""How a service tells whoever started it where it listens: a file written once it serves.

Services bind port 0 when asked to (no port is picked and released first, so nothing can take
it in between) and write `host:port` to `--ready-file`, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path


def announce(ready_file: str, host: str, port: int) -> None:
    if not ready_file:
        return
    path = Path(ready_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{host}:{port}")
    os.replace(tmp, path)
