"""The `meshserve` command as a user runs it: up, generate, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from deploy.launcher import free_port
from gateway.router import MISSING_GRACE_S


def test_up_generate_and_ctrl_c_stops_everything(default_model_dir, tmp_path):
    up = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", "--port", "0",
                           "--http-port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("gateway listening" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())
        address = lines[-1].split("gateway listening on ")[1].split()[0]
        gen = _generate(address)
        assert gen.returncode == 0, gen.stderr
        assert "prompt + 5 generated tokens]" in gen.stderr
        # Its private Redis dies: `up` starts it again, and the mesh answers again.
        (redis,) = [pid for pid in _children(up.pid) if _name(pid) == "redis-server"]
        os.kill(redis, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len([pid for pid in _children(up.pid) if _name(pid) == "redis-server"
                   and pid != redis and _alive(pid)]) != 1:
            assert time.monotonic() < deadline, "up did not restart its redis-server"
            time.sleep(0.2)
        # Past the gateway's grace for vanished records: its table comes from the new Redis,
        # where the scheduler's next heartbeat registered the replica again.
        time.sleep(MISSING_GRACE_S + 1.0)
        gen = _generate(address)
        assert gen.returncode == 0, gen.stderr
        children = _children(up.pid)
        assert len(children) >= 3  # redis-server, worker, scheduler, gateway
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        assert "meshserve stopped" in up.stdout.read()
        time.sleep(0.5)
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()


def test_generate_reports_an_unreachable_gateway():
    gen = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--gateway",
                          f"127.0.0.1:{free_port()}", "hi"], capture_output=True, text=True,
                         timeout=60)
    assert gen.returncode == 1 and "UNAVAILABLE" in gen.stderr


def _generate(address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--gateway", address,
                           "--max-tokens", "5", "hello"], capture_output=True, text=True,
                          timeout=60)


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie has exited


def test_help_and_version_exit_zero():
    for args in (["--help"], ["--version"], ["up", "--help"], ["serve", "--help"]):
        done = subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.strip()
