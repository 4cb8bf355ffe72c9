"""A private PostgreSQL cluster for the benchmark (the start logic of ``tests/servers.py``'s PostgresServer).

initdb in a temp dir, trust auth, a free port on 127.0.0.1, fsync off, ``track_functions=all`` so
``pg_stat_user_functions`` counts ``edgeway.batch``. initdb refuses to run as root, so as root the
cluster is created and run as the ``postgres`` OS user (``runuser``). Never the machine's shared one.

PostgreSQL's cumulative statistics lag: a backend flushes its pending counters at most once a second
while busy, and an idle one only after ``PGSTAT_IDLE_INTERVAL`` (10 s). Read them ``STATS_FLUSH``
seconds after the load stopped.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
MIGRATION = Path(__file__).resolve().parent.parent / "supabase" / "migrations" / "20261122000000_edgeway.sql"
STATS_FLUSH = 11.0  # seconds after the last query until every backend has flushed its statistics


def postgres_bin(name: str) -> str | None:
    """``name`` on PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: tuple(int(x) for x in p.parts[-3].split(".") if x.isdigit()))
    return str(candidates[-1]) if candidates else None


def postgres_version() -> str:
    """``postgres 15.4`` or ``postgres ?``."""
    postgres = postgres_bin("postgres")
    if postgres is not None:
        done = subprocess.run([postgres, "--version"], capture_output=True, text=True, check=False)
        found = re.search(r"\(PostgreSQL\) (\S+)", done.stdout)
        if found:
            return f"postgres {found[1]}"
    return "postgres ?"


@dataclass(frozen=True)
class PgSnapshot:
    """Cumulative counters: edgeway.batch calls and self time (ms), the database's committed transactions."""

    calls: int
    self_ms: float
    commits: int


class PostgresCluster:
    """initdb + pg_ctl start on a free port; :meth:`close` stops it and removes its directory."""

    def __init__(self) -> None:
        tools = {name: postgres_bin(name) for name in ("initdb", "pg_ctl")}
        missing = [name for name, path in tools.items() if path is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found (apt-get install postgresql)")
        self.initdb, self.pg_ctl = str(tools["initdb"]), str(tools["pg_ctl"])
        self.as_user: list[str] = []
        owner = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if runuser is None or owner is None:
                raise RuntimeError("as root, PostgreSQL needs the `postgres` OS user and runuser")
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="edgeway-bench-pg-"))
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data, self.logfile = self.dir / "data", self.dir / "postgres.log"
        self.port = 0
        self.started = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def log_tail(self, chars: int = 2000) -> str:
        return self.logfile.read_text(errors="replace")[-chars:] if self.logfile.exists() else ""

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        done = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stdout[-1000:]}"
                               f"{done.stderr[-1000:]}\n{self.log_tail()}")

    def start(self) -> PostgresCluster:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = int(sock.getsockname()[1])
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses={HOST} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                   "-c track_functions=all")
        self.started = True  # from here on close() stops it, even if pg_ctl start times out
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-o", options,
                  "start")
        return self

    def apply_migration(self) -> None:
        """Apply the edgeway migration with asyncpg, as the tests do."""
        import asyncpg

        async def apply() -> None:
            connection = await asyncpg.connect(self.dsn, timeout=10)
            try:
                await connection.execute(MIGRATION.read_text())
            finally:
                await connection.close()

        asyncio.run(apply())

    def snapshot(self) -> PgSnapshot:
        """The counters now (one short connection, one query: one transaction of its own)."""
        import asyncpg

        async def read() -> PgSnapshot:
            connection = await asyncpg.connect(self.dsn, timeout=10)
            try:
                row = await connection.fetchrow(
                    "select (select coalesce(sum(calls), 0)::bigint from pg_stat_user_functions"
                    "        where schemaname = 'edgeway' and funcname = 'batch') as calls,"
                    "       (select coalesce(sum(self_time), 0)::float8 from pg_stat_user_functions"
                    "        where schemaname = 'edgeway' and funcname = 'batch') as self_ms,"
                    "       (select xact_commit from pg_stat_database where datname = current_database()) as commits")
            finally:
                await connection.close()
            assert row is not None
            return PgSnapshot(int(row["calls"]), float(row["self_ms"]), int(row["commits"]))

        return asyncio.run(read())

    def close(self) -> None:
        """Stop the cluster (fast shutdown; SIGKILL its postmaster if that fails) and remove its directory."""
        try:
            if self.started:
                self.started = False
                try:
                    self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """SIGKILL this cluster's postmaster (its pid from postmaster.pid) and give its children a moment."""
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(1.0)  # the backends exit once their postmaster is gone
