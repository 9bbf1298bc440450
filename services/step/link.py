"""The step stream between a scheduler and each of its workers: protobuf frames on one TCP
connection, a few microseconds of Python per frame.

    scheduler ──HELLO─►  worker      once, first: the step protocol and its version
    scheduler ──PLAN──►  worker      every worker of the replica gets every plan, in order
    scheduler ◄─RESULT── worker      the sampling worker (TP rank 0, last stage), in plan order
    scheduler ◄─ERROR─── worker      any worker whose step failed, then it closes

A frame is its payload's length (4 bytes, little-endian), its kind (1 byte), then the payload:
a serialized `meshserve.internal.v1.StepPlan` or `StepResult`, or a UTF-8 message. This is the
mesh's hottest path, crossed twice per decode step (about a millisecond on a GPU): a gRPC
stream costs some 70 us of CPU per message on each side, on the scheduler's event loop, where
a frame on an asyncio stream costs a quarter of that (`bench/bench_mesh.py` shows what it
leaves of a step). Everything else between the mesh's processes stays gRPC: the worker's
Describe, which tells the scheduler the port of this stream, its health and its drain.

A worker serves one scheduler's connection at a time: a new one is a new scheduler, and the
last one's sequences no longer hold. A connection counts as a scheduler's only once its HELLO
came (within HELLO_TIMEOUT_S): a port probe, a scanner or a client of another protocol never
takes the worker, and a scheduler of another meshserve release is told why it was refused.
A dead peer shows as the connection's end at once on one host (the kernel closes a killed
process's sockets) and within about 3 s across hosts (KEEPALIVE).
"""

from __future__ import annotations

import asyncio
import socket
import struct

PLAN, RESULT, ERROR, HELLO = 1, 2, 3, 4
HEADER = struct.Struct("<IB")  # payload length, kind
MAGIC, VERSION = b"meshstep", 1  # the HELLO's payload; VERSION changes with the frames' meaning
HELLO_BODY = struct.Struct("<8sI")  # magic, version
HELLO_TIMEOUT_S = 10.0
MAX_FRAME_BYTES = 64 << 20  # as the gRPC channels' message limit
# A peer whose host vanished (no FIN, no reset) is given up within about 3 s, as gRPC's
# keepalive pings did for these streams: an idle connection probes after 1 s, once a second,
# twice; one with data unacknowledged for 3 s is dropped. The peer's kernel answers the probes,
# so a long step is not mistaken for a dead worker.
KEEPALIVE = (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2),
             ("TCP_USER_TIMEOUT", 3000))  # seconds, seconds, probes, milliseconds


class StepLinkClosed(ConnectionError):
    """The other end closed the stream, or the connection broke."""


class FrameTooLarge(StepLinkClosed):
    """A header announcing more than MAX_FRAME_BYTES (or another protocol's bytes)."""


class NotAStepStream(ConnectionError):
    """A connection that did not open with a scheduler's HELLO of this VERSION (says why)."""


def tune(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay (asyncio's default for TCP, set again to be sure) and keepalive probes,
    so a peer whose host vanished is noticed within seconds."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        if hasattr(socket, name):  # Linux; elsewhere the system's keepalive times hold
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def write_frame(writer: asyncio.StreamWriter, kind: int, payload: bytes) -> None:
    """Queues one frame (the transport sends it off this call, in order)."""
    writer.writelines((HEADER.pack(len(payload), kind), payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(kind, payload) of the next frame; StepLinkClosed at the stream's end."""
    try:
        length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
        if length <= MAX_FRAME_BYTES:
            return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise StepLinkClosed("it closed the step stream") from exc
    except OSError as exc:  # reset by a peer that died, or timed out on a vanished one
        raise StepLinkClosed(f"the step stream broke ({exc.strerror or exc})") from exc
    raise FrameTooLarge(f"a step frame of {length} bytes (at most {MAX_FRAME_BYTES})")


async def connect(host: str, port: int, timeout_s: float = 30.0):
    """(reader, writer) of a new step stream to the worker at host:port, its HELLO sent."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    tune(writer)
    write_frame(writer, HELLO, HELLO_BODY.pack(MAGIC, VERSION))
    return reader, writer


async def accept(reader: asyncio.StreamReader, timeout_s: float = HELLO_TIMEOUT_S) -> None:
    """The worker's side of connect: returns once a scheduler's HELLO of this VERSION came;
    NotAStepStream for anything else within timeout_s, StepLinkClosed if it went first."""
    try:
        kind, payload = await asyncio.wait_for(read_frame(reader), timeout_s)
    except asyncio.TimeoutError:
        raise NotAStepStream(f"no HELLO frame within {timeout_s:g} s") from None
    except FrameTooLarge:
        kind, payload = -1, b""  # most likely another protocol's bytes
    if kind != HELLO or len(payload) != HELLO_BODY.size or payload[:len(MAGIC)] != MAGIC:
        raise NotAStepStream("this port takes meshserve step streams, which open with a HELLO "
                             "frame (services/step/link.py)")
    version = HELLO_BODY.unpack(payload)[1]
    if version != VERSION:
        raise NotAStepStream(f"the scheduler speaks step protocol {version}, this worker "
                             f"{VERSION}: run the same meshserve release on both")
