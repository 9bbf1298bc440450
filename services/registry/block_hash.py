"""Chained hashes of full KV blocks: the key of the prefix cache and of the Redis prefix index.

The scheduler (which caches blocks) and the gateway (which routes by the longest cached prefix)
must compute the same numbers in different processes on different machines, so the hash is
BLAKE2b over a fixed byte encoding, never Python's ``hash()``::

    block i of a prompt, block_size = 4, tokens t0 t1 t2 ...

      h0 = H(None, [t0  t1  t2  t3 ], extra)
      h1 = H(h0,   [t4  t5  t6  t7 ], extra)
      h2 = H(h1,   [t8  t9  t10 t11], extra)
      (t12 t13: a partial block, never hashed)

    H(parent, tokens, extra) = blake2b(digest_size=8, person=PERSON)(
        u8  has_parent (0 | 1)
        u64 parent     (0 when has_parent = 0)      all integers little-endian
        u32 num_tokens
        u32 token_ids[num_tokens]
        extra bytes    (the rest of the message)
    ) read as a little-endian unsigned 64-bit int

A block's hash therefore names the whole prefix up to and including it, under one model and
cache salt (``extra``). Changing any byte of this encoding changes every hash in a live mesh:
bump ``PERSON`` when doing so, and the golden test will tell you it changed.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

PERSON = b"meshserve-kv-v1"  # BLAKE2b personalization: separates these hashes from any others

_HEADER = struct.Struct("<BQI")  # has_parent, parent, num_tokens
_TOKEN_BYTES = 4  # token ids are packed as uint32
_LEN = struct.Struct("<I")
_BASE = hashlib.blake2b(digest_size=8, person=PERSON)  # copied, never updated in place


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes; OverflowError for ids outside [0, 2**32)."""
    packed = array("I", token_ids)
    if packed.itemsize != _TOKEN_BYTES:  # pragma: no cover - no such CPython platform today
        return struct.pack(f"<{len(packed)}I", *packed)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def _digest(parent: int | None, num_tokens: int, token_bytes, extra: bytes) -> int:
    h = _BASE.copy()
    h.update(_HEADER.pack(parent is not None, parent or 0, num_tokens))
    h.update(token_bytes)
    h.update(extra)
    return int.from_bytes(h.digest(), "little")


def hash_block(parent: int | None, token_ids: Sequence[int], extra_key: bytes = b"") -> int:
    """The chained hash of one block: an unsigned 64-bit int, equal in every process."""
    return _digest(parent, len(token_ids), _pack_tokens(token_ids), extra_key)


def extra_key(model: str, cache_salt: str = "") -> bytes:
    """What besides the tokens decides a block's contents: the model and the request's cache salt.

    Each part is length-prefixed, so ("ab", "c") and ("a", "bc") give different keys.
    """
    out = bytearray()
    for part in (model, cache_salt):
        raw = part.encode("utf-8")
        out += _LEN.pack(len(raw)) + raw
    return bytes(out)


def chain_block_hashes(
    parent: int | None, token_ids: Sequence[int], block_size: int, extra_key: bytes = b""
) -> list[int]:
    """Hashes of the full blocks of ``token_ids``, chained on from ``parent``.

    The tokens are packed once; a trailing partial block is ignored.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full = len(token_ids) // block_size
    if num_full == 0:
        return []
    data = memoryview(_pack_tokens(token_ids[: num_full * block_size]))
    step = block_size * _TOKEN_BYTES
    hashes: list[int] = []
    for start in range(0, num_full * step, step):
        parent = _digest(parent, block_size, data[start : start + step], extra_key)
        hashes.append(parent)
    return hashes


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, extra_key: bytes = b"") -> list[int]:
    """The chain over the full blocks of a prompt: ``[h0, h1, ...]``, one per full block."""
    return chain_block_hashes(None, token_ids, block_size, extra_key)
