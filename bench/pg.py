"""A private PostgreSQL cluster for the benchmark: ``tests/servers.py``'s PostgresServer (initdb in a
temp dir, trust auth, a free port, fsync off; as root run as the ``postgres`` OS user) with
``track_functions=all`` so ``pg_stat_user_functions`` counts ``edgeway.batch``. Never the machine's shared one.

PostgreSQL's cumulative statistics lag: a backend flushes its pending counters at most once a second
while busy, and an idle one only after ``PGSTAT_IDLE_INTERVAL`` (10 s). Read them ``STATS_FLUSH``
seconds after the load stopped.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import PostgresServer, apply_migration, postgres_bin

__all__ = ["STATS_FLUSH", "PgSnapshot", "PostgresCluster", "postgres_bin", "postgres_version"]

STATS_FLUSH = 11.0  # seconds after the last query until every backend has flushed its statistics


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


class PostgresCluster(PostgresServer):
    """The tests' private PostgreSQL cluster, counting function calls, with the benchmark's readings."""

    def __init__(self) -> None:
        super().__init__(settings={"track_functions": "all"})

    def log_tail(self, chars: int = 2000) -> str:
        return self.log[-chars:]

    def apply_migration(self) -> None:
        """Apply the edgeway migration, as the tests do."""
        apply_migration(self.dsn)

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
