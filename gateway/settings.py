"""Settings of the gateway, built once in main from flags and environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from gateway.router import POLICIES
from services.arg_types import PORT, POSITIVE, SECONDS, float_in, int_at_least


@dataclass(frozen=True)
class GatewaySettings:
    redis_url: str
    model: str = ""  # HF folder whose tokenizer the gateway uses; "" = the default model
    host: str = "127.0.0.1"
    port: int = 50051
    api_keys: tuple[str, ...] = ()  # empty = no auth
    max_inflight_requests: int = 256  # more are refused with RESOURCE_EXHAUSTED
    refresh_period_s: float = 0.5  # how often the replica table is re-read from Redis
    max_attempts: int = 3  # replicas tried for one request before it fails
    ready_file: str = ""  # where to write host:port once serving
    request_claim_ttl_s: float = 600.0  # how long a client-chosen request id stays claimed
    http_port: int = 8000  # OpenAI-compatible HTTP (vLLM's port); 0 = any free one, -1 = off
    chat_template: str = ""  # a jinja file overriding the model's chat template
    served_model_name: str = ""  # the name clients ask for; "" = the model folder's name
    metrics_port: int = -1  # /metrics on a port of its own too; 0 = any free one, -1 = none
    disable_log_stats: bool = False  # no request metrics
    routing_policy: str = "prefix"  # prefix | least-load | round-robin (gateway/router.py)
    prefix_weight: float = 1.0  # cost of a prompt block a replica would still prefill
    load_weight: float = 8.0  # cost of a request a replica has, in prompt blocks
    balance_share: float = 2.0  # most requests a replica takes, x an even share (0 = no limit)
    stream_interval: int = 1  # tokens per streamed response (the first and the last go at once)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GatewaySettings:
        p = argparse.ArgumentParser(prog="meshserve gateway", description="The public door.")
        p.add_argument("--redis-url", required=True)
        p.add_argument("--model", default="", help="HF-format model folder (default: tiny model)")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=PORT, default=50051)
        p.add_argument("--api-keys", default=os.environ.get("MESHSERVE_API_KEYS", ""),
                       help="comma-separated keys (or env MESHSERVE_API_KEYS); none = no auth")
        p.add_argument("--api-key", action="append", default=[],
                       help="one more accepted key (vLLM's flag; may repeat)")
        p.add_argument("--served-model-name", default="",
                       help="the name clients ask for (default: the model folder's name)")
        p.add_argument("--max-inflight-requests", type=POSITIVE, default=256)
        p.add_argument("--refresh-period", type=SECONDS, default=0.5)
        p.add_argument("--max-attempts", type=POSITIVE, default=3)
        p.add_argument("--ready-file", default="", help="write host:port here once serving")
        p.add_argument("--request-claim-ttl", type=SECONDS, default=600.0,
                       help="seconds a client-chosen request_id stays claimed at most")
        p.add_argument("--http-port", type=int_at_least(-1), default=8000,
                       help="OpenAI-compatible HTTP port (0 = any free port, -1 = no HTTP)")
        p.add_argument("--chat-template", default="",
                       help="jinja file to render chat messages with (default: the model's)")
        p.add_argument("--metrics-port", type=int_at_least(-1), default=-1,
                       help="Prometheus /metrics on a port of its own too (0 = any free port, "
                            "-1 = only on the HTTP port)")
        p.add_argument("--disable-log-stats", action="store_true",
                       help="no request metrics (vLLM's flag)")
        p.add_argument("--routing-policy", default="prefix", choices=POLICIES,
                       help="prefix: the lowest cost of prefill left plus load (default); "
                            "least-load; round-robin")
        p.add_argument("--prefix-weight", type=float_in(0.0, low_open=False), default=1.0,
                       help="cost of one prompt block a replica has not cached")
        p.add_argument("--load-weight", type=float_in(0.0, low_open=False), default=8.0,
                       help="cost of one request a replica has, in prompt blocks")
        p.add_argument("--balance-share", type=float_in(0.0, low_open=False), default=2.0,
                       help="under the prefix policy, a replica that took more than this "
                            "multiple of an even share of the last 32 requests takes none until "
                            "it falls back (a hot prefix spreads; 0 = no limit)")
        p.add_argument("--stream-interval", type=POSITIVE, default=1,
                       help="tokens gathered into one streamed response (vLLM's and SGLang's "
                            "flag): 1 sends every token as it comes; more send fewer, larger "
                            "messages, less CPU per token for the gateway and its clients. The "
                            "first token and the end of a request are never held back")
        a = p.parse_args(argv)
        keys = tuple(k.strip() for k in [*a.api_keys.split(","), *a.api_key] if k.strip())
        return cls(a.redis_url, a.model, a.host, a.port, keys, a.max_inflight_requests,
                   a.refresh_period, a.max_attempts, a.ready_file, a.request_claim_ttl,
                   a.http_port, a.chat_template, a.served_model_name, a.metrics_port,
                   a.disable_log_stats, a.routing_policy, a.prefix_weight, a.load_weight,
                   a.balance_share, a.stream_interval)
