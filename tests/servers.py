"""Real servers for tests: a private redis-server, fakeredis over TCP, ASGI apps under uvicorn.

Nothing here touches the machine's shared services: every server listens on a
free port of its own on 127.0.0.1 and is gone when its owner stops it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

__all__ = ["BRIDGE_TOKEN", "FakeRedisThread", "RedisServer", "UvicornThread", "free_port", "wait_for_port"]

HOST = "127.0.0.1"
BRIDGE_TOKEN = "test-bridge-token"
"""The token the test servers running ``gateway.upstash_bridge`` expect."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 10.0, alive: Any = None) -> None:
    """Wait until something accepts TCP connections on ``port``; ``alive()`` False aborts early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server meant for port {port} died while starting")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing accepted connections on {HOST}:{port} within {timeout} s")


class RedisServer:
    """A private ``redis-server`` on a random port (no persistence), stoppable and restartable.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :meth:`pause`
    (SIGSTOP) makes it accept connections but never answer; :meth:`restart` brings
    it back empty on the same port, as after a crash or failover.
    """

    def __init__(self, port: int | None = None, *, executable: str = "redis-server") -> None:
        path = shutil.which(executable)
        if path is None:
            raise RuntimeError(
                f"{executable} is not on PATH: the store tests need a real Redis "
                "(apt-get install redis-server; the test runner script installs it)"
            )
        self.executable = path
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="edgeway-redis-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log(self) -> str:
        path = self._dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, *, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return self
        self._dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self._dir), "--logfile", str(self._dir / "redis.log"),
        ]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"redis-server exited with {code}:\n{self.log[-2000:]}")
            if self._pong():
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING within {timeout} s")

    def _pong(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _signal(self, signum: int) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signum)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections open, no answers."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def stop(self, *, timeout: float = 5.0) -> None:
        """Shut down cleanly (SIGTERM), killing it if it lingers; a no-op when not running."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if self.paused:
            process.send_signal(signal.SIGCONT)
            self.paused = False
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self.paused = False

    def restart(self) -> RedisServer:
        """Stop and start again on the same port; the data and script cache are gone."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class UvicornThread:
    """Serve an ASGI app with uvicorn (lifespan on) in a background thread on a free port."""

    def __init__(self, app: Any, *, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        options: dict[str, Any] = {"lifespan": "on", "log_level": "warning", "loop": "asyncio"}
        options.update(config)
        self.server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=self.port, **options))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, *, timeout: float = 10.0) -> UvicornThread:
        """Start serving and wait until the port accepts connections."""
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"uvicorn on port {self.port} exited while starting (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"uvicorn on port {self.port} did not start within {timeout} s")
            time.sleep(0.01)
        wait_for_port(self.port, timeout=timeout)
        return self

    def stop(self, *, grace: float = 2.0) -> None:
        """Ask the server to exit; force it (dropping hung requests) after ``grace`` seconds."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.server.should_exit = True
        thread.join(grace)
        if thread.is_alive():
            self.server.force_exit = True
            thread.join(5.0)

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answering_handler(base: Any) -> Any:
    """fakeredis's TCP handler, fixed to answer an error reply and go on rather than hang up.

    fakeredis 2.40's ``TCPFakeRequestHandler`` lets the ``ResponseError`` of any
    failed command (``NOSCRIPT``, ``WRONGTYPE``) escape its loop, writes it and then
    closes the connection, which a real Redis never does.
    """
    from redis.exceptions import ResponseError

    class Handler(base):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            read = self.current_client.read_response

            def read_response(*args: Any, **kwargs: Any) -> Any:
                try:
                    return read(*args, **kwargs)
                except ResponseError as exc:
                    return exc  # encoded as an error reply by the writer

            self.current_client.read_response = read_response

    return Handler


class FakeRedisThread:
    """``fakeredis.TcpFakeServer`` (with Lua) on a free port, served from a background thread."""

    def __init__(self, port: int | None = None) -> None:
        from fakeredis import TcpFakeServer

        self.port = port or free_port()
        self.server = TcpFakeServer((HOST, self.port))
        self.server.RequestHandlerClass = _answering_handler(self.server.RequestHandlerClass)
        self._thread = threading.Thread(target=self.server.serve_forever, name="fakeredis", daemon=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> FakeRedisThread:
        self._thread.start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> FakeRedisThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

