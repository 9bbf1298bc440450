"""The step stream's frames over real loopback TCP connections."""

from __future__ import annotations

import asyncio
import socket

import pytest

from services.step import link


async def _listen():
    """(server, its port, a future of the first accepted connection's (reader, writer))."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def _pair():
    """(client reader, client writer, server reader, server writer) of one step stream, its
    HELLO taken."""
    server, port, accepted = await _listen()
    reader, writer = await link.connect("127.0.0.1", port)
    server_reader, server_writer = await accepted
    await link.accept(server_reader)
    return server, reader, writer, server_reader, server_writer


def test_frames_arrive_whole_and_in_order_whatever_their_size():
    async def main():
        server, reader, writer, s_reader, s_writer = await _pair()
        # 3 MiB: far past a StreamReader's 64 KiB buffer limit (a plan of many long prompts)
        payloads = [b"", b"x", bytes(range(256)) * 300, bytes(3 << 20), b"last"]
        for i, payload in enumerate(payloads):
            link.write_frame(writer, link.PLAN if i % 2 else link.RESULT, payload)
        got = [await link.read_frame(s_reader) for _ in payloads]
        writer.close()
        s_writer.close()
        server.close()
        return got, payloads

    got, payloads = asyncio.run(main())
    assert got == [(link.PLAN if i % 2 else link.RESULT, p) for i, p in enumerate(payloads)]


def test_the_stream_end_and_a_reset_read_as_a_closed_link():
    async def main():
        server, reader, writer, s_reader, s_writer = await _pair()
        link.write_frame(writer, link.PLAN, b"abc")
        writer.write(link.HEADER.pack(10, link.PLAN) + b"part")  # cut inside a frame
        await writer.drain()
        writer.close()
        first = await link.read_frame(s_reader)
        with pytest.raises(link.StepLinkClosed, match="closed the step stream"):
            await link.read_frame(s_reader)
        # A peer that resets (SO_LINGER 0: RST instead of FIN), as a killed host's kernel may.
        server2, reader2, writer2, s_reader2, s_writer2 = await _pair()
        sock = writer2.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer2.transport.abort()
        with pytest.raises(link.StepLinkClosed):
            await link.read_frame(s_reader2)
        for w in (s_writer, s_writer2):
            w.close()
        server.close()
        server2.close()
        return first

    assert asyncio.run(main()) == (link.PLAN, b"abc")


def test_a_frame_over_the_limit_is_refused_before_its_bytes_are_read():
    async def main():
        server, reader, writer, s_reader, s_writer = await _pair()
        writer.write(link.HEADER.pack(link.MAX_FRAME_BYTES + 1, link.PLAN))
        await writer.drain()
        with pytest.raises(link.StepLinkClosed, match="at most"):
            await link.read_frame(s_reader)
        writer.close()
        s_writer.close()
        server.close()

    asyncio.run(main())


def test_connections_probe_a_vanished_peer_within_seconds():
    async def main():
        server, reader, writer, s_reader, s_writer = await _pair()
        sock = writer.get_extra_info("socket")
        options = {name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                   for name, _ in link.KEEPALIVE if hasattr(socket, name)}
        keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        s_writer.close()
        server.close()
        return options, keepalive, nodelay

    options, keepalive, nodelay = asyncio.run(main())
    assert keepalive and nodelay
    assert options == {name: value for name, value in link.KEEPALIVE if name in options}


def _refusal(opening: bytes, timeout_s: float = 5.0) -> str:
    """What link.accept says of a connection that sends `opening` (raw bytes) and waits."""
    async def main():
        server, port, accepted = await _listen()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening)
        s_reader, s_writer = await accepted
        try:
            await link.accept(s_reader, timeout_s)
        except link.NotAStepStream as exc:
            return str(exc)
        finally:
            writer.close()
            s_writer.close()
            server.close()
        return "accepted"

    return asyncio.run(main())


def test_a_step_stream_opens_with_hello_and_nothing_else_is_taken_for_one():
    hello = link.HEADER.pack(link.HELLO_BODY.size, link.HELLO)
    assert _refusal(hello + link.HELLO_BODY.pack(link.MAGIC, link.VERSION)) == "accepted"
    assert _refusal(b"", timeout_s=0.2) == "no HELLO frame within 0.2 s"  # a TCP port probe
    assert "open with a HELLO" in _refusal(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "open with a HELLO" in _refusal(link.HEADER.pack(3, link.PLAN) + b"abc")
    assert _refusal(hello + link.HELLO_BODY.pack(link.MAGIC, link.VERSION + 1)) == (
        f"the scheduler speaks step protocol {link.VERSION + 1}, this worker {link.VERSION}: "
        "run the same meshserve release on both")

