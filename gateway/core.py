"""The gateway's transport-neutral core; the gRPC (server.py) and OpenAI HTTP (http_api.py)
adapters only translate requests in, and responses and errors out.

If a replica fails mid-stream, the request resumes on another one from the tokens already
sent (greedy and seeded sampling continue exactly: seeds are mixed with absolute positions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tokenizers import Tokenizer

from gateway.chat_template import ChatTemplate, ChatTemplateError
from gateway.detokenizer import IncrementalDetokenizer
from gateway.replica_link import ReplicaError
from gateway.router import Router
from gateway.settings import GatewaySettings
from gateway.stops import StopMatcher
from gateway.validation import InvalidRequest, ModelLimits, check_length, check_request
from meshserve.internal.v1 import scheduler_pb2
from meshserve.v1 import generation_pb2 as pb
from services.messages import bounded, shown

log = logging.getLogger("meshserve.gateway")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


class GatewayError(Exception):
    """A request refused or failed: the status (grpc's vocabulary) and what to do about it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = bounded(message)
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class RequestState:
    """One public request across the replicas it may visit."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int]
    num_cached_prompt_tokens: int = 0


class HeldBack:
    """--stream-interval: new ids and their text gather until `interval` ids (or the request's
    end) go in one response. The first response goes as soon as there is anything, so the time
    to the first token does not wait on the interval."""

    def __init__(self, interval: int):
        self.interval, self.ids, self.text, self.sent = interval, [], "", False

    def add(self, ids: list[int], text: str, final: bool) -> tuple[list[int], str] | None:
        """(ids, text) to send now, all that was held; None while it gathers."""
        self.ids += ids
        self.text += text
        if self.sent and not final and len(self.ids) < self.interval:
            return None
        ready, self.ids, self.text, self.sent = (self.ids, self.text), [], "", True
        return ready


def through_stops(ids: list[int], detok: IncrementalDetokenizer, stops: StopMatcher
                  ) -> tuple[list[int], str, bool]:
    """(ids up to the one whose text reaches a stop string, the text to emit, whether one did).
    A response can hold several steps' ids (the gateway read the stream late): with stop strings
    each id is read on its own, so where the stop falls does not depend on how steps merged."""
    if not stops.stops or len(ids) <= 1:
        text, hit = stops.push(detok.push(ids))
        return ids, text, hit
    pieces = []
    for i, token in enumerate(ids):
        piece, hit = stops.push(detok.push([token]))
        pieces.append(piece)
        if hit:
            return ids[:i + 1], "".join(pieces), True
    return ids, "".join(pieces), False


class GatewayCore:
    """One request's whole way through the gateway, whichever door it came in by: admit
    (validate, tokenize), claim its client-chosen id, route, stream, fail over, detokenize,
    stop strings. Takes and yields the public protobuf messages as plain values; refusals and
    failures are GatewayErrors, which each adapter turns into its own status."""

    def __init__(self, settings: GatewaySettings, router: Router, tokenizer: Tokenizer,
                 limits: ModelLimits, chat_template: ChatTemplate | None = None):
        self.chat_template = chat_template
        self.settings = settings
        self.router = router
        self.tokenizer = tokenizer
        self.limits = limits
        self._slots = asyncio.Semaphore(settings.max_inflight_requests)
        self.metrics = None  # a GatewayMetrics, when the gateway exports them

    def num_live_replicas(self) -> int:
        """Replicas that would take a request for the model now."""
        return len(self.router.serving(self.limits.name))

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The request's responses: new ids and text, the last one with finish reason and usage."""
        timer = self.metrics.request() if self.metrics is not None else None
        responses = self._generate(request)
        try:
            async for response in responses:
                if timer is not None:
                    timer.saw(response)
                yield response
        except GatewayError as exc:
            if timer is not None:
                timer.failed(exc.code.name)
            raise
        finally:  # a client that left closes this generator: close the one it drives at once
            if timer is not None:  # (its request slot and claim are released right away,
                timer.closed()  # not whenever it is garbage-collected)
            await responses.aclose()

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        if self._slots.locked():
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway is at its limit of "
                               f"{self.settings.max_inflight_requests} requests; retry later")
        async with self._slots, self._claim(request.request_id):
            state = self._admit(request)
            detok = IncrementalDetokenizer(self.tokenizer, state.prompt_ids)
            stops = StopMatcher(list(request.sampling.stop))
            held = HeldBack(self.settings.stream_interval)
            async for ids, finish in self._token_stream(request, state):
                kept, text, hit = through_stops(ids, detok, stops)
                if len(kept) < len(ids):  # ids past the stop's: neither sent nor counted
                    del state.output_ids[len(kept) - len(ids):]
                    ids = kept
                if finish and not hit:  # the end: release what was held back
                    tail, hit = stops.push(detok.flush())
                    text += tail if hit else tail + stops.flush()
                if hit:
                    finish = pb.FINISH_REASON_STOP
                final = finish != pb.FINISH_REASON_UNSPECIFIED
                if (ready := held.add(ids, text, final)) is None:
                    continue
                yield pb.GenerateResponse(
                    token_ids=ready[0], text=ready[1], finish_reason=finish,
                    request_id=state.request_id,
                    usage=self._usage(state) if final else None)
                if final:
                    return

    @contextlib.asynccontextmanager
    async def _claim(self, request_id: str):
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
            log.warning("could not claim request id %s: %s", shown(request_id), exc)
            self._redis_error("claim_request")
            claimed, owner = True, ""
        if not claimed:
            raise GatewayError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request {shown(request_id)} is already running; wait for it to "
                               "finish or send another request_id")
        try:
            yield
        finally:
            if owner:  # Redis away at the end: the claim lapses after its TTL instead
                try:
                    await self.router.registry.release_request(request_id, owner)
                except Exception as exc:
                    log.warning("could not release request id %s: %s", shown(request_id), exc)
                    self._redis_error("release_request")

    def _redis_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.redis_error(operation)

    def _admit(self, request: pb.GenerateRequest) -> RequestState:
        try:
            check_request(request, self.limits)
            ids = list(request.prompt_token_ids) or self.tokenizer.encode(
                self._prompt_text(request)).ids
            check_length(len(ids), request.sampling.max_tokens, self.limits)
        except (InvalidRequest, ChatTemplateError) as exc:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return RequestState(request.request_id or uuid.uuid4().hex, ids,
                            request.sampling.max_tokens, [])

    def _prompt_text(self, request: pb.GenerateRequest) -> str:
        if not request.messages:
            return request.prompt
        if self.chat_template is None:
            raise InvalidRequest(f"{self.limits.name!r} has no chat template: send a prompt, or "
                                 "start the gateway with --chat-template FILE")
        return self.chat_template.render([{"role": m.role, "content": m.content}
                                          for m in request.messages])

    def _usage(self, state: RequestState) -> pb.Usage:
        return pb.Usage(prompt_tokens=len(state.prompt_ids),
                        completion_tokens=len(state.output_ids),
                        cached_prompt_tokens=state.num_cached_prompt_tokens)

    async def _token_stream(self, request: pb.GenerateRequest, state: RequestState):
        """Yields (new ids, finish reason) from a replica, resuming on another on failure."""
        tried: set[str] = set()
        while True:
            handle = await self.router.pick(self.limits.name, state.prompt_ids + state.output_ids,
                                            request.cache_salt, tried)
            if handle is None:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                                   f"no live replica serves {self.limits.name!r}"
                                   + (f" (tried {len(tried)})" if tried else "") + "; retry later")
            tried.add(handle.record.replica_id)
            beat = handle.started()
            try:
                async for item in self._submit(handle, request, state):
                    yield item
                return
            except (grpc.aio.AioRpcError, ReplicaError) as exc:
                if exc.code() not in RETRYABLE or len(tried) >= self.settings.max_attempts:
                    raise GatewayError(exc.code(), exc.details() or "replica failed") from None
                if self.metrics is not None:
                    self.metrics.failover(recomputed=bool(state.output_ids))
                log.warning("request %s: replica %s failed (%s); %s", state.request_id,
                            handle.record.replica_id, exc.code().name,
                            f"resuming elsewhere after {len(state.output_ids)} tokens "
                            "(recomputed there)" if state.output_ids else "sending it elsewhere")
                self.router.mark_suspect(handle)
            finally:
                handle.ended(beat)

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
