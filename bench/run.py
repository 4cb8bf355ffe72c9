"""Edgeway benchmark harness: one command, every server started and stopped by it.

    .venv/bin/python bench/run.py [--rounds 5] [--duration 5] [--warmup 2] [--targets edgeway,baseline]
                                  [--no-write]

Starts nginx serving a 1 KB static file (the upstream), a private
``redis-server`` for each Redis-backed target, a private PostgreSQL cluster
(``bench/pg.py``) for the PostgreSQL fallback target, and every target, all on
free ports, and checks one response through each (and that the fallback target
runs in fallback mode). Then it measures in rounds, to average out noisy
neighbours: in every round it runs ``wrk -t2 -c32 --latency`` against each
target in turn, in the order of ``TARGETS`` in odd rounds and the reverse order in
even ones, so neither target of a pair always runs first, each round on a new
process of each target warmed up just before (see ``fresh_process``), with the
measured servers on a CPU of their own (see ``pin_cpus``). Per target it reports
the median req/s over the rounds, the p50/p99 of the median round and the
min-max spread. A goal ratio is the median over the
rounds of the paired ratio (target over reference in the same round, their runs
seconds apart in the order of ``TARGETS``), which cancels the machine's drift.
Around every measured run of a Redis-backed target it diffs its Redis' ``INFO
commandstats``/``INFO stats`` and sums the store commands and network reads
(round trips) over the rounds; around every measured run of the PostgreSQL
fallback target it diffs ``pg_stat_user_functions`` (``edgeway.batch``) and
``pg_stat_database`` (``xact_commit``), read once the backends have flushed
their statistics. Prints a table and overwrites the "## Latest run" section of
``bench/RESULTS.md``. Server logs go to ``bench/out/<name>.log``, wrk's output
to ``bench/out/wrk-<target>-r<round>.txt``. Every process runs in its own
process group and is killed in ``finally``; the PostgreSQL cluster is stopped
and its directory removed there too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics_cost import timed as metrics_cost_timed
from pg import STATS_FLUSH, PgSnapshot, PostgresCluster, postgres_bin, postgres_version
from plain_app import JSON_BODY, JSON_PATH

ROOT = Path(__file__).resolve().parent.parent
BENCH, OUT, RESULTS = ROOT / "bench", ROOT / "bench" / "out", ROOT / "bench" / "RESULTS.md"
VENV_BIN = ROOT / ".venv" / "bin"
if not (VENV_BIN / "python").exists():
    VENV_BIN = Path(sys.executable).parent
PG_TARGET = "edgeway-2-limits-postgres-fallback"  # Redis unreachable: limits enforced through PostgreSQL
CACHE_TARGET = "edgeway-cache-hit"  # the gateway answering a 1 KB JSON body from its cache (Redis)
BREAKER_TARGET = "breaker-closed"  # edgeway-2-limits with a (never tripping) breaker on the upstream
QUIET_TARGET = "edgeway-access-log-off"  # edgeway with `serve --access-log off`: the access log's cost (no goal)
# The order of every round: each goal's target runs next to (or one run from) its reference, so the paired
# ratio of a round compares runs seconds apart (see paired_ratios).
TARGETS = ("upstream", "nginx-proxy", "raw-aiohttp", "edgeway", "baseline", QUIET_TARGET, "edgeway-2-limits",
           BREAKER_TARGET, "session-warm", "edgeway-2-limits-memory", PG_TARGET, "slowapi", "starlette-json",
           CACHE_TARGET)
ASGI_APPS = {"raw-aiohttp": "baseline_proxy:raw_app", "baseline": "baseline_proxy:starlette_app",
             "slowapi": "slowapi_proxy:app", "starlette-json": "plain_app:app"}  # served from bench/ with uvicorn
JSON_TARGETS = (CACHE_TARGET, "starlette-json")  # GET JSON_PATH (1 KB JSON) instead of PATH
REDIS_TARGETS = ("edgeway-2-limits", BREAKER_TARGET, "slowapi", CACHE_TARGET, "session-warm")
# session-warm: edgeway-2-limits behind `session: required` with one token, verified locally (HS256 secret) and
# then served from the instance's session cache: what sessions add on the warm path (revocation read included)
SESSION_SECRET = "bench-session-secret-of-at-least-32-bytes"


def _session_token() -> str:
    import base64
    import hashlib
    import hmac

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    head = part({"alg": "HS256", "typ": "JWT"})
    body = part({"sub": "bench-user", "aud": "authenticated", "role": "authenticated", "iat": now,
                 "exp": now + 86400, "session_id": "bench-session"})
    mac = hmac.new(SESSION_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


HEADERS = {"session-warm": {"Authorization": f"Bearer {_session_token()}"}}  # sent by wrk and the readiness check
TWO_LIMITS = [{"rate": "1000000/minute", "key": "ip"}, {"rate": "100000000/day", "key": "ip"}]
PATH, BODY = "/1k.txt", b"x" * 1023 + b"\n"
WRK = ["wrk", "-t2", "-c32", "--latency"]
SETTLE = 0.5  # seconds after each wrk run for the requests still in flight to finish
# The uvicorn settings of `edgeway serve` (gateway/cli.py `_serve`), spelled out.
UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--workers", "1", "--loop", "uvloop", "--http",
           "httptools", "--lifespan", "on", "--no-proxy-headers", "--no-access-log", "--no-server-header",
           "--no-date-header"]
GOALS = (("edgeway", "raw-aiohttp", 0.85), ("edgeway", "baseline", 0.90), ("edgeway-2-limits", "baseline", 0.75),
         ("edgeway-2-limits", "slowapi", 2.0), (CACHE_TARGET, "edgeway", 2.0),
         (CACHE_TARGET, "starlette-json", 1.0),
         (BREAKER_TARGET, "edgeway-2-limits", 0.95),
         ("session-warm", "edgeway-2-limits", 0.90))  # req/s ratios (of medians): target, reference, minimum
CACHE_CACHE = {"ttl": "1h"}  # CACHE_TARGET's route: `cache:` with the default key (method, path, query)
PG_REFERENCES = ("baseline", "edgeway-2-limits")  # PG_TARGET's ratio lines (recorded, no goal)
PG_TIMEOUT, PG_MODE = "200ms", "postgres"  # its store timeout; the mode readyz must report
# What PG_TARGET logs by design when it fails over (middleware/store/failover.py); anything else is flagged.
EXPECTED_LOG = {PG_TARGET: re.compile(r"store mode redis -> postgres$|store redis://\S+ marked down after \d+ "
                                      r"failures \(cannot connect to Redis")}
# bench/policy_cost.py times these targets' gateways in-process (first: the reference), on its Redis
POLICY_COST_TARGETS = ("edgeway-2-limits", BREAKER_TARGET, "session-warm")
STORE_GOAL_TARGET = "edgeway-2-limits"  # goals: <= 1 Redis round trip and exactly 1 script call per request
STORE_GOAL_TARGETS = (STORE_GOAL_TARGET, BREAKER_TARGET)  # a closed breaker adds no command per request
MAX_ROUND_TRIPS, SCRIPT_CALLS, SCRIPT_CALLS_TOLERANCE = 1.0, 1.0, 0.01
OWN_COMMANDS = ("info", "config", "ping", "client", "hello", "command")  # the harness', not the store's
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
LOG_PROBLEM = re.compile(r"\b(ERROR|CRITICAL|WARNING|Traceback)\b|\[(error|crit|alert|emerg)\]")
INTRO = """# Edgeway benchmarks

