"""What a stage link puts on the wire, as bytes. No UCX and no torch here.

One activation is one or two UCX tag messages on the link's endpoint, sent in this order:

    tag = link_tag | HEADER_TAG    [ header struct (88 B) | meta (meta_len B) | inline payload ]
    tag = link_tag | PAYLOAD_TAG   [ raw tensor bytes (prod(shape) * itemsize B) ]
                                   (left out when the tensor has no elements or went inline)

    header struct, little-endian:
    | magic "MSLH" | version u8 | dtype code u8 | ndim u8 | flags u8 | micro_batch u32 |
    | meta_len u32 | step_id u64 | dims u64 x MAX_NDIM (unused ones 0) |

    flags: FLAG_INLINE = the tensor bytes follow the meta in the header message (small host
    tensors: one message instead of two saves a round trip; CUDA tensors never go inline).

The published address of a link (what `StageLink.start()` returns and `connect()` takes):

    | magic "MSLA" | version u8 | pad x3 | link_tag u64 | crc32(worker address) u32 |
    | len(worker address) u32 | UCX worker address |

`link_tag` is random per receiving link with its low TAG_KIND_BITS clear, so links that end in
one process (one UCX worker) never match each other's messages.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

from services.stagelink.errors import StageLinkError

WIRE_VERSION = 1
MAX_NDIM = 8
MAX_META_BYTES = 1 << 16
# Up to this many tensor bytes go inline. One message instead of two measured here: 1 token x
# 4096 float32 (16 KiB) 42k -> 61-68k activations/s, 64 KiB 36k -> 48k/s, 256 KiB no gain.
MAX_INLINE_BYTES = 1 << 16
FLAG_INLINE = 1

TAG_KIND_BITS = 2
HEADER_TAG = 1
PAYLOAD_TAG = 2

# torch dtype name -> (wire code, itemsize). Codes are part of the wire format: never reuse one.
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (1, 4), "float16": (2, 2), "bfloat16": (3, 2), "float64": (4, 8),
    "int64": (5, 8), "int32": (6, 4), "int16": (7, 2), "int8": (8, 1), "uint8": (9, 1),
    "bool": (10, 1), "float8_e4m3fn": (11, 1), "float8_e5m2": (12, 1),
}
_DTYPE_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}

_HEADER = struct.Struct(f"<4sBBBBIIQ{MAX_NDIM}Q")
_HEADER_MAGIC = b"MSLH"
HEADER_BYTES = _HEADER.size
MAX_HEADER_MESSAGE_BYTES = HEADER_BYTES + MAX_META_BYTES + MAX_INLINE_BYTES

_ADDRESS = struct.Struct("<4sBxxxQII")
_ADDRESS_MAGIC = b"MSLA"


@dataclass(frozen=True)
class ActivationHeader:
    """Describes one tensor sent over a stage link. `meta` is opaque to the link."""

    step_id: int
    micro_batch: int
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.": "bfloat16", "float32", "int64", ...
    meta: bytes = b""

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "meta", bytes(self.meta))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} cannot travel on a stage link; "
                             f"use one of {sorted(DTYPES)}")
        if len(self.shape) > MAX_NDIM or any(d < 0 for d in self.shape):
            raise ValueError(f"shape {self.shape}: at most {MAX_NDIM} dims, none negative")
        if len(self.meta) > MAX_META_BYTES:
            raise ValueError(f"meta is {len(self.meta)} bytes; at most {MAX_META_BYTES}")
        if not (0 <= self.step_id < 1 << 64 and 0 <= self.micro_batch < 1 << 32):
            raise ValueError("step_id must fit in u64 and micro_batch in u32")

    @classmethod
    def for_tensor(cls, step_id: int, micro_batch: int, tensor,
                   meta: bytes = b"") -> ActivationHeader:
        return cls(step_id, micro_batch, tuple(tensor.shape),
                   str(tensor.dtype).removeprefix("torch."), meta)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def pack_header(h: ActivationHeader, inline_payload=None) -> bytes:
    """The header message; `inline_payload` (the tensor's bytes, at most MAX_INLINE_BYTES)
    travels in it when given."""
    dims = h.shape + (0,) * (MAX_NDIM - len(h.shape))
    flags = 0 if inline_payload is None else FLAG_INLINE
    fixed = _HEADER.pack(_HEADER_MAGIC, WIRE_VERSION, DTYPES[h.dtype][0], len(h.shape), flags,
                         h.micro_batch, len(h.meta), h.step_id, *dims)
    if inline_payload is None:
        return fixed + h.meta
    return b"".join((fixed, h.meta, inline_payload))


def unpack_header(message) -> tuple[ActivationHeader, int | None]:
    """Returns the header and where its inline payload starts in `message` (None: the payload
    is a message of its own). `message` may be longer than what was sent (a receive buffer of
    MAX_HEADER_MESSAGE_BYTES)."""
    magic, version, code, ndim, flags, micro_batch, meta_len, step_id, *dims = \
        _HEADER.unpack_from(message)
    if magic != _HEADER_MAGIC or version != WIRE_VERSION or code not in _DTYPE_BY_CODE:
        raise StageLinkError(f"stage link received a message that is not an activation header "
                             f"(magic {magic!r}, version {version}, dtype code {code}): both "
                             f"ends must run the same meshserve version, one sender per link")
    meta = bytes(message[HEADER_BYTES:HEADER_BYTES + meta_len])
    header = ActivationHeader(step_id, micro_batch, tuple(dims[:ndim]), _DTYPE_BY_CODE[code], meta)
    return header, (HEADER_BYTES + meta_len if flags & FLAG_INLINE else None)


def pack_address(link_tag: int, worker_address: bytes) -> bytes:
    fixed = _ADDRESS.pack(_ADDRESS_MAGIC, WIRE_VERSION, link_tag, zlib.crc32(worker_address),
                          len(worker_address))
    return fixed + worker_address


def unpack_address(address: bytes) -> tuple[int, bytes]:
    """Returns (link_tag, UCX worker address). Checks everything before UCX sees the bytes:
    UCX aborts the process on some malformed worker addresses."""
    address = bytes(address)
    if len(address) < _ADDRESS.size:
        raise StageLinkError(f"stage link address is {len(address)} bytes, too short: pass the "
                             f"bytes that StageLink.start() returned on the next stage")
    magic, version, link_tag, crc, length = _ADDRESS.unpack_from(address)
    worker_address = address[_ADDRESS.size:]
    if magic != _ADDRESS_MAGIC:
        raise StageLinkError(f"not a stage link address (magic {magic!r}): pass the bytes that "
                             f"StageLink.start() returned on the next stage")
    if version != WIRE_VERSION:
        raise StageLinkError(f"stage link address has wire version {version}, this process "
                             f"speaks {WIRE_VERSION}: run the same meshserve version everywhere")
    if length != len(worker_address) or zlib.crc32(worker_address) != crc:
        raise StageLinkError("stage link address is truncated or corrupted (length or checksum "
                             "mismatch): it must travel as raw bytes, unmodified")
    return link_tag, worker_address
