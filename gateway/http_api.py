"""The OpenAI-compatible HTTP door (aiohttp, on the gateway's event loop beside grpc.aio).

    POST /v1/completions        prompt (text or token ids) -> text; SSE with "stream": true
    POST /v1/chat/completions   messages, which the core renders with the model's chat template
    GET  /v1/models             the served model
    GET  /health                200 while a replica serves the model, else 503

Requests become the core's GenerateRequest; its GatewayErrors become OpenAI error objects
with the HTTP status of their gRPC code. A client that disconnects cancels its request.
Fields this door does not know are accepted and ignored, as OpenAI's own clients expect.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from gateway.core import GatewayCore, GatewayError
from meshserve.v1 import generation_pb2 as pb
from services.messages import bounded, shown

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
}
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
          pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_CANCELLED: "abort"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def error_response(code: grpc.StatusCode, message: str, param: str | None = None) -> web.Response:
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    body = {"error": {"message": bounded(message), "type": kind, "param": param,
                      "code": status}}
    return web.json_response(body, status=status)


class OpenAIServer:
    OPEN = ("/health", "/metrics")  # for probes and Prometheus, as vLLM leaves them

    def __init__(self, core: GatewayCore, api_keys: tuple[str, ...] = ()):
        self.core, self.api_keys = core, set(api_keys)
        self.app = web.Application(middlewares=[self._auth])
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.get("/v1/models", self.models), web.get("/health", self.health),
                             web.get("/metrics", self.metrics)])

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_keys and request.path not in self.OPEN:
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            if scheme != "Bearer" or key.strip() not in self.api_keys:
                return error_response(grpc.StatusCode.UNAUTHENTICATED,
                                      "missing or wrong API key: send the header "
                                      "'Authorization: Bearer <key>'")
        return await handler(request)

    # -- read-only endpoints ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.core.num_live_replicas():
            return web.json_response({"status": "ok"})
        return error_response(grpc.StatusCode.UNAVAILABLE,
                              f"no live replica serves {self.core.limits.name!r}")

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return web.Response(body=generate_latest(REGISTRY),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        limits = self.core.limits
        card = {"id": limits.name, "object": "model", "created": 0, "owned_by": "meshserve",
                "max_model_len": limits.max_context_tokens}
        return web.json_response({"object": "list",
                                  "data": [card] if self.core.num_live_replicas() else []})

    # -- generation ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            generate = self._generate_request(body)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                generate.prompt_token_ids.extend(prompt)
            elif isinstance(prompt, str):
                generate.prompt = prompt
            else:
                raise BadRequest("prompt must be a string or a list of token ids", "prompt")
        except BadRequest as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param)
        return await self._respond(request, body, generate, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            generate = self._generate_request(body)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list", "messages")
            generate.messages.extend(pb.ChatMessage(**_message(m)) for m in messages)
        except BadRequest as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param)
        return await self._respond(request, body, generate, chat=True)

    def _generate_request(self, body: dict) -> pb.GenerateRequest:
        """The fields both endpoints share, checked for type; the core checks the values."""
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        max_tokens = _number(body, "max_tokens",
                             body.get("max_completion_tokens", body.get("max_tokens")),
                             DEFAULT_MAX_TOKENS, int)
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        sampling = pb.SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", body.get("temperature"), 1.0, float),
            top_p=_number(body, "top_p", body.get("top_p"), 1.0, float),
            top_k=max(0, _number(body, "top_k", body.get("top_k"), 0, int)),
            ignore_eos=bool(body.get("ignore_eos", False)))
        if (seed := body.get("seed")) is not None:
            sampling.seed = _number(body, "seed", seed, 0, int) % 2**64
        stop = body.get("stop") or []
        sampling.stop.extend([stop] if isinstance(stop, str) else list(stop))
        return pb.GenerateRequest(model=body.get("model") or "", sampling=sampling,
                                  request_id=body.get("request_id") or "")

    async def _respond(self, request: web.Request, body: dict, generate: pb.GenerateRequest,
                       chat: bool) -> web.StreamResponse:
        shape = _Shape(chat, self.core.limits.name)
        responses = self.core.generate(generate)
        if not body.get("stream"):
            try:
                text, last = "", None
                async for last in responses:
                    text += last.text
            except GatewayError as exc:
                return error_response(exc.code, exc.message)
            return web.json_response(shape.whole(text, last))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(request, responses, shape, include_usage)

    async def _stream(self, request, responses: AsyncIterator[pb.GenerateResponse], shape,
                      include_usage: bool) -> web.StreamResponse:
        """SSE: a chunk per response, then (asked) the usage chunk, then [DONE]. An error
        before the first chunk is an error response; after it, an error event."""
        try:
            first = await anext(responses)
        except GatewayError as exc:
            return error_response(exc.code, exc.message)
        except StopAsyncIteration:
            first = None
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                             "Cache-Control": "no-cache"})
        await stream.prepare(request)
        try:
            last = first
            if first is not None:
                await _event(stream, shape.chunk(first))
                async for last in responses:
                    await _event(stream, shape.chunk(last))
            if include_usage and last is not None:
                await _event(stream, shape.usage_chunk(last))
        except GatewayError as exc:
            status, kind = HTTP_STATUS.get(exc.code, (500, "internal_error"))
            await _event(stream, {"error": {"message": exc.message, "type": kind,
                                            "param": None, "code": status}})
        finally:
            await responses.aclose()  # a client gone mid-stream: the request is cancelled
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream


class _Shape:
    """OpenAI's response objects of one request (completion or chat; whole or chunked)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.sent_role = False

    def _envelope(self, obj: str, choices: list, usage=None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, text: str, last: pb.GenerateResponse | None) -> dict:
        finish = FINISH.get(last.finish_reason) if last is not None else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            return self._envelope("chat.completion", [choice], _usage(last))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], _usage(last))

    def chunk(self, response: pb.GenerateResponse) -> dict:
        finish = FINISH.get(response.finish_reason)
        if not self.chat:
            return self._envelope("text_completion", [{"index": 0, "text": response.text,
                                                       "logprobs": None,
                                                       "finish_reason": finish}])
        delta = {"content": response.text}
        if not self.sent_role:
            delta["role"], self.sent_role = "assistant", True
        return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta,
                                                          "logprobs": None,
                                                          "finish_reason": finish}])

    def usage_chunk(self, last: pb.GenerateResponse) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], _usage(last))


def _usage(last: pb.GenerateResponse | None) -> dict | None:
    if last is None or not last.HasField("usage"):
        return None
    u = last.usage
    out = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens}
    if u.cached_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    return out


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _number(body: dict, name: str, value, default, kind):
    """value (None: default) as kind; a finite number or a BadRequest naming the field."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a{'n integer' if kind is int else ' number'}, "
                         f"got {shown(value) if isinstance(value, str) else repr(value)}", name)
    return kind(value)


def _message(message) -> dict:
    """role and content of a chat message; content parts of type text are joined."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest("each message needs a role and a content", "messages")
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content
                          if isinstance(part, dict) and part.get("type") == "text")
    if not isinstance(content, str):
        raise BadRequest("a message's content must be text", "messages")
    return {"role": message["role"], "content": content}


async def _event(stream: web.StreamResponse, payload: dict) -> None:
    await stream.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