`bench/run` (`.venv/bin/python bench/run.py [--rounds R] [--duration S] [--targets a,b]`) starts every
server on free ports, then measures in rounds: in each of R rounds (default 5) it runs
`wrk -t2 -c32 -d<S>s --latency` (default 5 s; GET of a 1 KB static file) against every target in turn,
in the order below in odd rounds and in reverse in even ones (neither target of a pair always runs first).
Each round measures a new process of each target (but the upstream and the PostgreSQL fallback target),
started and warmed up for 2 s just before: two processes of one server differed here by up to 10% in CPU
per request for their whole life. The measured servers run on a CPU of their own; wrk, the upstream and Redis
on the other, PostgreSQL on both (`--no-pin`, `--same-process` turn these off). Interleaving spreads the machine's
noise (single runs vary by +-15% here, and its speed drifts by tens of percent over minutes) over all
targets; each target's figure is its median req/s over the rounds, with the p50/p99 of that median round
and the min-max spread. A goal compares a target with its reference **per round**: the order puts each
pair seconds apart, and the goal's figure is the median of the rounds' paired ratios, which cancels the
drift between rounds; the ratio of the medians and of the CPU per request are shown beside it.

Targets. **upstream**: nginx (1 worker, no access log) serving the file, the origin of every proxy.
**nginx-proxy**: nginx proxying to it over a keepalive pool, the native ceiling. The two references
from the issue, both in `bench/baseline_proxy.py`, both on one shared aiohttp session, no policies,
under uvicorn with Edgeway's server settings: **raw-aiohttp** ("raw aiohttp forwarding"), a pure-ASGI
forwarder with no framework, the reference for the gateway's proxy hot path; **baseline** ("a bare
Starlette proxy on raw aiohttp with no policies"), a Starlette app with one catch-all route whose
endpoint returns a `StreamingResponse` over the aiohttp response. **edgeway**: `edgeway serve`, one
route `/*`, no policies, default settings (access log and metrics on). **edgeway-access-log-off**: the
same with `--access-log off`. **edgeway-2-limits**: the same with two limits (`1000000/minute`,
`100000000/day`, key `ip`: never rejecting) on a private `redis-server`; **edgeway-2-limits-memory**:
on `memory://`. **breaker-closed**: edgeway-2-limits with a circuit breaker on the upstream
(`failures: 5`), closed throughout (the upstream never fails).
**edgeway-2-limits-postgres-fallback**: fallback mode: Redis unreachable, limits
enforced through PostgreSQL. The same route and two limits; the store is `redis://` on a free port
nothing listens on, `timeout: 200ms`, `fallback: [{postgres: {dsn: ...}}, memory]` on a private
PostgreSQL cluster (initdb in a temp dir, free port, fsync off, `track_functions=all`, the edgeway
migration applied). After the first 3 failed calls the failover marks Redis down (its probe keeps
failing fast) and the limits go to `edgeway.batch`. Before measuring, the harness checks that
`GET /_edgeway/readyz` reports `store.mode` `postgres`, and after each run that the mode never changed
again. Recorded, with no goal: its ratios to baseline and edgeway-2-limits, and its PostgreSQL work
per request (`edgeway.batch` calls and mean self time per call from `pg_stat_user_functions`,
`xact_commit` from `pg_stat_database`). **slowapi**: the baseline's Starlette app and endpoint guarded
by slowapi (`bench/slowapi_proxy.py`), the same two limits on its own private `redis-server` (same
settings). **edgeway-cache-hit**: `edgeway serve`, one route `/*` with `cache: {ttl: 1h}` on a private
`redis-server`, GET of a 1 KB JSON file (`/1k.json`) the upstream served once (filled before measuring):
every measured request is a cache hit. **starlette-json**: a plain Starlette app returning that same
body itself (`bench/plain_app.py`), the reference for a hit.

