"""The Redis schema of the registry: which keys exist, what they hold, and who writes them.

Every key starts with a namespace (default `meshserve`), so several meshes can share one Redis.

| key                          | type   | value                                   | TTL                        | written by                     |
|------------------------------|--------|-----------------------------------------|----------------------------|--------------------------------|
| `{ns}:replica:{replica_id}`  | string | `ReplicaRecord` as a JSON object        | `ttl_s`, reset by each     | the replica's scheduler:       |
|                              |        |                                         | heartbeat (SET ... PX)     | register / heartbeat / drain   |
| `{ns}:prefix:{replica_id}`   | set    | block hashes the replica holds in its   | `ttl_s`, reset by each     | the replica's scheduler, every |
|                              |        | prefix cache, as decimal strings        | heartbeat and publish      | 0.2 s with changes:            |
|                              |        | (`str(int)`: any width, any sign)       | (PEXPIRE)                  | publish_prefix (SADD / SREM),  |
|                              |        |                                         |                            | replace_prefix (DEL + SADD)    |

| `{ns}:request:{request_id}`  | string | the gateway call that runs it           | `request_claim_ttl_s` of   | a gateway, while a request |
|                              |        |                                         | the gateway (10 min)       | with a client-chosen id runs |

Invariants:
- A replica is live exactly while its record key exists. A replica that stops heart-beating
  disappears within `ttl_s`, and so does its prefix set (both carry the same TTL, the set's
  reset by its last publish too, which may come just after the last heartbeat).
- The prefix set of a replica is never read without its record: readers list live replicas first,
  then ask about their prefix sets, so a stale set never routes a request.
- Block hashes are chained (each covers its whole prefix), so "replica R holds the first k blocks"
  is the number of leading hashes of a prompt found in R's set.
- Readers (gateways) never write; Redis is never on the per-token path.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_NAMESPACE = "meshserve"
DEFAULT_TTL_S = 5.0

_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def check_replica_id(replica_id: str) -> str:
    """`replica_id` itself; raises ValueError when it is empty or would need escaping in a key."""
    if not isinstance(replica_id, str) or not _REPLICA_ID.fullmatch(replica_id):
        raise ValueError(f"replica id {replica_id!r} must match {_REPLICA_ID.pattern} "
                         "(letters, digits and . _ : @ -)")
    return replica_id


def replica_key(namespace: str, replica_id: str) -> str:
    return f"{namespace}:replica:{check_replica_id(replica_id)}"


def prefix_key(namespace: str, replica_id: str) -> str:
    return f"{namespace}:prefix:{check_replica_id(replica_id)}"


def replica_key_pattern(namespace: str) -> str:
    """The SCAN MATCH pattern of every replica record key in `namespace`."""
    escaped = _GLOB_SPECIAL.sub(r"\\\1", namespace)
    return f"{escaped}:replica:*"


def encode_block_hash(block_hash: int) -> str:
    """A block hash as a set member: its decimal digits (numpy integers accepted)."""
    return str(operator.index(block_hash))


_FIELD_TYPES = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,)}


@dataclass(frozen=True)
class ReplicaRecord:
    """What a DP replica tells the mesh about itself; the value of `{ns}:replica:{replica_id}`.

    `address` is the host:port of the replica's scheduler gRPC server. KV figures count blocks of
    `block_size` tokens over the whole replica. Times are Unix seconds; `updated_at` is stamped by
    the registry client on every write.
    """

    replica_id: str
    address: str
    model: str
    tp_size: int
    pp_size: int
    block_size: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_running: int
    num_waiting: int
    draining: bool = False
    started_at: float = 0.0
    updated_at: float = 0.0
    max_model_len: int = 0  # context length the replica serves; 0 = unknown
    # Since it started (for `meshserve status`): prompt tokens looked up in / found in the
    # prefix cache; and the generation tokens/s over its last heartbeat period.
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    generation_throughput: float = 0.0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, 0.0 … 1.0 (1.0 when the replica has no blocks)."""
        if self.num_kv_blocks <= 0:
            return 1.0
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ReplicaRecord":
        """Parse a record; unknown keys are ignored (newer writers), a missing or mistyped field
        raises ValueError."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"replica record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("replica record is not a JSON object")
        return cls(**{f.name: _field_value(f, data) for f in dataclasses.fields(cls)})


def _field_value(field: dataclasses.Field, data: dict[str, Any]) -> Any:
    if field.name not in data:
        if field.default is not dataclasses.MISSING:
            return field.default
        raise ValueError(f"replica record lacks {field.name!r}")
    value = data[field.name]
    allowed = _FIELD_TYPES[field.type]
    # bool is an int in Python; a JSON true must not pass for a count, nor 1 for a flag.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ValueError(f"replica record field {field.name!r} = {value!r} is not {field.type}")
    return float(value) if field.type == "float" else value
