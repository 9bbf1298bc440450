"""A whole mesh on one machine: Redis, workers, schedulers and a gateway as child processes.

    redis-server (private, unless a URL is given)
    replica r:  worker (pp s, tp t) ... ──► scheduler r ──► registers in Redis
    gateway  ──► discovers the replicas through Redis

Used by `meshserve up` and by the integration tests (the same code path users run).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from deploy.cpu_binding import ENV as CPU_ENV
from deploy.cpu_binding import (CpuPlan, format_cpu_list, plan_cpus, threads_per_worker,
                                workers_on_cpu)
from deploy.redis_server import RedisServer
from meshserve.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger("meshserve.launcher")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MeshSpec:
    model: str = ""  # "" = the default tiny model
    tp: int = 1
    pp: int = 1
    replicas: int = 1
    port: int = 50051  # the gateway's; 0 = any free port
    redis_url: str = ""  # "" = start a private redis-server
    worker_args: tuple[str, ...] = ()  # extra flags for every worker
    scheduler_args: tuple[str, ...] = ()  # extra flags for every scheduler
    gateway_args: tuple[str, ...] = ()
    heartbeat_ttl_s: float = 5.0
    # Gateway processes sharing the port (SO_REUSEPORT: the kernel spreads connections over
    # them), as vLLM's --api-server-count: per-token streaming work outgrows one core.
    api_server_count: int = 1
    http_port: int = 0  # the gateways' OpenAI HTTP port; 0 = any free one
    # auto: CPU workers on CPUs of their own, gateways and schedulers on the rest, when the
    # machine has a CPU to spare (deploy/cpu_binding.py); off: the kernel places everything
    cpu_bind: str = "auto"


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class LocalMesh:
    spec: MeshSpec
    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    redis: RedisServer | None = None
    redis_url: str = ""
    gateway_port: int = 0
    http_port: int = 0
    worker_addresses: dict[str, list[str]] = field(default_factory=dict)
    cpu_plan: CpuPlan | None = None

    def start(self, timeout_s: float = 120.0) -> LocalMesh:
        self.log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="meshserve-"))
        s = self.spec
        if s.cpu_bind == "auto" and workers_on_cpu(s.worker_args):
            self.cpu_plan = plan_cpus(s.replicas * s.pp * s.tp,
                                      threads_per_worker(s.worker_args), os.sched_getaffinity(0))
            if self.cpu_plan is not None:
                log.info("CPU binding: %s", self.cpu_plan.describe())
        try:
            self._start_redis()
            for r in range(self.spec.replicas):
                self.start_replica(f"replica-{r}")
            self.gateway_port, self.http_port = self._start_gateway(
                "gateway", self.spec.port, self.spec.http_port, timeout_s)
            for i in range(1, self.spec.api_server_count):  # the same ports, chosen by the first
                self._start_gateway(f"gateway-{i}", self.gateway_port, self.http_port, timeout_s)
            self.wait_ready(self.spec.replicas, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_gateway(self, name: str, port: int, http_port: int,
                       timeout_s: float) -> tuple[int, int]:
        """(gRPC port, HTTP port) the gateway serves on; the HTTP port is -1 when it is off."""
        gateway = self._spawn(name, ["gateway", "--redis-url", self.redis_url, "--port", str(port),
                                     "--http-port", str(http_port), "--model", self.spec.model,
                                     "--metrics-port", "0", *self.spec.gateway_args])
        grpc_port = int(self._await_address(gateway, timeout_s).rsplit(":", 1)[1])
        if http_port < 0:
            return grpc_port, -1
        http_file = self.log_dir / f"{name}.address.http"
        return grpc_port, int(http_file.read_text().rsplit(":", 1)[1])

    def _start_redis(self) -> None:
        if self.spec.redis_url:
            self.redis_url = self.spec.redis_url
            return
        self.redis = RedisServer()
        self.redis.start()
        self.redis_url = self.redis.url

    def start_replica(self, replica_id: str, timeout_s: float = 120.0) -> list[Child]:
        """Spawns one replica's workers, then its scheduler; returns them (scheduler last).
        A replica that ran before and died is started anew: its dead processes are forgotten."""
        s = self.spec
        self.children = [c for c in self.children
                         if not c.name.startswith(f"{replica_id}-") or c.proc.poll() is None]
        workers = []
        for stage in range(s.pp):
            # One machine: the stage's TP group meets through a file, no port to race for.
            dist_file = self.log_dir / f"{replica_id}-pp{stage}.dist"
            dist_file.unlink(missing_ok=True)  # a file store must start empty
            dist_init = f"file://{dist_file}"
            for rank in range(s.tp):
                index = (int(replica_id.rsplit("-", 1)[1]) * s.pp + stage) * s.tp + rank
                workers.append(self._spawn(
                    f"{replica_id}-worker-pp{stage}-tp{rank}",
                    ["worker", "--model", s.model, "--tp-rank", str(rank), "--tp-size", str(s.tp),
                     "--pp-rank", str(stage), "--pp-size", str(s.pp), "--dist-init", dist_init,
                     "--port", "0", "--metrics-port", "0", *s.worker_args],
                    cpus=self.cpu_plan and self.cpu_plan.workers[index]))
        self.worker_addresses[replica_id] = [self._await_address(w, timeout_s) for w in workers]
        return [*workers, self.start_scheduler(replica_id)]

    def start_scheduler(self, replica_id: str) -> Child:
        """(Re)starts the scheduler of a replica whose workers are running."""
        name = f"{replica_id}-scheduler"
        self.children = [c for c in self.children if c.name != name or c.proc.poll() is None]
        return self._spawn(
            name,
            ["scheduler", "--workers", ",".join(self.worker_addresses[replica_id]),
             "--redis-url", self.redis_url, "--replica-id", replica_id,
             "--heartbeat-ttl", str(self.spec.heartbeat_ttl_s), "--metrics-port", "0",
             *self.spec.scheduler_args])

    def _spawn(self, name: str, args: list[str], cpus: frozenset[int] | None = None) -> Child:
        """Starts `meshserve <args>` as name; on cpus, or (under a CPU plan) on the CPUs left
        to gateways and schedulers."""
        log = self.log_dir / f"{name}.log"
        if args[0] in ("worker", "scheduler", "gateway"):  # each writes where it serves
            ready = self.log_dir / f"{name}.address"
            for stale in (ready, *(ready.with_name(ready.name + ext)  # a restart's
                                   for ext in (".http", ".metrics"))):
                stale.unlink(missing_ok=True)
            args = [*args, "--ready-file", str(ready)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        if self.cpu_plan is not None:
            env[CPU_ENV] = format_cpu_list(set(cpus or self.cpu_plan.rest))
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def _await_address(self, child: Child, timeout_s: float) -> str:
        """The host:port a worker or gateway wrote once it served."""
        path = self.log_dir / f"{child.name}.address"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not serving after {timeout_s:.0f} s\n"
                                   f"{self.log_tails()}")
            time.sleep(0.05)
        return path.read_text()

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible base URL (what `openai.OpenAI(base_url=...)` takes)."""
        if self.http_port < 0:
            raise RuntimeError("this mesh was started with its HTTP door off (--http-port -1)")
        return f"http://127.0.0.1:{self.http_port}/v1"

    def metrics_url(self, name: str, timeout_s: float = 30.0) -> str:
        """Where the mesh process `name` (e.g. "replica-0-scheduler") serves /metrics."""
        path = self.log_dir / f"{name}.address.metrics"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} announced no metrics port\n{self.log_tails()}")
            time.sleep(0.05)
        return f"http://{path.read_text()}/metrics"

    def _auth_metadata(self) -> tuple:
        """The gateways' first API key, when they are started with some."""
        args = list(self.spec.gateway_args)
        if "--api-keys" not in args:
            return ()
        key = args[args.index("--api-keys") + 1].split(",")[0].strip()
        return (("authorization", f"Bearer {key}"),) if key else ()

    def wait_ready(self, num_replicas: int, timeout_s: float) -> None:
        """Until the gateway lists the model with num_replicas live replicas."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.gateway_address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while True:
                self._check_alive()
                try:
                    models = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=2,
                                             metadata=self._auth_metadata()).models
                    if models and models[0].num_replicas >= num_replicas:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mesh not ready after {timeout_s:.0f} s\n{self.log_tails()}")
                time.sleep(0.2)

    def _check_alive(self) -> None:
        dead = [c for c in self.children if c.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited with {dead[0].proc.returncode}\n"
                               f"{self.log_tails()}")

    def log_tails(self, num_lines: int = 15) -> str:
        parts = []
        for c in self.children:
            lines = c.log.read_text(errors="replace").splitlines()[-num_lines:] if c.log.exists() else []
            parts.append(f"--- {c.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def supervise(self) -> None:
        """Restarts the private Redis if it died (empty, on its port: the schedulers register
        again at their next heartbeat, and the gateways keep their table meanwhile)."""
        if self.redis is not None and not self.redis.alive:
            log.warning("the private redis-server exited; restarting it on %s", self.redis_url)
            self.redis.restart()

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        if child.proc.poll() is None:
            os.killpg(child.proc.pid, sig)
        child.proc.wait(timeout=30)

    def stop(self) -> None:
        for child in reversed(self.children):  # gateway first, workers last
            if child.proc.poll() is None:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