Goals from the issue: the gateway's proxy hot path (edgeway, no policies) >= 85% of raw-aiohttp
req/s; the gateway with no policies >= 90% of baseline; with two limits >= 75% of baseline and >= 2x
slowapi, with at most 1 Redis round trip and exactly 1 Redis command (one script call) per request;
breaker-closed >= 95% of edgeway-2-limits with the same Redis work per request (a closed breaker re-reads
its state at most once a second per instance: no command per request); the cache-hit path >= 2x
edgeway (the proxied path) and >= 1.0x starlette-json, with at most 1 Redis round trip per hit.
wrk shares the machine's 2 cores with the servers: compare ratios within one run, not absolute
numbers across machines.
"""


@dataclass
class WrkResult:
    """What one wrk run measured (latencies in seconds)."""

    requests: int
    rps: float
    p50: float
    p99: float
    non2xx: int
    socket_errors: int
    cpu_us: float | None = None  # the target's server processes' CPU (user + system) per request in this run
    round_no: int = 0


Snapshot = tuple[dict[str, int], int]


@dataclass
class StoreWork:
    """Redis work summed over a target's measured runs: calls per command, network reads, requests."""

    calls: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    requests: int = 0

    def add(self, before: Snapshot, after: Snapshot, requests: int) -> None:
        """Add the work between two snapshots taken around a run of ``requests`` requests."""
        self.calls.update({k: v - before[0].get(k, 0) for k, v in after[0].items() if v > before[0].get(k, 0)})
        self.reads += after[1] - before[1] - 2  # minus the reads of the second snapshot's two INFO commands
        self.requests += requests

    def per_request(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0

    @property
    def script_calls(self) -> float:
        """Script calls (EVALSHA & co.) per request: the commands the client itself sends for a limit check."""
        return self.per_request(sum(v for k, v in self.calls.items() if k in SCRIPT_COMMANDS))

    @property
    def round_trips(self) -> float:
        """Network reads per request: each is one round trip (a pipelined batch counts once)."""
        return self.per_request(self.reads)

    def summary(self) -> str:
        detail = ", ".join(f"{k} {self.per_request(v):.2f}" for k, v in self.calls.most_common())
        return (f"{self.per_request(self.calls.total()):.2f} Redis commands/request counting those run inside "
                f"Lua ({detail or 'none'}); {self.script_calls:.2f} script calls/request; "
                f"{self.round_trips:.3f} network reads/request, i.e. round trips "
                f"({self.reads} reads for {self.requests} requests)")


@dataclass
class PgWork:
    """PostgreSQL work summed over PG_TARGET's measured runs: edgeway.batch calls and self time, commits.

    A run's closing snapshot waits until the backends flushed their statistics (``STATS_FLUSH`` s after
    the run), so it also holds the requests still in flight when wrk stopped and the gateway's heartbeat
    (one call every 5 s); the opening snapshot's own transactions (``own_commits``) are taken out.
    """

    own_commits: int = 0
    calls: int = 0
    self_ms: float = 0.0
    commits: int = 0
    requests: int = 0
    pending: tuple[PgSnapshot, int, float] | None = None  # a run's opening snapshot, requests, end (monotonic)

    def add(self, before: PgSnapshot, after: PgSnapshot, requests: int) -> None:
        self.calls += after.calls - before.calls
        self.self_ms += after.self_ms - before.self_ms
        self.commits += after.commits - before.commits - self.own_commits
        self.requests += requests

    def per_request(self, count: float) -> float:
        return count / self.requests if self.requests else 0.0

    def summary(self) -> str:
        per_call = self.self_ms * 1000 / self.calls if self.calls else 0.0
        return (f"{self.per_request(self.calls):.3f} edgeway.batch calls/request, {per_call:.0f} us mean self "
                f"time per call (self_time/calls: {self.self_ms:,.0f} ms for {self.calls} calls); "
                f"{self.per_request(self.commits):.3f} transactions (xact_commit)/request ({self.commits} "
                f"commits for {self.requests} requests)")


@dataclass
class Outcome:
    """One target: its URL, its measured runs (one per round), its Redis work, and what went wrong."""

    target: str
    url: str = ""
    runs: list[WrkResult] = field(default_factory=list)
    store: StoreWork | None = None
    pg: PgWork | None = None
    problems: list[str] = field(default_factory=list)
    failed: bool = False  # not (or no longer) measurable: skipped in the remaining rounds
    redis_port: int | None = None  # its private Redis, if it has one
    policy_costs: dict[str, float] = field(default_factory=dict)  # POLICY_COST_TARGETS' in-process CPU/request
    start: Callable[[], str] | None = None  # starts its server (again): returns the URL to measure

    @property
    def rps(self) -> float:
        """Median req/s over the rounds."""
        return statistics.median(run.rps for run in self.runs)

    @property
    def median_run(self) -> WrkResult:
        """The run with the median req/s (the lower middle one for an even number of rounds)."""
        return sorted(self.runs, key=lambda run: run.rps)[(len(self.runs) - 1) // 2]


def paired_ratios(target: Outcome, reference: Outcome) -> list[float]:
    """Per round, the target's req/s over the reference's in the same round (rounds where both ran).

    Targets run in a fixed order within a round, each goal's pair seconds apart, while this
    machine's speed drifts by tens of percent over minutes: a ratio within a round cancels
    that drift, a ratio of medians taken over different minutes does not.
    """
    reference_rps = {run.round_no: run.rps for run in reference.runs}
    return [run.rps / reference_rps[run.round_no] for run in target.runs if reference_rps.get(run.round_no)]


TARGET_CPUS: set[int] | None = None  # the CPU every measured server runs on (pin_cpus), None: any


def pin_cpus() -> None:
    """Give the measured servers a CPU of their own: targets run on the last CPU this harness may use, and
    the harness with everything it starts besides them (wrk, the upstream nginx, Redis,
    bench/policy_cost.py) on the others. wrk then never takes CPU from the server it measures, nor Redis from
    the gateway calling it, so each target's req/s follows its own cost per request. PostgreSQL, started
    before, keeps every CPU: on wrk's alone it answered the fallback target's batches past its 200 ms store
    timeout, which sent that target to memory. No-op on one CPU."""
    global TARGET_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    TARGET_CPUS = {cpus[-1]}
    os.sched_setaffinity(0, set(cpus[:-1]))


class Processes:
    """Child processes, each in its own process group, with output to bench/out/<name>.log."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cpus: set[int] | None = None) -> None:
        """Start ``argv``; ``cpus``: the CPUs it may run on (else the harness' own, see pin_cpus)."""
        pin = None if not cpus else lambda: os.sched_setaffinity(0, cpus)
        with open(OUT / f"{name}.log", "ab") as log:  # the child keeps its own descriptor; a restart appends
            self.running[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=pin)

    def stop(self, name: str) -> None:
        """SIGTERM the process group, SIGKILL it after 5 s, then SIGKILL any straggler of the group."""
        proc = self.running.pop(name, None)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop everything, the last started first (targets before their upstream and Redis)."""
        for name in reversed(list(self.running)):
            self.stop(name)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of one process group (a target and its
    workers; every target runs in a group of its own), from /proc."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp; then utime and stime at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def log_tail(name: str, lines: int = 30) -> str:
    path = OUT / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_tools(need_redis: bool, need_postgres: bool) -> None:
    """Install wrk, nginx (redis-server, postgresql) with apt-get when missing (a fresh machine)."""
    os.environ["PATH"] += os.pathsep + "/usr/sbin:/usr/local/sbin"  # nginx lives in sbin
    missing = [tool for tool in ("wrk", "nginx", *(["redis-server"] if need_redis else []))
               if shutil.which(tool) is None]
    if need_postgres and (postgres_bin("initdb") is None or postgres_bin("pg_ctl") is None):
        missing.append("postgresql")
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"installing {', '.join(missing)} with apt-get", flush=True)
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def wait_ready(procs: Processes, name: str, url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` (with the target's HEADERS) until it answers 200 with the 1 KB body; fail early if the process
    died."""
    expected = JSON_BODY if url.endswith(JSON_PATH) else BODY
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        proc = procs.running.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{log_tail(name)}")
        try:
            request = urllib.request.Request(url, headers=HEADERS.get(name, {}))
            with urllib.request.urlopen(request, timeout=5) as response:
                status, body = response.status, response.read()
            if status == 200 and body == expected:
                return
            last = f"status {status}, {len(body)} bytes"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {timeout:.0f}s ({last}):\n{log_tail(name)}")


def start_nginx(procs: Processes, name: str, tmp: Path, port: int, upstream_port: int | None,
                cpus: set[int] | None = None) -> None:
    """nginx in the foreground with its own prefix dir: a static origin, or a keepalive reverse proxy.

    Idle keepalive connections are kept for an hour, so the proxies' pools stay valid between rounds.
    """
    prefix = tmp / name
    (prefix / "www").mkdir(parents=True, exist_ok=True)  # (again when the target is restarted)
    (prefix / "www" / PATH.lstrip("/")).write_bytes(BODY)
    (prefix / "www" / JSON_PATH.lstrip("/")).write_bytes(JSON_BODY)
    files = [prefix / "www" / PATH.lstrip("/"), prefix / "www" / JSON_PATH.lstrip("/")]
    for path in (tmp, prefix, prefix / "www", *files):
        path.chmod(0o755)  # readable by nginx's worker user when started as root
    temps = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                       "uwsgi", "scgi"))
    if upstream_port is None:
        upstream, location = "", "root www; default_type text/plain; types { application/json json; }"
    else:
        upstream = f"upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        location = ("location / { proxy_pass http://origin; proxy_http_version 1.1; "
                    'proxy_set_header Connection ""; }')
    (prefix / "nginx.conf").write_text(f"""daemon off; worker_processes 1; pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 1h; {temps}
  {upstream}
  server {{ listen 127.0.0.1:{port}; {location} }}
}}
""")
    procs.start(name, ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")], cpus=cpus)


def start_redis(procs: Processes, tmp: Path, target: str) -> int:
    """A private redis-server (no persistence) for ``target`` on a free port; never the machine's shared one."""
    import redis

    port, name = free_port(), f"redis-{target}"
    procs.start(name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", str(tmp)])
    for _ in range(100):
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=port).ping()
            return port
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start:\n{log_tail(name)}")


def write_policy(tmp: Path, name: str, upstream_port: int, store: dict[str, Any], limits: bool,
                 cache: dict[str, Any] | None = None, breaker: bool = False, session: bool = False) -> Path:
    """An Edgeway policy: one route /* to the upstream, optionally with the two limits, a cache, a breaker or a
    session (JSON is YAML)."""
    route: dict[str, Any] = {"match": {"path": "/*"}, "upstream": "origin"}
    if limits:
        route["limits"] = TWO_LIMITS
    if cache is not None:
        route["cache"] = cache
    origin: dict[str, Any] = {"url": f"http://127.0.0.1:{upstream_port}"}
    if breaker:
        origin["breaker"] = {"failures": 5, "open_for": "30s"}
    policy: dict[str, Any] = {"version": 1, "store": store, "upstreams": {"origin": origin}, "routes": [route]}
    if session:
        route["session"] = "required"
        policy["sessions"] = {"provider": "jwt", "jwt_secret": SESSION_SECRET, "audience": "authenticated"}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(policy, indent=2))
    return path


def start_target(procs: Processes, target: str, tmp: Path, upstream_port: int, redis_port: int | None,
                 pg_dsn: str | None = None) -> str:
    """Start one target (the upstream is already running) and return the URL to benchmark."""
    if target == "upstream":
        return f"http://127.0.0.1:{upstream_port}{PATH}"
    port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}"
    if target == "nginx-proxy":
        start_nginx(procs, target, tmp, port, upstream_port, cpus=TARGET_CPUS)
    elif target in ASGI_APPS:
        env = {"UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}", "REDIS_URL": redis_url}
        procs.start(target, [str(VENV_BIN / "python"), *UVICORN, "--port", str(port), "--app-dir", str(BENCH),
                             ASGI_APPS[target]], env, cpus=TARGET_CPUS)
    else:
        store: dict[str, Any] = {"url": redis_url if target in REDIS_TARGETS else "memory://"}
        if target == PG_TARGET:
            if pg_dsn is None:
                raise RuntimeError("no PostgreSQL cluster for it")
            store = {"url": f"redis://127.0.0.1:{free_port()}", "timeout": PG_TIMEOUT,  # nothing listens there
                     "fallback": [{"postgres": {"dsn": pg_dsn}}, "memory"]}
        policy = write_policy(tmp, target, upstream_port, store,
                              limits=target not in ("edgeway", QUIET_TARGET, CACHE_TARGET),
                              cache=CACHE_CACHE if target == CACHE_TARGET else None, breaker=target == BREAKER_TARGET,
                              session=target == "session-warm")
        quiet = ["--access-log", "off"] if target == QUIET_TARGET else []
        procs.start(target, [str(VENV_BIN / "edgeway"), "serve", "--policy", str(policy), "--port", str(port),
                             *quiet], cpus=TARGET_CPUS)
    return f"http://127.0.0.1:{port}{JSON_PATH if target in JSON_TARGETS else PATH}"


