"""The chained block hash: fixed encoding, stable across processes, full blocks only."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.registry.block_hash import (
    chain_block_hashes,
    extra_key,
    hash_block,
    prefix_block_hashes,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EK = extra_key("meta-llama/Llama-3.1-8B", "salt")


def test_golden_values():
    # Changing these means every hash in a running mesh (and the Redis index) changes meaning.
    assert hash_block(None, [1, 2, 3, 4]) == 11874830778583244670
    assert hash_block(None, [1, 2, 3, 4], EK) == 4835472097105945891
    assert hash_block(0x0123456789ABCDEF, [0, 1, 2**32 - 1, 7], b"x") == 9620954555521446873
    assert extra_key("ab", "c") == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_encoding_spelled_out():
    message = (
        b"\x01"  # has parent
        + (5).to_bytes(8, "little")
        + (3).to_bytes(4, "little")  # num tokens
        + b"".join(t.to_bytes(4, "little") for t in (7, 8, 70000))
        + b"extra"
    )
    digest = hashlib.blake2b(message, digest_size=8, person=b"meshserve-kv-v1").digest()
    assert hash_block(5, [7, 8, 70000], b"extra") == int.from_bytes(digest, "little")


def test_same_in_another_process():
    code = (
        "from services.registry.block_hash import extra_key, prefix_block_hashes\n"
        "print(prefix_block_hashes(list(range(100, 164)), 16, extra_key('m', 's')))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(prefix_block_hashes(list(range(100, 164)), 16, extra_key("m", "s")))


def test_result_is_unsigned_64_bit():
    values = [hash_block(p, [t], b"") for p in (None, 1) for t in range(200)]
    assert all(0 <= v < 2**64 for v in values)
    assert max(values) >= 2**63  # the top bit is used: unsigned, not a signed int


@pytest.mark.parametrize(
    "other",
    [
        (0, [1, 2, 3, 4], b""),  # parent 0 is not "no parent"
        (1, [1, 2, 3, 4], b""),
        (None, [1, 2, 3, 5], b""),
        (None, [2, 1, 3, 4], b""),
        (None, [1, 2, 3], b""),
        (None, [1, 2, 3, 4], b"k"),
    ],
)
def test_any_input_change_changes_the_hash(other):
    assert hash_block(*other) != hash_block(None, [1, 2, 3, 4], b"")


def test_extra_key_parts_are_length_prefixed():
    assert extra_key("ab", "c") != extra_key("a", "bc")
    assert extra_key("m") == extra_key("m", "")
    assert extra_key("m", "s1") != extra_key("m", "s2")
    assert extra_key("m1", "s") != extra_key("m2", "s")


def test_only_full_blocks_are_hashed():
    tokens = list(range(10))
    h0 = hash_block(None, [0, 1, 2, 3], EK)
    h1 = hash_block(h0, [4, 5, 6, 7], EK)
    assert prefix_block_hashes(tokens, 4, EK) == [h0, h1]
    assert prefix_block_hashes(tokens[:8], 4, EK) == [h0, h1]
    assert prefix_block_hashes(tokens[:7], 4, EK) == [h0]
    assert prefix_block_hashes(tokens[:3], 4, EK) == []
    assert prefix_block_hashes([], 4, EK) == []


def test_chain_continues_from_a_parent():
    tokens = list(range(1000, 1064))
    full = prefix_block_hashes(tokens, 16, EK)
    assert chain_block_hashes(full[1], tokens[32:], 16, EK) == full[2:]


def test_sequence_types_agree():
    tokens = list(range(32))
    assert prefix_block_hashes(tuple(tokens), 8) == prefix_block_hashes(range(32), 8)
    assert prefix_block_hashes(tokens, 8) == prefix_block_hashes(tuple(tokens), 8)


def test_extra_key_separates_chains():
    tokens = list(range(16))
    chain_a = prefix_block_hashes(tokens, 4, extra_key("m", "a"))
    chain_b = prefix_block_hashes(tokens, 4, extra_key("m", "b"))
    assert len(chain_a) == len(chain_b) == 4
    assert not set(chain_a) & set(chain_b)


def test_bad_input_is_refused():
    with pytest.raises(OverflowError):
        hash_block(None, [2**32])
    with pytest.raises(OverflowError):
        hash_block(None, [-1])
    with pytest.raises(ValueError):
        prefix_block_hashes([1, 2], 0)
