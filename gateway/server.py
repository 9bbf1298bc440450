"""The gateway: the mesh's only public door.

    meshserve gateway --redis-url URL [--model DIR] [--port 50051] [--api-keys k1,k2]

Per request: authenticate, validate, tokenize, pick a replica (longest cached prefix, then
load), stream the scheduler's token ids back as text. If a replica fails mid-stream, the
request resumes on another one from the tokens already sent (greedy and seeded sampling
continue exactly: seeds are mixed with absolute positions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenizers import Tokenizer

from meshserve.internal.v1 import scheduler_pb2
from meshserve.v1 import generation_pb2 as pb
from meshserve.v1 import generation_pb2_grpc as pb_grpc
from gateway.detokenizer import IncrementalDetokenizer
from gateway.replica_link import ReplicaError
from gateway.router import Router
from gateway.settings import GatewaySettings
from gateway.stops import StopMatcher
from gateway.validation import InvalidRequest, ModelLimits, check_length, check_request
from services.model.config import ModelConfig
from services.model.default_model import ensure_default_model
from services.process import announce, run_service
from services.registry import Registry

log = logging.getLogger("meshserve.gateway")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class RequestState:
    """One public request across the replicas it may visit."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int]
    num_cached_prompt_tokens: int = 0


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, settings: GatewaySettings, router: Router, tokenizer: Tokenizer,
                 limits: ModelLimits):
        self.settings = settings
        self.router = router
        self.tokenizer = tokenizer
        self.limits = limits
        self._slots = asyncio.Semaphore(settings.max_inflight_requests)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        records = self.router.models().get(self.limits.name, [])
        info = pb.ModelInfo(name=self.limits.name, max_context_tokens=self.limits.max_context_tokens,
                            num_replicas=len(records))
        return pb.ListModelsResponse(models=[info] if records else [])

    async def Generate(self, request: pb.GenerateRequest, context):
        if self._slots.locked():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the gateway is at its limit of "
                                f"{self.settings.max_inflight_requests} requests; retry later")
        async with self._slots, self._claim(request.request_id, context):
            state = await self._admit(request, context)
            detok = IncrementalDetokenizer(self.tokenizer, state.prompt_ids)
            stops = StopMatcher(list(request.sampling.stop))
            async for ids, finish in self._token_stream(request, state, context):
                text, hit = stops.push(detok.push(ids))
                if finish and not hit:  # the end: release what was held back
                    tail, hit = stops.push(detok.flush())
                    text += tail if hit else tail + stops.flush()
                if hit:
                    finish = pb.FINISH_REASON_STOP
                final = finish != pb.FINISH_REASON_UNSPECIFIED
                yield pb.GenerateResponse(
                    token_ids=ids, text=text, finish_reason=finish,
                    request_id=state.request_id,
                    usage=self._usage(state) if final else None)
                if final:
                    return

    @contextlib.asynccontextmanager
    async def _claim(self, request_id: str, context):
        """A client-chosen request id runs once at a time across every gateway (via Redis);
        a retry while it runs gets ALREADY_EXISTS instead of a second generation."""
        if not request_id:
            yield
            return
        owner = uuid.uuid4().hex
        try:
            claimed = await self.router.registry.claim_request(
                request_id, owner, self.settings.request_claim_ttl_s)
        except Exception as exc:  # Redis away: serve rather than refuse
            log.warning("could not claim request id %r: %s", request_id, exc)
            claimed, owner = True, ""
        if not claimed:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request {request_id!r} is already running; wait for it to "
                                "finish or send another request_id")
        try:
            yield
        finally:
            if owner:
                await self.router.registry.release_request(request_id, owner)

    async def _admit(self, request: pb.GenerateRequest, context) -> RequestState:
        try:
            check_request(request, self.limits)
            ids = (list(request.prompt_token_ids) if request.prompt_token_ids
                   else self.tokenizer.encode(request.prompt).ids)
            check_length(len(ids), request.sampling.max_tokens, self.limits)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return RequestState(request.request_id or uuid.uuid4().hex, ids,
                            request.sampling.max_tokens, [])

    def _usage(self, state: RequestState) -> pb.Usage:
        return pb.Usage(prompt_tokens=len(state.prompt_ids),
                        completion_tokens=len(state.output_ids),
                        cached_prompt_tokens=state.num_cached_prompt_tokens)

    async def _token_stream(self, request: pb.GenerateRequest, state: RequestState, context):
        """Yields (new ids, finish reason) from a replica, resuming on another on failure."""
        tried: set[str] = set()
        while True:
            handle = await self.router.pick(self.limits.name, state.prompt_ids + state.output_ids,
                                            request.cache_salt, tried)
            if handle is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"no live replica serves {self.limits.name!r}"
                                    + (f" (tried {len(tried)})" if tried else "") + "; retry later")
            tried.add(handle.record.replica_id)
            handle.num_inflight += 1
            try:
                async for item in self._submit(handle, request, state):
                    yield item
                return
            except (grpc.aio.AioRpcError, ReplicaError) as exc:
                if exc.code() not in RETRYABLE or len(tried) >= self.settings.max_attempts:
                    await context.abort(exc.code(), exc.details() or "replica failed")
                log.warning("replica %s failed (%s); resuming elsewhere",
                            handle.record.replica_id, exc.code().name)
                self.router.mark_suspect(handle)
            finally:
                handle.num_inflight -= 1

    async def _submit(self, handle, request: pb.GenerateRequest, state: RequestState):
        sampling = pb.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.max_tokens = state.max_tokens - len(state.output_ids)
        del sampling.stop[:]
        submit = scheduler_pb2.SubmitRequest(
            request_id=state.request_id, prompt_token_ids=state.prompt_ids + state.output_ids,
            sampling=sampling, cache_salt=request.cache_salt)
        responses = handle.link.submit(submit)
        try:
            async for msg in responses:
                if not state.output_ids:
                    state.num_cached_prompt_tokens = max(state.num_cached_prompt_tokens,
                                                         msg.num_cached_prompt_tokens)
                state.output_ids += msg.token_ids
                yield list(msg.token_ids), msg.finish_reason
        finally:
            await responses.aclose()  # cancels it there when the client left: blocks freed


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


def load_model_limits(model_dir: Path) -> tuple[Tokenizer, ModelLimits]:
    config = ModelConfig.from_dir(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tokenizer, ModelLimits(model_dir.name, config.max_context_len,
                                  config.vocab_size)


async def serve(settings: GatewaySettings, stop: asyncio.Event | None = None) -> None:
    model_dir = Path(settings.model) if settings.model else ensure_default_model()
    tokenizer, limits = load_model_limits(model_dir)
    registry = Registry(settings.redis_url)
    router = Router(registry, settings.refresh_period_s)
    await router.start()
    interceptors = [ApiKeyInterceptor(settings.api_keys)] if settings.api_keys else []
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_GenerationServicer_to_server(
        GenerationServicer(settings, router, tokenizer, limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [pb.DESCRIPTOR.services_by_name["Generation"].full_name,
                     health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(service_names, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    for name in ("", service_names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gateway serving %s at %s:%d", limits.name, settings.host, port)
    announce(settings.ready_file, settings.host, port)
    stop = stop or asyncio.Event()
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await router.close()
    await registry.close()


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings.from_args(argv)
    run_service(lambda stop: serve(settings, stop))