def metrics_cost(requests: int, mode: str | None) -> float:
    """Microseconds of ``RouteMeter.record`` per request, in one worker (None) or multiprocess mode."""
    if mode is None:
        return metrics_cost_timed(requests, None)
    with tempfile.TemporaryDirectory(prefix="edgeway-metrics-") as directory:
        return metrics_cost_timed(requests, directory)


def policy_costs(outcomes: list[Outcome], tmp: Path) -> None:
    """Time POLICY_COST_TARGETS' gateways in-process (bench/policy_cost.py) on the reference target's Redis;
    the figures go to the reference's outcome. Skipped unless all of them ran."""
    measured = {o.target: o for o in outcomes if o.runs and not o.failed}
    if not all(target in measured for target in POLICY_COST_TARGETS):
        return
    reference = measured[POLICY_COST_TARGETS[0]]
    argv = [str(VENV_BIN / "python"), str(BENCH / "policy_cost.py"), "--redis",
            f"redis://127.0.0.1:{reference.redis_port}", "--authorization",
            HEADERS["session-warm"]["Authorization"], *(str(tmp / f"{t}.yaml") for t in POLICY_COST_TARGETS)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True, cwd=ROOT)
        reference.policy_costs = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        reference.problems.append(f"bench/policy_cost.py failed: {exc}")


