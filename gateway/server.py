"""The gateway: the mesh's only public door.

    meshserve gateway --redis-url URL [--model DIR] [--port 50051] [--api-keys k1,k2]

Per request: authenticate, validate, tokenize, pick a replica (longest cached prefix, then
load), stream the scheduler's token ids back as text. If a replica fails mid-stream, the
request resumes on another one from the tokens already sent (greedy and seeded sampling
continue exactly: seeds are mixed with absolute positions).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from gateway.chat_template import ChatTemplate
from gateway.core import GatewayCore, GatewayError
from gateway.metrics import GatewayMetrics
from gateway.router import Router
from gateway.settings import GatewaySettings
from gateway.validation import ModelLimits
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from services.model.cache import default_model_dir
from services.model.config import ModelConfig
from services.process import announce, run_service
from services.grpc_standard import add_health, add_reflection, set_health
from services.metrics import serve_metrics
from services.registry import Registry

log = logging.getLogger("meshserve.gateway")


class GenerationServicer(pb_grpc.GenerationServicer):
    """The gRPC door: the core's refusals become the matching status codes."""

    def __init__(self, core: GatewayCore):
        self.core = core

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        limits = self.core.limits
        num_replicas = self.core.num_live_replicas()
        info = pb.ModelInfo(name=limits.name, max_context_tokens=limits.max_context_tokens,
                            num_replicas=num_replicas)
        return pb.ListModelsResponse(models=[info] if num_replicas else [])

    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            async for response in self.core.generate(request):
                yield response
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` on every call but health checks and reflection."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, keys: tuple[str, ...]):
        self.keys = set(keys)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return await continuation(details)
        auth = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme == "Bearer" and key.strip() in self.keys:
            return await continuation(details)
        return _deny_handler(await continuation(details))


def _deny_handler(handler):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send metadata "
                            "'authorization: Bearer <key>'")

    async def deny_stream(request, context):
        await deny(request, context)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        deny, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """A request whose bytes are not its message (invalid UTF-8 in a string field, truncated
    bytes) gets INVALID_ARGUMENT, not UNKNOWN with a traceback in the log: the handler decodes
    through a deserializer that cannot raise, and refuses what did not decode."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # the public methods take one request; the others are left alone
        decode, method = handler.request_deserializer, details.method

        def safe_decode(raw: bytes):
            try:
                return decode(raw)
            except Exception as exc:  # protobuf's DecodeError, or a wrong type underneath
                return _Undecodable(f"the request is not a valid {method} message ({exc}); "
                                    "send it as protobuf encodes it, strings in UTF-8")

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for response in inner_stream(request, context):
                    yield response

            return handler._replace(request_deserializer=safe_decode, unary_stream=unary_stream)
        inner = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await inner(request, context)

        return handler._replace(request_deserializer=safe_decode, unary_unary=unary_unary)


@dataclass(frozen=True)
class _Undecodable:
    message: str


def tiny_model_dir() -> Path:
    """The tiny test model's folder; made here (the one place the gateway needs torch) only if
    no worker has made it yet."""
    if not default_model_dir().is_dir():
        from services.model.default_model import ensure_default_model

        return ensure_default_model()
    return default_model_dir()


def load_model_limits(model_dir: Path, name: str = "") -> tuple[Tokenizer, ModelLimits]:
    config = ModelConfig.from_dir(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tokenizer, ModelLimits(name or model_dir.name, config.max_context_len,
                                  config.vocab_size)


async def serve(settings: GatewaySettings, stop: asyncio.Event | None = None) -> None:
    model_dir = Path(settings.model) if settings.model else tiny_model_dir()
    tokenizer, limits = load_model_limits(model_dir, settings.served_model_name)
    registry = Registry(settings.redis_url)
    router = Router(registry, settings.refresh_period_s, policy=settings.routing_policy,
                    prefix_weight=settings.prefix_weight, load_weight=settings.load_weight,
                    balance_share=settings.balance_share)
    await router.start()
    interceptors = [UndecodableRequestInterceptor()]
    if settings.api_keys:
        interceptors.append(ApiKeyInterceptor(settings.api_keys))
    server = grpc.aio.server(interceptors=interceptors)
    template = ChatTemplate.load(model_dir, settings.chat_template)
    core = GatewayCore(settings, router, tokenizer, limits, template)
    if not settings.disable_log_stats:
        core.metrics = GatewayMetrics(router, limits.name, limits.max_context_tokens)
    if settings.metrics_port >= 0:
        metrics_port = serve_metrics(settings.metrics_port, settings.host)
        announce(settings.ready_file and settings.ready_file + ".metrics", settings.host,
                 metrics_port)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(core), server)
    generation = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    add_reflection(server, [generation])
    health = await add_health(server, [generation])
    _follow_replicas(router, core, health, generation)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    http = await start_http(settings, core)
    log.info("gateway serving %s at %s:%d (gRPC)%s", limits.name, settings.host, port,
             f" and :{http[1]} (OpenAI HTTP)" if http else "")
    announce(settings.ready_file, settings.host, port)
    stop = stop or asyncio.Event()
    await stop.wait()
    await health.enter_graceful_shutdown()
    if http:
        await http[0].cleanup()
    await server.stop(grace=2.0)
    await router.close()
    await registry.close()


def _follow_replicas(router: Router, core: GatewayCore, health, generation: str) -> None:
    """gRPC health of the Generation service says SERVING while a live replica serves the
    model, else NOT_SERVING (as /health does): readiness, so a load balancer sends nothing to
    a gateway with nowhere to go. The server's own entry ("") stays SERVING while the process
    runs: liveness must not restart gateways because the replicas are away."""
    last: bool | None = None

    def update() -> None:
        nonlocal last
        serving = core.num_live_replicas() > 0
        if serving != last:
            last = serving
            asyncio.ensure_future(set_health(health, [generation], serving))

    router.on_update = update
    update()


async def start_http(settings: GatewaySettings, core: GatewayCore):
    """The OpenAI HTTP door on --http-port, shared with the other gateway processes (reuse
    port); its address goes to the ready file + ".http". (runner, port), or None when off."""
    if settings.http_port < 0:
        return None
    from aiohttp import web

    from gateway.http_api import OpenAIServer

    app = OpenAIServer(core, settings.api_keys).app
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port, reuse_port=True)
    await site.start()
    port = runner.addresses[0][1]
    if settings.ready_file:
        announce(settings.ready_file + ".http", settings.host, port)
    return runner, port


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings.from_args(argv)
    run_service(lambda stop: serve(settings, stop))
