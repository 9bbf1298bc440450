"""Shared fixtures.

Redis: one private redis-server for the whole session (`redis_url`); a test that needs an empty
database asks for `clean_redis`, which flushes it first and gives the same URL.
"""

from __future__ import annotations

import pytest
import redis

from deploy.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url():
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def clean_redis(redis_url):
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


# -- mesh fixtures (real processes) ---------------------------------------------------------------