def start_postgres(outcome: Outcome) -> PostgresCluster | None:
    """PG_TARGET's private cluster, started, migrated and its snapshot cost measured; None (target failed) if not.

    Removed here when anything fails (also on SIGTERM/Ctrl-C); once returned, main's ``finally`` removes it.
    """
    cluster = PostgresCluster()
    try:
        cluster.start()
        cluster.apply_migration()
        first = cluster.snapshot()
        second = cluster.snapshot()  # sees the first's own transactions (flushed when it disconnected)
        outcome.pg = PgWork(own_commits=second.commits - first.commits)
    except Exception as exc:
        cluster.close()
        outcome.failed = True
        outcome.problems.append(f"failed to start its PostgreSQL: {exc}")
        return None
    except BaseException:
        cluster.close()
        raise
    return cluster


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def fallback_problem(outcome: Outcome) -> str | None:
    """Why PG_TARGET is not (or was not throughout) in fallback mode on PostgreSQL; None when it is.

    readyz must report ``store.mode == "postgres"``, and the only store mode change since the start
    must be the one failover redis -> postgres (a later detour to memory and back would not show in
    readyz, but does in ``edgeway_store_mode_changes_total``).
    """
    base = outcome.url.removesuffix(PATH)
    try:
        ready = json.loads(fetch(f"{base}/_edgeway/readyz"))
        metrics = fetch(f"{base}/_edgeway/metrics")
    except (OSError, ValueError) as exc:
        return f"cannot read /_edgeway/readyz or /_edgeway/metrics: {exc}"
    store = ready.get("store", {}) if isinstance(ready, dict) else {}
    if store.get("mode") != PG_MODE:
        return (f"not in fallback mode: /_edgeway/readyz reports store.mode {store.get('mode')!r}, not "
                f"{PG_MODE!r}: {json.dumps(ready)[:400]}")
    changes = {f"{m[1]} -> {m[2]}": float(m[3]) for m in re.finditer(
        r'^edgeway_store_mode_changes_total\{from_mode="([^"]*)",to_mode="([^"]*)"\} (\S+)$', metrics, re.M)}
    if changes != {f"redis -> {PG_MODE}": 1.0}:
        return f"store mode changes other than one redis -> {PG_MODE}: {changes or 'none'}"
    return None


def settle_pg(outcome: Outcome, cluster: PostgresCluster) -> None:
    """Close PG_TARGET's pending run: wait until PostgreSQL flushed its statistics, snapshot, add, check mode."""
    work = outcome.pg
    if work is None or work.pending is None:
        return
    before, requests, ended = work.pending
    work.pending = None
    time.sleep(max(0.0, ended + STATS_FLUSH - time.monotonic()))
    work.add(before, cluster.snapshot(), requests)
    problem = fallback_problem(outcome)
    if problem:
        outcome.problems.append(f"after a measured run: {problem}")


