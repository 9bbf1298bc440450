"""The served benchmarks' streaming clients (bench/bench_decode.py's client_streams, under
served_stats, which bench_mesh.py and the GPU runs use) against a live mesh, through each
door: every stream's every token counted, its figures consistent with its stamps."""

from __future__ import annotations

import time

import pytest

from bench.bench_decode import client_streams


@pytest.mark.parametrize("door", ["grpc", "http"])
def test_the_served_benchmark_counts_every_token_through_each_door(mesh, door):
    address = f"127.0.0.1:{mesh.http_port}" if door == "http" else mesh.gateway_address
    prompts = [[1, 5 + i, 6 + i, 7] for i in range(6)]
    streams = client_streams(address, prompts, 12, time.time(), door)
    assert [n for _, n, *_ in streams] == [12] * 6
    for itl_s, n, sent, last, gaps in streams:
        # a gap before every token after the first message (which holds more than one token
        # when the gateway read the stream late)
        assert 0 < len(gaps) <= n - 1
        assert 0 < itl_s < last - sent  # the mean gap, inside the stream's own time
        assert sum(gaps) == pytest.approx(itl_s * len(gaps))
