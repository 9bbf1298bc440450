"""The stage link's bytes: header and address layouts, and what they refuse."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from services.stagelink import ActivationHeader, StageLinkError
from services.stagelink.wire import (
    FLAG_INLINE,
    HEADER_BYTES,
    MAX_META_BYTES,
    pack_address,
    pack_header,
    unpack_address,
    unpack_header,
)


def test_header_round_trip_exact_bytes():
    h = ActivationHeader(2**63 + 5, 7, (16, 4096), "bfloat16", b"\x00seq ids\xff")
    packed = pack_header(h)
    assert HEADER_BYTES == 88 and len(packed) == 88 + 9
    assert packed[:4] == b"MSLH"
    assert struct.unpack_from("<IIQ", packed, 8) == (7, 9, 2**63 + 5)
    assert struct.unpack_from("<2Q", packed, 24) == (16, 4096)
    # The receiver reads from a buffer larger than the message; what follows is ignored.
    assert unpack_header(packed + b"\xab" * 100) == (h, None)


def test_header_with_inline_payload():
    h = ActivationHeader(3, 1, (2, 2), "float32", b"meta")
    payload = torch.arange(4, dtype=torch.float32).numpy()
    packed = pack_header(h, memoryview(payload).cast("B"))
    assert packed[7] == FLAG_INLINE and len(packed) == HEADER_BYTES + 4 + 16
    header, inline_at = unpack_header(packed + b"\x00" * 7)
    assert header == h and inline_at == HEADER_BYTES + 4
    assert packed[inline_at:inline_at + h.nbytes] == payload.tobytes()


@pytest.mark.parametrize("shape,dtype,nbytes", [
    ((16, 4096), "bfloat16", 16 * 4096 * 2), ((0, 4096), "float32", 0), ((), "int64", 8),
    ((1, 2, 3, 4, 5, 6, 7, 8), "uint8", 40320),
])
def test_header_nbytes_and_shapes(shape, dtype, nbytes):
    h = ActivationHeader(1, 0, shape, dtype)
    assert h.nbytes == nbytes
    assert unpack_header(pack_header(h)) == (h, None)


def test_header_for_tensor_and_list_shape():
    t = torch.zeros(3, 5, dtype=torch.bfloat16)
    assert ActivationHeader.for_tensor(4, 1, t) == ActivationHeader(4, 1, (3, 5), "bfloat16")
    assert ActivationHeader(0, 0, [2, 3], "float32").shape == (2, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="complex64"), "cannot travel"),
    (dict(shape=(1,) * 9), "at most 8 dims"),
    (dict(shape=(2, -1)), "none negative"),
    (dict(meta=b"x" * (MAX_META_BYTES + 1)), "meta is"),
    (dict(step_id=-1), "u64"),
    (dict(micro_batch=2**32), "u32"),
])
def test_header_refuses(kwargs, message):
    fields = dict(step_id=0, micro_batch=0, shape=(1,), dtype="float32") | kwargs
    with pytest.raises(ValueError, match=message):
        ActivationHeader(**fields)


def test_unpack_header_refuses_other_messages():
    with pytest.raises(StageLinkError, match="not an activation header"):
        unpack_header(b"\x00" * HEADER_BYTES)


def test_address_round_trip_and_layout():
    worker = bytes(range(200))
    packed = pack_address(0xABCD_0000_0000_1230, worker)
    assert packed[:5] == b"MSLA\x01" and len(packed) == 24 + 200
    tag = 0xABCD_0000_0000_1230
    assert struct.unpack_from("<QII", packed, 8) == (tag, zlib.crc32(worker), 200)
    assert unpack_address(packed) == (0xABCD_0000_0000_1230, worker)


def test_address_refuses_damage():
    packed = pack_address(16, b"worker address bytes")
    with pytest.raises(StageLinkError, match="too short"):
        unpack_address(packed[:20])
    with pytest.raises(StageLinkError, match="not a stage link address"):
        unpack_address(b"XXXX" + packed[4:])
    with pytest.raises(StageLinkError, match="wire version 9"):
        unpack_address(packed[:4] + b"\x09" + packed[5:])
    with pytest.raises(StageLinkError, match="truncated or corrupted"):
        unpack_address(packed[:-1])
    with pytest.raises(StageLinkError, match="truncated or corrupted"):
        unpack_address(packed[:-1] + b"?")