def parse_wrk(text: str) -> WrkResult:
    """Requests, req/s, p50/p99 (us/ms/s/m/h units), non-2xx/3xx responses and socket errors."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

    def latency(percent: str) -> float:
        found = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
        if found is None:
            raise ValueError(f"no {percent}% latency in wrk output:\n{text}")
        return float(found[1]) * units[found[2]]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    requests = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if rps is None or requests is None:
        raise ValueError(f"unexpected wrk output:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(int(requests[1]), float(rps[1]), latency("50"), latency("99"),
                     int(non2xx[1]) if non2xx else 0, sum(map(int, sockets.groups())) if sockets else 0)


def run_wrk(url: str, seconds: int, headers: dict[str, str] | None = None) -> str:
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    done = subprocess.run([*WRK, *extra, f"-d{seconds}s", url], capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def redis_snapshot(client: Any) -> Snapshot:
    """Calls per command (the harness' own left out) and network read events so far."""
    stats = client.info("commandstats")
    calls = {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()}
    reads = int(client.info("stats")["total_reads_processed"])
    return {k: v for k, v in calls.items() if not k.startswith(OWN_COMMANDS)}, reads


KEPT_PROCESSES = ("upstream", PG_TARGET)  # the origin of every proxy; the fallback target's mode is set up once


def fresh_process(procs: Processes, outcome: Outcome, args: argparse.Namespace) -> None:
    """Replace a target's server by a new process (same policy, same store), ready and warmed up.

    Two processes of the same server differ here by up to 10% in CPU per request (memory layout, hash
    seeds), for the whole of their life: a new process per round turns that into noise the median over the
    rounds averages out, instead of a bias of one whole run.
    """
    if outcome.target in KEPT_PROCESSES or outcome.start is None:
        return
    try:
        procs.stop(outcome.target)
        outcome.url = outcome.start()
        wait_ready(procs, outcome.target, outcome.url)
        if args.warmup > 0:
            run_wrk(outcome.url, args.warmup, HEADERS.get(outcome.target))
            time.sleep(SETTLE)
    except Exception as exc:
        outcome.failed = True
        outcome.problems.append(f"restart failed: {exc}")
        print(f"   {outcome.target:<34} FAILED to restart: {exc}", flush=True)


def measure(procs: Processes, outcome: Outcome, round_no: int, args: argparse.Namespace, client: Any,
            cluster: PostgresCluster | None) -> None:
    """One round of one target: (warm-up in round 1,) a measured wrk run, its Redis work if ``client``.

    With ``cluster`` (PG_TARGET), the previous run's PostgreSQL work is closed first (see settle_pg),
    the warm-up's statistics are left to flush, and this run's is left pending.
    """
    target = outcome.target
    try:
        proc = procs.running.get(target)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{target} exited with code {proc.returncode}:\n{log_tail(target)}")
        if cluster is not None:
            settle_pg(outcome, cluster)
        if round_no == 1 and args.warmup > 0:
            run_wrk(outcome.url, args.warmup, HEADERS.get(target))
            time.sleep(STATS_FLUSH if cluster is not None else SETTLE)
        before = redis_snapshot(client) if client else None
        pg_before = cluster.snapshot() if cluster is not None else None
        group = procs.running[target].pid if target in procs.running else None
        cpu_before = group_cpu(group) if group is not None else 0.0
        text = run_wrk(outcome.url, args.duration, HEADERS.get(target))
        cpu = group_cpu(group) - cpu_before if group is not None else None
        ended = time.monotonic()
        after = redis_snapshot(client) if client else None  # before the in-flight rest: wrk did not count it
        time.sleep(SETTLE)  # and neither the next target's run nor this target's next one sees it
        (OUT / f"wrk-{target}-r{round_no}.txt").write_text(text)
        result = parse_wrk(text)
        result.round_no = round_no
        if cpu is not None and result.requests:
            result.cpu_us = cpu / result.requests * 1e6
    except Exception as exc:  # one failing target must not stop the others
        outcome.failed = True
        outcome.problems.append(f"round {round_no} failed: {exc}")
        print(f"   {target:<34} FAILED: {exc}", flush=True)
        return
    outcome.runs.append(result)
    if outcome.store is not None and before and after:
        outcome.store.add(before, after, result.requests)
    if outcome.pg is not None and pg_before is not None:
        outcome.pg.pending = (pg_before, result.requests, ended)
    if result.non2xx or result.socket_errors:
        outcome.problems.append(f"round {round_no}: {result.non2xx} non-2xx/3xx responses, "
                                f"{result.socket_errors} socket errors")
    print(f"   {target:<34} {result.rps:>9,.0f} req/s, p50 {fmt_time(result.p50)}, p99 {fmt_time(result.p99)}",
          flush=True)


def check_logs(outcomes: list[Outcome]) -> None:
    """Flag targets whose server log has warnings, errors or tracebacks."""
    for outcome in outcomes:
        log = OUT / f"{outcome.target}.log"
        if outcome.target == "upstream" or not log.exists():
            continue
        expected = EXPECTED_LOG.get(outcome.target)
        bad = [line for line in log.read_text(errors="replace").splitlines() if LOG_PROBLEM.search(line)
               and not (expected and expected.search(line))]
        if bad:
            outcome.problems.append(f"{len(bad)} warning/error lines in bench/out/{outcome.target}.log, first: "
                                    f"`{bad[0].strip()[:200]}`")


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def version(argv: list[str], pattern: str) -> str:
    """The version ``argv`` prints, e.g. ``wrk 4.1.0``, or ``?``."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        found = re.search(pattern, done.stdout + done.stderr)
        if found:
            return f"{argv[0]} {found[1]}"
    return f"{argv[0]} ?"


def machine_facts() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    packages = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in
                         ("aiohttp", "uvicorn", "uvloop", "httptools", "starlette", "slowapi", "limits",
                          "asyncpg"))
    tools = ", ".join((version(["wrk", "-v"], r"wrk \S*?(\d[\w.]*)"), version(["nginx", "-v"], r"nginx/(\S+)"),
                       version(["redis-server", "--version"], r"v=(\S+)"), postgres_version()))
    return (f"nproc {os.cpu_count()} ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {tools}; {packages}")


def ratio_line(name: str, value: float | None, goal: str, met: bool, note: str = "") -> str:
    if value is None:
        return f"- {name}: not measured (goal {goal})"
    return f"- {name}: {value:.2f} (goal {goal}): {'met' if met else 'MISSED'}{note}"


def render(outcomes: list[Outcome], args: argparse.Namespace, command: str) -> str:
    """The "## Latest run" section: facts, table, goals, Redis figures, problems."""
    measured = {o.target: o for o in outcomes if o.runs}
    rps = {target: o.rps for target, o in measured.items()}
    flagged = {o.target for o in outcomes if o.problems}
    refs = [ref for ref in ("raw-aiohttp", "baseline") if ref in rps]
    lines = ["## Latest run", "", f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
             f"- Machine: {machine_facts()}",
             f"- Command: `{command}` ({args.rounds} rounds, every target once per round, in the order below in "
             "odd rounds and in reverse in even ones; "
             f"{args.warmup:g} s warm-up per target before its run, in round 1 only"
             f"{'' if args.same_process else ', and in every other round on a new process of it'}; "
             f"{'' if args.no_pin else 'the measured servers on a CPU of their own; '}each run `{' '.join(WRK)} "
             f"-d{args.duration:g}s`, GET {PATH}, a {len(BODY)}-byte static file)",
             "- req/s: median over the rounds; p50/p99: of the median round; spread: min-max req/s over the "
             "rounds; CPU: the target's own processes' CPU time (user + system, /proc) per request, median over "
             "the rounds (steadier than req/s on a shared machine; wrk and the upstream are not in it)", "",
             f"| target | req/s | spread | p50 | p99 | CPU/req | {''.join(f'vs {ref} | ' for ref in refs)}errors |",
             f"|---|---:|---|---:|---:|---:|{'---:|' * len(refs)}---|"]
    for o in outcomes:
        if o.runs:
            low, high = min(run.rps for run in o.runs), max(run.rps for run in o.runs)
            cpus = [run.cpu_us for run in o.runs if run.cpu_us is not None]
            cells = [f"{o.rps:,.0f}", f"{low:,.0f}-{high:,.0f}", fmt_time(o.median_run.p50),
                     fmt_time(o.median_run.p99), f"{statistics.median(cpus):.0f} us" if cpus else "-",
                     *(f"{o.rps / rps[ref]:.2f}" for ref in refs)]
        else:
            cells = ["-"] * (5 + len(refs))
        lines.append(f"| {o.target} | {' | '.join(cells)} | {'**FLAGGED**' if o.problems else 'none'} |")
    lines += ["", "Goals (the median of the per-round paired ratios; in brackets each round's ratio, then the ratio "
              "of the medians above and of the CPU per request, reference over target):", ""]
    for target, against, goal in GOALS:
        pairs = paired_ratios(measured[target], measured[against]) if target in rps and against in rps else []
        ratio = statistics.median(pairs) if pairs else None
        note = " (flagged: see Problems)" if {target, against} & flagged else ""
        if pairs:
            cpu = [statistics.median(c) for c in ([r.cpu_us for r in measured[o].runs if r.cpu_us is not None]
                                                  for o in (against, target)) if c]
            note = (f" [{', '.join(f'{r:.2f}' for r in pairs)}; of medians {rps[target] / rps[against]:.2f}"
                    + (f"; CPU {cpu[0] / cpu[1]:.2f}" if len(cpu) == 2 else "") + "]" + note)
        lines.append(ratio_line(f"{target} / {against}", ratio, f">= {goal:g}", ratio is not None and ratio >= goal,
                                note))
    for goal_target in STORE_GOAL_TARGETS:
        store = measured[goal_target].store if goal_target in measured else None
        trips, scripts = (store.round_trips, store.script_calls) if store and store.requests else (None, None)
        lines += [
            ratio_line(f"{goal_target} Redis round trips/request", trips, f"<= {MAX_ROUND_TRIPS:g}",
                       trips is not None and trips <= MAX_ROUND_TRIPS),
            ratio_line(f"{goal_target} Redis commands (script calls)/request", scripts,
                       f"= {SCRIPT_CALLS:g} +- {SCRIPT_CALLS_TOLERANCE:g}",
                       scripts is not None and abs(scripts - SCRIPT_CALLS) <= SCRIPT_CALLS_TOLERANCE)]
    cache_store = measured[CACHE_TARGET].store if CACHE_TARGET in measured else None
    cache_trips = cache_store.round_trips if cache_store and cache_store.requests else None
    lines.append(ratio_line(f"{CACHE_TARGET} Redis round trips/hit", cache_trips, f"<= {MAX_ROUND_TRIPS:g}",
                            cache_trips is not None and cache_trips <= MAX_ROUND_TRIPS))
    costs = measured[POLICY_COST_TARGETS[0]].policy_costs if POLICY_COST_TARGETS[0] in measured else {}
    if costs:
        base = costs[POLICY_COST_TARGETS[0]]
        cpus = [run.cpu_us for run in measured[POLICY_COST_TARGETS[0]].runs if run.cpu_us is not None]
        wrk_cpu = statistics.median(cpus) if cpus else None
        lines += ["", "What the policies themselves cost (`bench/policy_cost.py`, in this run: CPU per request of "
                  "`Gateway.__call__` in one process, the upstream replaced by an app that answers at once, on "
                  f"{POLICY_COST_TARGETS[0]}'s Redis; 16 tasks, median of 7 rounds). Beside each extra cost, the "
                  f"ratio it implies: {POLICY_COST_TARGETS[0]}'s CPU per request in the wrk runs above over that "
                  "plus the extra:", "",
                  f"- {POLICY_COST_TARGETS[0]}: {base:.1f} us"]
        for target in POLICY_COST_TARGETS[1:]:
            extra = costs[target] - base
            implied = f"; implies {wrk_cpu / (wrk_cpu + extra):.2f}" if wrk_cpu and wrk_cpu + extra > 0 else ""
            lines.append(f"- {target}: {costs[target]:.1f} us ({extra:+.1f} us{implied})")
    if PG_TARGET in args.targets:
        lines += ["", f"Fallback mode ({PG_TARGET}: Redis unreachable, limits enforced through PostgreSQL; "
                  "recorded, no goal):", ""]
        for against in PG_REFERENCES:
            ratio = rps[PG_TARGET] / rps[against] if PG_TARGET in rps and against in rps else None
            note = " (flagged: see Problems)" if {PG_TARGET, against} & flagged else ""
            lines.append(f"- {PG_TARGET} / {against}: " + ("not measured" if ratio is None else f"{ratio:.2f}{note}"))
    if QUIET_TARGET in rps and "edgeway" in rps:
        single, multi = metrics_cost(50_000, None), metrics_cost(50_000, "multiprocess")
        lines += ["", "Access log and metrics (recorded, no goal): `edgeway` writes one JSON line per request to "
                  f"stdout (the default); {QUIET_TARGET} is the same with `--access-log off`. The request metrics "
                  "have no off switch: their per-request work (`RouteMeter.record`) is timed in-process, in this "
                  "run, by `bench/metrics_cost.py`.", "",
                  f"- edgeway / {QUIET_TARGET}: {rps['edgeway'] / rps[QUIET_TARGET]:.2f} "
                  f"({1e6 / rps['edgeway'] - 1e6 / rps[QUIET_TARGET]:+.1f} us of wall time per request at 32 "
                  "connections)",
                  f"- metrics per request: {single:.2f} us with one worker, {multi:.2f} us under `--workers N` "
                  "(multiprocess files)"]
    stores = [f"- {o.target}: {o.store.summary()}" for o in outcomes if o.store and o.store.requests]
    stores += [f"- PostgreSQL work per request, {o.target}: {o.pg.summary()} (statistics read {STATS_FLUSH:g} s "
               "after each run, once flushed: they include the requests still in flight when wrk stopped and the "
               "heartbeat, one call per 5 s)" for o in outcomes if o.pg and o.pg.requests]
    if stores:
        lines += ["", f"Redis work per request, summed over the {args.rounds} measured runs (Edgeway auto-pipelines:"
                  " it should need <= 1 round trip per request):", "", *stores]
    problems = [f"- {o.target}: {p}" for o in outcomes for p in o.problems]
    if problems:
        lines += ["", "Problems:", "", *problems]
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    """Write RESULTS.md's intro (how the harness measures: always this file's own) and its "## Latest run"
    section; the sections after it (analyses kept by hand) stay."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find("## Latest run")
    following = text.find("\n## ", start + 1) if start >= 0 else -1
    rest = text[following + 1:] if following >= 0 else ""
    RESULTS.write_text(INTRO.rstrip("\n") + "\n\n" + section + ("\n" + rest if rest else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark Edgeway against nginx, bare proxies and slowapi.")
    parser.add_argument("--rounds", type=int, default=5, help="measured runs per target, interleaved")
    parser.add_argument("--duration", type=int, default=5, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of the warm-up run per target "
                        "(round 1 only; 0: none)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of: {','.join(TARGETS)}")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--no-pin", action="store_true", help="let every process run on every CPU")
    parser.add_argument("--same-process", action="store_true", help="measure every round on the processes "
                        "of round 1 (default: each round on a new process of each target)")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        parser.error(f"unknown target(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(TARGETS)}")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:  # wrk takes whole seconds
        parser.error("--rounds and --duration must be at least 1, --warmup at least 0")
    return args


def start_all(procs: Processes, outcomes: list[Outcome], tmp: Path, cluster: PostgresCluster | None
              ) -> dict[str, Any]:
    """Start the upstream, one private Redis per Redis-backed target, and every target; check each once.

    Returns the Redis client of each Redis-backed target that started. A target that does not start
    is marked failed (with its log tail) and left out of the rounds, and so is PG_TARGET when it is not
    in fallback mode on ``cluster`` after a few requests.
    """
    import redis

    upstream_port = free_port()
    start_nginx(procs, "upstream", tmp, upstream_port, None)
    wait_ready(procs, "upstream", f"http://127.0.0.1:{upstream_port}{PATH}")
    clients: dict[str, Any] = {}
    for outcome in outcomes:
        if outcome.failed:  # PG_TARGET without its PostgreSQL
            continue
        try:
            redis_port = start_redis(procs, tmp, outcome.target) if outcome.target in REDIS_TARGETS else None
            outcome.start = functools.partial(start_target, procs, outcome.target, tmp, upstream_port, redis_port,
                                              cluster.dsn if cluster is not None else None)
            outcome.url = outcome.start()
            if redis_port is not None:
                clients[outcome.target], outcome.store = redis.Redis(port=redis_port), StoreWork()
                outcome.redis_port = redis_port
        except Exception as exc:
            outcome.failed = True
            outcome.problems.append(f"failed to start: {exc}")
    for outcome in outcomes:  # all started in parallel above: now wait for each
        if not outcome.failed:
            try:
                wait_ready(procs, outcome.target, outcome.url)
            except Exception as exc:
                outcome.failed = True
                outcome.problems.append(f"failed to start: {exc}")
        if outcome.target == PG_TARGET and not outcome.failed:
            try:
                for _ in range(5):  # the first 3 fail over from Redis and mark it down
                    fetch(outcome.url)
            except OSError as exc:
                problem: str | None = f"a request failed: {exc}"
            else:
                problem = fallback_problem(outcome)
            if problem:
                outcome.failed = True
                outcome.problems.append(f"not measured: {problem}")
            status = f"FLAGGED, not measured: {problem}" if problem else \
                f"ready at {outcome.url} (readyz: store.mode {PG_MODE})"
        else:
            status = "FAILED to start" if outcome.failed else f"ready at {outcome.url}"
        print(f"   {outcome.target:<34} {status}", flush=True)
    return clients


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    ensure_tools(need_redis=any(t in REDIS_TARGETS for t in args.targets), need_postgres=PG_TARGET in args.targets)
    OUT.mkdir(exist_ok=True)
    for stale in (*OUT.glob("wrk-*.txt"), *OUT.glob("*.log")):
        stale.unlink()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the finally below too
    procs, tmp = Processes(), Path(tempfile.mkdtemp(prefix="edgeway-bench-"))
    outcomes = [Outcome(target) for target in args.targets]
    cluster: PostgresCluster | None = None
    try:
        print("== starting", flush=True)
        pg_outcome = next((o for o in outcomes if o.target == PG_TARGET), None)
        if pg_outcome is not None:
            cluster = start_postgres(pg_outcome)  # before pinning: PostgreSQL keeps every CPU (see pin_cpus)
        if not args.no_pin:
            pin_cpus()
        clients = start_all(procs, outcomes, tmp, cluster)
        for round_no in range(1, args.rounds + 1):
            print(f"== round {round_no}/{args.rounds}", flush=True)
            # counterbalanced: a pair's second run is not always the same target's (a run can leave the
            # machine warmer or busier for the next one)
            for outcome in outcomes if round_no % 2 else reversed(outcomes):
                if not outcome.failed and round_no > 1 and not args.same_process:
                    fresh_process(procs, outcome, args)
                if not outcome.failed:
                    measure(procs, outcome, round_no, args, clients.get(outcome.target),
                            cluster if outcome.target == PG_TARGET else None)
        print("== in-process policy cost (bench/policy_cost.py)", flush=True)
        policy_costs(outcomes, tmp)
        if pg_outcome is not None and cluster is not None and pg_outcome.pg and pg_outcome.pg.pending:
            print(f"== waiting for PostgreSQL's statistics of the last {PG_TARGET} run", flush=True)
            try:
                settle_pg(pg_outcome, cluster)
            except Exception as exc:
                pg_outcome.problems.append(f"PostgreSQL work of the last run not read: {exc}")
    finally:
        procs.stop_all()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for outcome in outcomes:
        if outcome.store is not None and outcome.store.requests and not outcome.store.calls:
            outcome.problems.append("no Redis commands during the measured runs: the store was not used")
        if outcome.pg is not None and outcome.pg.requests and not outcome.pg.calls:
            outcome.problems.append("no edgeway.batch calls during the measured runs: PostgreSQL was not used")
    check_logs(outcomes)
    section = render(outcomes, args, command)
    print("\n" + section)
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
