"""--log-format json: a service's log lines are JSON objects a log collector can take."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def test_a_worker_logs_json_lines(tmp_path, default_model_dir):
    ready = tmp_path / "worker.address"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--log-format", "json",
                             "--log-level", "info", "worker", "--port", "0", "--num-kv-blocks",
                             "8", "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(r["logger"] == "meshserve.worker" and "worker tp=0/1" in r["message"]
               for r in records), out
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert [line for line in out.splitlines() if line.strip() and not line.startswith("{")] == []
