"""Separate hosts on one Linux machine, for a mesh whose pipeline stages live apart.

Network namespaces joined by a bridge (root only), and a pipeline-parallel mesh across them:

    sudo python -m deploy.netns [--model DIR] [--pp 2] [--tp 1]   # a mesh across them, until ^C

    with NamespaceHosts(3) as hosts:        # hosts 10.<net>.0.1 .. .3, and this process's .254
        proc = hosts.spawn(1, ["python", ...], log)    # runs inside host 1's namespace
        hosts.cut(1); hosts.mend(1)                     # its link down / up again

Each host is a namespace with its own loopback and one veth interface (`eth-<i>` inside) whose
other end is on a bridge in a namespace of its own (the switch, so the machine's own firewall
and routes never see the traffic); this process reaches every host through one more veth from
the root namespace. Everything it makes carries a per-harness prefix and is removed on exit,
after a failure too: processes it spawned are killed before their namespaces go.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path


def available() -> str:
    """'' when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"msprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:  # what the hosts are made of: a bridge and veth pairs
        for args in (["link", "add", "br0", "type", "bridge"],
                     ["link", "add", "v0", "type", "veth", "peer", "name", "v1"]):
            out = subprocess.run(["ip", "-n", probe, *args], capture_output=True, text=True)
            if out.returncode:
                return f"ip {' '.join(args)} failed: {out.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


