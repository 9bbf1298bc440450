"""The registry: replica records with a TTL, load figures, draining state and the prefix-block
index, kept in Redis. `schema` documents the keys; `client.Registry` reads and writes them."""

from services.registry.client import Registry
from services.registry.schema import DEFAULT_NAMESPACE, DEFAULT_TTL_S, ReplicaRecord

__all__ = ["DEFAULT_NAMESPACE", "DEFAULT_TTL_S", "Registry", "ReplicaRecord"]
