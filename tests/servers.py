"""Real servers for tests: a private redis-server, fakeredis over TCP, ASGI apps under uvicorn.

Nothing here touches the machine's shared services: every server listens on a
free port of its own on 127.0.0.1 and is gone when its owner stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

__all__ = [
    "BRIDGE_TOKEN", "FakeRedisThread", "Gateways", "RedisServer", "UvicornThread", "free_port", "ok_app",
    "wait_for_port",
]

HOST = "127.0.0.1"
BRIDGE_TOKEN = "test-bridge-token"
"""The token the test servers running ``edgeway.gateway.upstash_bridge`` expect."""


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

    def __init__(self, port: int | None = None, *, executable: str = "redis-server",
                 args: tuple[str, ...] = ()) -> None:
        path = shutil.which(executable)
        if path is None:
            raise RuntimeError(
                f"{executable} is not on PATH: the store tests need a real Redis "
                "(apt-get install redis-server; the test runner script installs it)"
            )
        self.executable = path
        self.args = args  # extra server options, e.g. ("--replicaof", HOST, "6380") or ("--maxmemory", "2mb")
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
            "--daemonize", "no", "--dir", str(self._dir), "--logfile", str(self._dir / "redis.log"), *self.args,
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



# -- PostgreSQL ---------------------------------------------------------------------

SERVICE_KEY = "test-service-role-key"
"""The key the PostgREST stub (``tests.postgrest_stub``) expects as apikey and Bearer token."""

MIGRATION_PATH = Path(__file__).resolve().parent.parent / "supabase" / "migrations" / "20261122000000_edgeway.sql"

__all__ += ["MIGRATION_PATH", "SERVICE_KEY", "PostgresServer", "apply_migration"]


def postgres_bin(name: str) -> str | None:
    """``name`` on PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: _version(p.parts[-3]))
    return str(candidates[-1]) if candidates else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


class PostgresServer:
    """A private PostgreSQL cluster in a temp dir (trust auth, fsync off) on a free port.

    initdb refuses to run as root, so as root the cluster is created and run as the
    ``postgres`` OS user (``runuser``); otherwise as the current user.
    """

    def __init__(self, port: int | None = None, *, settings: dict[str, str] | None = None) -> None:
        self.settings = dict(settings or {})  # extra server settings (-c name=value)
        missing = [name for name in ("initdb", "pg_ctl") if postgres_bin(name) is None]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} not found on PATH or in /usr/lib/postgresql/*/bin: the store tests need "
                "PostgreSQL (apt-get install postgresql; the test runner script scripts/test installs it)"
            )
        self.initdb = postgres_bin("initdb") or ""
        self.pg_ctl = postgres_bin("pg_ctl") or ""
        self.port = port or free_port()
        self._as: list[str] = []
        import pwd

        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if runuser is None or owner is None:
                raise RuntimeError(
                    "running as root, PostgreSQL must run as another user: need the `postgres` OS user "
                    "(created by apt-get install postgresql) and runuser"
                )
            self._as = [runuser, "-u", "postgres", "--"]
        self._dir = Path(tempfile.mkdtemp(prefix="edgeway-pg-"))
        if owner is not None:
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
        self.data = self._dir / "data"
        self.started = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def log(self) -> str:
        path = self._dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                f"\n{self.log[-2000:]}"
            )

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        options = f"-p {self.port} -k {self._dir} -c listen_addresses={HOST} -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self._dir / "postgres.log"), "-w", "-t", "60",
                  "-o", options, "start")
        self.started = True
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """Fast shutdown; if pg_ctl fails, SIGKILL this cluster's postmaster (never another one)."""
        if self.started:
            self.started = False
            try:
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            return
        time.sleep(1.0)  # its backends exit once the postmaster is gone

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def apply_migration(dsn: str, path: Path = MIGRATION_PATH) -> None:
    """Apply the edgeway migration with asyncpg, as the tests do (``conn.execute(sql)``)."""
    import asyncio

    import asyncpg

    async def apply() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            await connection.execute(path.read_text())
        finally:
            await connection.close()

    # in a thread of its own: the caller may be a fixture running inside an event loop
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, apply()).result(timeout=60)


async def lifespan(receive: Any, send: Any) -> None:
    """A test app's side of the ASGI lifespan protocol: started at once, stopped when asked."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Any) -> bytes:
    """A test app's whole request body (every ``http.request`` message until ``more_body`` is false)."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The smallest upstream: every request gets 200 ``ok`` (lifespan supported)."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class FlakyUpstream:
    """An upstream the test makes fail, hang and recover; it counts the requests it got, by method.

    ``status``: what it answers; ``hang``: seconds it waits before answering (past the gateway's read
    timeout: a 504 upstream_timeout); ``gate``: when set, requests wait until it is released. Serve it
    with :class:`UvicornThread`; the counters are read from the test's thread.
    """

    def __init__(self) -> None:
        self.status = 200
        self.hang = 0.0
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] == "lifespan":
            await ok_app(scope, receive, send)
            return
        with self._lock:
            self.calls[scope["method"]] = self.calls.get(scope["method"], 0) + 1
            self.in_flight += 1
        try:
            if self.gate is not None:
                gate = self.gate
                while not gate.is_set():
                    await asyncio.sleep(0.005)
            if self.hang:
                await asyncio.sleep(self.hang)
            body = f"status {self.status}".encode()
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        finally:
            with self._lock:
                self.in_flight -= 1


__all__ += ["FlakyUpstream"]


class Gateways:
    """`edgeway serve` processes (two by default) on one policy, on free ports; logs in ``log_dir``
    (:meth:`log` reads one)."""

    def __init__(self, policy: Path, log_dir: Path, count: int = 2) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.log_dir = log_dir
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "edgeway.gateway.cli", "serve", "--policy", str(policy), "--port", str(port),
                 "--log-level", "warning"],
                stdout=open(log_dir / f"gateway-{port}.log", "wb"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
            )
            for port in self.ports
        ]
        for port, process in zip(self.ports, self.processes, strict=True):
            wait_for_port(port, timeout=20, alive=lambda p=process: p.poll() is None)

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    def log(self, index: int) -> str:
        return (self.log_dir / f"gateway-{self.ports[index]}.log").read_text(errors="replace")

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