class NamespaceHosts:
    def __init__(self, count: int):
        self.count = count
        self.tag = uuid.uuid4().hex[:5]
        self.net = 64 + int(self.tag, 16) % 64  # 10.<64..127>.0.0/24
        self.switch = f"ms{self.tag}sw"
        self.procs: list[subprocess.Popen] = []

    def name(self, i: int) -> str:
        return f"ms{self.tag}h{i}"

    def address(self, i: int) -> str:
        return f"10.{self.net}.0.{i + 1}"

    @property
    def own_address(self) -> str:
        return f"10.{self.net}.0.254"

    def interface(self, i: int) -> str:
        """The host's interface (inside its namespace): what UCX_NET_DEVICES names."""
        return f"eth-{i}"

    def __enter__(self) -> NamespaceHosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        run("ip", "netns", "add", self.switch)
        on_switch = ["ip", "netns", "exec", self.switch]
        run(*on_switch, "ip", "link", "add", "br0", "type", "bridge")
        run(*on_switch, "ip", "link", "set", "br0", "up")
        for i in range(self.count):
            host, outer = self.name(i), f"ms{self.tag}p{i}"
            run("ip", "netns", "add", host)
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", f"ms{self.tag}i{i}")
            run("ip", "link", "set", f"ms{self.tag}i{i}", "netns", host)
            run("ip", "-n", host, "link", "set", f"ms{self.tag}i{i}", "name", self.interface(i))
            run("ip", "link", "set", outer, "netns", self.switch)
            run(*on_switch, "ip", "link", "set", outer, "master", "br0", "up")
            run("ip", "-n", host, "addr", "add", f"{self.address(i)}/24", "dev", self.interface(i))
            run("ip", "-n", host, "link", "set", self.interface(i), "up")
            run("ip", "-n", host, "link", "set", "lo", "up")
        # this process's own way in: a veth from the root namespace to the switch
        mine = f"ms{self.tag}r"
        run("ip", "link", "add", mine, "type", "veth", "peer", "name", f"ms{self.tag}rs")
        run("ip", "link", "set", f"ms{self.tag}rs", "netns", self.switch)
        run(*on_switch, "ip", "link", "set", f"ms{self.tag}rs", "master", "br0", "up")
        run("ip", "addr", "add", f"{self.own_address}/24", "dev", mine)
        run("ip", "link", "set", mine, "up")

    def spawn(self, i: int, args: list[str], log, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """args run inside host i (its own network, this machine's files and processes)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name(i), *args], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def cut(self, i: int) -> None:
        """Host i loses its link (as a pulled cable): its interface goes down."""
        run("ip", "-n", self.name(i), "link", "set", self.interface(i), "down")

    def mend(self, i: int) -> None:
        run("ip", "-n", self.name(i), "link", "set", self.interface(i), "up")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        subprocess.run(["ip", "link", "del", f"ms{self.tag}r"], capture_output=True)
        for i in range(self.count):
            subprocess.run(["ip", "netns", "del", self.name(i)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this harness still present (none after close)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return [w for w in (names + links).split() if w.startswith(f"ms{self.tag}")]


def run(*args: str) -> None:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")


# -- a mesh across the hosts ---------------------------------------------------------------------

REDIS_PORT, WORKER_PORT, SCHEDULER_PORT, GATEWAY_PORT = 6379, 50061, 50052, 50051
DIST_INIT_PORT = 29500  # a stage's TP rendezvous, on its host's loopback


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", *args]


def stage_env(hosts: NamespaceHosts, host: int) -> dict[str, str]:
    """A stage's UCX transports: TCP on its host's own interface (the "hosts" share memory, so
    left alone UCX would pick shared memory between them)."""
    return {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": hosts.interface(host)}


def start_pp_mesh(hosts: NamespaceHosts, model: str, pp: int, logs: Path, tp: int = 1) -> list:
    """Redis, the scheduler and the gateway on host 0, stage s on host s + 1 (its tp ranks on
    ports WORKER_PORT + r, their TP group over gloo inside that host), every service on its
    host's address; returns the processes (the gateway last)."""
    at = hosts.address
    redis_url = f"redis://{at(0)}:{REDIS_PORT}/0"
    procs = []

    def start(host: int, name: str, args: list[str], env=None):
        log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 (the child writes it)
        procs.append(hosts.spawn(host, args, log, {"OMP_NUM_THREADS": "1", **(env or {})}))

    start(0, "redis", ["redis-server", "--bind", at(0), "--port", str(REDIS_PORT), "--save", "",
                       "--appendonly", "no"])
    model_args = ["--model", model] if model else []
    for stage in range(pp):
        for rank in range(tp):
            start(stage + 1, f"worker-pp{stage}-tp{rank}", cli(
                "worker", *model_args, "--pp-rank", str(stage), "--pp-size", str(pp),
                "--tp-rank", str(rank), "--tp-size", str(tp),
                "--dist-init", f"tcp://127.0.0.1:{DIST_INIT_PORT}",
                "--host", at(stage + 1), "--port", str(WORKER_PORT + rank),
                "--num-kv-blocks", "128", "--device", "cpu"), stage_env(hosts, stage + 1))
    workers = [f"{at(s + 1)}:{WORKER_PORT + r}" for s in range(pp) for r in range(tp)]
    start(0, "scheduler", cli(
        "scheduler", "--workers", ",".join(workers),
        "--redis-url", redis_url, "--host", at(0), "--port", str(SCHEDULER_PORT),
        "--advertise-host", at(0), "--replica-id", "across-hosts"))
    start(0, "gateway", cli("gateway", *model_args, "--redis-url", redis_url, "--host", at(0),
                            "--port", str(GATEWAY_PORT), "--http-port", "-1"))
    return procs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.netns", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: the default model)")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages, one namespace host each")
    p.add_argument("--tp", type=int, default=1, help="TP ranks of each stage, on its host")
    p.add_argument("--logs", default="/tmp/meshserve-netns")
    a = p.parse_args(argv)
    if why := available():
        print(f"error: {why}", file=sys.stderr)
        return 2
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    with NamespaceHosts(a.pp + 1) as hosts:
        start_pp_mesh(hosts, a.model, a.pp, logs, a.tp)
        print(f"gateway at {hosts.address(0)}:{GATEWAY_PORT} (stage s on "
              f"{hosts.address(1)}..{hosts.address(a.pp)}); logs in {logs}; ^C ends it all",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: the hosts go too
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
