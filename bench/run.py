"""Edgeway benchmark harness: one command, every server started and stopped by it.

    .venv/bin/python bench/run.py [--duration 10] [--warmup 2] [--targets edgeway,baseline] [--no-write]

Starts nginx serving a 1 KB static file (the upstream) and, when needed, a
private ``redis-server``, all on free ports. Then, one target at a time, it
starts the target, checks one response, runs ``wrk -t2 -c32 --latency`` for
the warm-up and then for the measured duration, and stops the target.
Around the measured run of every Redis-backed target it diffs Redis'
``INFO commandstats``/``INFO stats`` to report store commands and network
reads (round trips) per request. Prints a table and overwrites the
"## Latest run" section of ``bench/RESULTS.md``. Server logs go to
``bench/out/<target>.log``, wrk's output to ``bench/out/wrk-<target>.txt``.
Every process runs in its own process group and is killed in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH, OUT, RESULTS = ROOT / "bench", ROOT / "bench" / "out", ROOT / "bench" / "RESULTS.md"
VENV_BIN = ROOT / ".venv" / "bin"
if not (VENV_BIN / "python").exists():
    VENV_BIN = Path(sys.executable).parent
TARGETS = ("upstream", "nginx-proxy", "baseline", "edgeway", "edgeway-2-limits", "edgeway-2-limits-memory",
           "slowapi")
REDIS_TARGETS = ("edgeway-2-limits", "slowapi")
TWO_LIMITS = [{"rate": "1000000/minute", "key": "ip"}, {"rate": "100000000/day", "key": "ip"}]
PATH, BODY = "/1k.txt", b"x" * 1023 + b"\n"
WRK = ["wrk", "-t2", "-c32", "--latency"]
# The uvicorn settings of `edgeway serve` (gateway/cli.py `_serve`), spelled out.
UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--workers", "1", "--loop", "uvloop", "--http",
           "httptools", "--lifespan", "on", "--no-proxy-headers", "--no-access-log", "--no-server-header",
           "--no-date-header"]
GOALS = (("edgeway", "baseline", 0.90), ("edgeway-2-limits", "baseline", 0.75),
         ("edgeway-2-limits", "slowapi", 2.0))
OWN_COMMANDS = ("info", "config", "ping", "client", "hello", "command")  # the harness', not the store's
SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
LOG_PROBLEM = re.compile(r"\b(ERROR|CRITICAL|WARNING|Traceback)\b|\[(error|crit|alert|emerg)\]")
INTRO = """# Edgeway benchmarks

`bench/run` (`.venv/bin/python bench/run.py [--duration S] [--targets a,b]`) starts every server on free
ports, warms each target up for 2 s, measures it with `wrk -t2 -c32 -d<S>s --latency` (GET of a 1 KB
static file through it) and stops everything. **upstream**: nginx (1 worker, no access log) serving the
file, the origin of every proxy. **nginx-proxy**: nginx proxying to it over a keepalive pool, the native
ceiling. **baseline**: `bench/baseline_proxy.py`, a bare ASGI proxy on one aiohttp session, no policies,
under uvicorn with Edgeway's server settings. **edgeway**: `edgeway serve`, one route `/*`, no policies.
**edgeway-2-limits**: the same with two limits (`1000000/minute`, `100000000/day`, key `ip`: never
rejecting) on a private `redis-server`; **edgeway-2-limits-memory**: on `memory://`. **slowapi**: the
baseline forwarder guarded by slowapi (`bench/slowapi_proxy.py`), same two limits, same Redis.

Goals from the issue: the gateway with no policies >= 90% of baseline req/s; with two limits >= 75% of
baseline and >= 2x slowapi. wrk shares the machine's cores with the servers: compare ratios within one
run, not absolute numbers across machines.
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


@dataclass
class Outcome:
    """One target's result, or why it has none; ``problems`` flag it."""

    target: str
    result: WrkResult | None = None
    problems: list[str] = field(default_factory=list)
    store: str = ""


class Processes:
    """Child processes, each in its own process group, with output to bench/out/<name>.log."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(OUT / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.running[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, **(env or {})}, start_new_session=True)

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
        for name in list(self.running):
            self.stop(name)


def log_tail(name: str, lines: int = 30) -> str:
    path = OUT / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_tools(need_redis: bool) -> None:
    """Install wrk, nginx (and redis-server) with apt-get when missing (a fresh machine)."""
    os.environ["PATH"] += os.pathsep + "/usr/sbin:/usr/local/sbin"  # nginx lives in sbin
    missing = [tool for tool in ("wrk", "nginx", *(["redis-server"] if need_redis else []))
               if shutil.which(tool) is None]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"installing {', '.join(missing)} with apt-get", flush=True)
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def wait_ready(procs: Processes, name: str, url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 with the 1 KB body; fail early if the process died."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        proc = procs.running.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status, body = response.status, response.read()
            if status == 200 and body == BODY:
                return
            last = f"status {status}, {len(body)} bytes"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {timeout:.0f}s ({last}):\n{log_tail(name)}")


def start_nginx(procs: Processes, name: str, tmp: Path, port: int, upstream_port: int | None) -> None:
    """nginx in the foreground with its own prefix dir: a static origin, or a keepalive reverse proxy."""
    prefix = tmp / name
    (prefix / "www").mkdir(parents=True)
    (prefix / "www" / PATH.lstrip("/")).write_bytes(BODY)
    for path in (tmp, prefix, prefix / "www", prefix / "www" / PATH.lstrip("/")):
        path.chmod(0o755)  # readable by nginx's worker user when started as root
    temps = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                       "uwsgi", "scgi"))
    if upstream_port is None:
        upstream, location = "", "root www; default_type text/plain;"
    else:
        upstream = f"upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        location = ("location / { proxy_pass http://origin; proxy_http_version 1.1; "
                    'proxy_set_header Connection ""; }')
    (prefix / "nginx.conf").write_text(f"""daemon off; worker_processes 1; pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; {temps}
  {upstream}
  server {{ listen 127.0.0.1:{port}; {location} }}
}}
""")
    procs.start(name, ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")])


def start_redis(procs: Processes, tmp: Path) -> int:
    """A private redis-server (no persistence) on a free port; never the machine's shared one."""
    import redis

    port = free_port()
    procs.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp)])
    for _ in range(100):
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=port).ping()
            return port
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start:\n{log_tail('redis')}")


def write_policy(tmp: Path, name: str, upstream_port: int, store: str, limits: bool) -> Path:
    """An Edgeway policy: one route /* to the upstream, optionally with the two limits (JSON is YAML)."""
    route: dict[str, Any] = {"match": {"path": "/*"}, "upstream": "origin"}
    if limits:
        route["limits"] = TWO_LIMITS
    policy = {"version": 1, "store": {"url": store},
              "upstreams": {"origin": {"url": f"http://127.0.0.1:{upstream_port}"}}, "routes": [route]}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(policy, indent=2))
    return path


def start_target(procs: Processes, target: str, tmp: Path, upstream_port: int, redis_port: int | None) -> str:
    """Start one target (the upstream is already running) and return the URL to benchmark."""
    if target == "upstream":
        return f"http://127.0.0.1:{upstream_port}{PATH}"
    port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}"
    if target == "nginx-proxy":
        start_nginx(procs, target, tmp, port, upstream_port)
    elif target in ("baseline", "slowapi"):
        env = {"UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}", "REDIS_URL": redis_url}
        procs.start(target, [str(VENV_BIN / "python"), *UVICORN, "--port", str(port), "--app-dir", str(BENCH),
                             f"{target}_proxy:app"], env)
    else:
        store = redis_url if target == "edgeway-2-limits" else "memory://"
        policy = write_policy(tmp, target, upstream_port, store, limits=target != "edgeway")
        procs.start(target, [str(VENV_BIN / "edgeway"), "serve", "--policy", str(policy), "--port", str(port)])
    return f"http://127.0.0.1:{port}{PATH}"


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


def run_wrk(url: str, seconds: float) -> str:
    done = subprocess.run([*WRK, f"-d{seconds:g}s", url], capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


Snapshot = tuple[dict[str, int], int]


def redis_snapshot(client: Any) -> Snapshot:
    """Calls per command (the harness' own left out) and network read events so far."""
    stats = client.info("commandstats")
    calls = {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()}
    reads = int(client.info("stats")["total_reads_processed"])
    return {k: v for k, v in calls.items() if not k.startswith(OWN_COMMANDS)}, reads


def store_per_request(before: Snapshot, after: Snapshot, requests: int) -> tuple[str, bool]:
    """A per-request summary of the Redis work between two snapshots, and whether there was any."""
    delta = {k: v - before[0].get(k, 0) for k, v in after[0].items() if v > before[0].get(k, 0)}
    reads = after[1] - before[1] - 2  # minus the reads of the second snapshot's two INFO commands
    scripts = sum(v for k, v in delta.items() if k in SCRIPT_CALLS)
    detail = ", ".join(f"{k} {v / requests:.2f}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1]))
    return (f"{sum(delta.values()) / requests:.2f} Redis commands/request counting those run inside Lua "
            f"({detail or 'none'}); {scripts / requests:.2f} script calls/request; "
            f"{reads / requests:.3f} network reads/request, i.e. round trips "
            f"({reads} reads for {requests} requests)"), bool(delta)


def bench(procs: Processes, target: str, args: argparse.Namespace, tmp: Path, upstream_port: int,
          redis_port: int | None) -> Outcome:
    """Start, check, warm up, measure and stop one target."""
    import redis

    outcome = Outcome(target)
    print(f"== {target}", flush=True)
    try:
        url = start_target(procs, target, tmp, upstream_port, redis_port)
        wait_ready(procs, target, url)
        run_wrk(url, args.warmup)
        client = redis.Redis(port=redis_port) if target in REDIS_TARGETS and redis_port else None
        before = redis_snapshot(client) if client else None
        text = run_wrk(url, args.duration)
        after = redis_snapshot(client) if client else None
        (OUT / f"wrk-{target}.txt").write_text(text)
        outcome.result = result = parse_wrk(text)
        if before and after:
            outcome.store, used = store_per_request(before, after, result.requests)
            if not used:
                outcome.problems.append("no Redis commands during the measured run: the store was not used")
        if result.non2xx or result.socket_errors:
            outcome.problems.append(f"{result.non2xx} non-2xx/3xx responses, {result.socket_errors} "
                                    "socket errors")
        print(f"   {result.rps:,.0f} req/s, p50 {fmt_time(result.p50)}, p99 {fmt_time(result.p99)}",
              flush=True)
    except Exception as exc:  # one failing target must not stop the others
        outcome.problems.append(f"failed: {exc}")
        print(f"   FAILED: {exc}", flush=True)
    finally:
        if target != "upstream":  # the origin stays up for the other targets
            procs.stop(target)
    log = OUT / f"{target}.log"
    bad = [line for line in log.read_text(errors="replace").splitlines() if LOG_PROBLEM.search(line)] \
        if target != "upstream" and log.exists() else []
    if bad:
        outcome.problems.append(f"{len(bad)} warning/error lines in bench/out/{target}.log, first: "
                                f"`{bad[0].strip()[:200]}`")
    return outcome


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
                         ("aiohttp", "uvicorn", "uvloop", "httptools", "starlette", "slowapi", "limits"))
    tools = ", ".join((version(["wrk", "-v"], r"wrk \S*?(\d[\w.]*)"), version(["nginx", "-v"], r"nginx/(\S+)"),
                       version(["redis-server", "--version"], r"v=(\S+)")))
    return (f"nproc {os.cpu_count()} ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {tools}; {packages}")


def render(outcomes: list[Outcome], args: argparse.Namespace, command: str) -> str:
    """The "## Latest run" section: facts, table, goal ratios, Redis figures, problems."""
    rps = {o.target: o.result.rps for o in outcomes if o.result}
    flagged = {o.target for o in outcomes if o.problems}
    base = rps.get("baseline")
    lines = ["## Latest run", "", f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
             f"- Machine: {machine_facts()}",
             f"- Command: `{command}` (per target: {args.warmup:g} s warm-up, then "
             f"`{' '.join(WRK)} -d{args.duration:g}s`; GET {PATH}, a {len(BODY)}-byte static file)", "",
             "| target | req/s | p50 | p99 | vs baseline | errors |", "|---|---:|---:|---:|---:|---|"]
    for o in outcomes:
        r = o.result
        cells = [f"{r.rps:,.0f}", fmt_time(r.p50), fmt_time(r.p99), f"{r.rps / base:.2f}" if base else "-"] \
            if r else ["-"] * 4
        lines.append(f"| {o.target} | {' | '.join(cells)} | {'**FLAGGED**' if o.problems else 'none'} |")
    lines += ["", "Goals:", ""]
    for target, against, goal in GOALS:
        if target in rps and against in rps:
            ratio = rps[target] / rps[against]
            note = " (flagged: see Problems)" if {target, against} & flagged else ""
            lines.append(f"- {target} / {against}: {ratio:.2f} (goal >= {goal:g}): "
                         f"{'met' if ratio >= goal else 'MISSED'}{note}")
        else:
            lines.append(f"- {target} / {against}: not measured (goal >= {goal:g})")
    stores = [f"- {o.target}: {o.store}" for o in outcomes if o.store]
    if stores:
        lines += ["", "Redis work per request in the measured run (Edgeway auto-pipelines: it should need "
                  "<= 1 round trip per request):", "", *stores]
    problems = [f"- {o.target}: {p}" for o in outcomes for p in o.problems]
    if problems:
        lines += ["", "Problems:", "", *problems]
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    """Replace the "## Latest run" section of RESULTS.md (or create the file with its intro)."""
    text = RESULTS.read_text() if RESULTS.exists() else INTRO
    start = text.find("## Latest run")
    if start < 0:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    following = text.find("\n## ", start + 1)
    rest = text[following + 1:] if following >= 0 else ""
    RESULTS.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark Edgeway against nginx, a bare proxy and slowapi.")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the warm-up run per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of: {','.join(TARGETS)}")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        parser.error(f"unknown target(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(TARGETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    need_redis = any(t in REDIS_TARGETS for t in args.targets)
    ensure_tools(need_redis)
    OUT.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the finally below too
    procs, tmp = Processes(), Path(tempfile.mkdtemp(prefix="edgeway-bench-"))
    outcomes: list[Outcome] = []
    try:
        upstream_port = free_port()
        start_nginx(procs, "upstream", tmp, upstream_port, None)
        wait_ready(procs, "upstream", f"http://127.0.0.1:{upstream_port}{PATH}")
        redis_port = start_redis(procs, tmp) if need_redis else None
        for target in args.targets:
            outcomes.append(bench(procs, target, args, tmp, upstream_port, redis_port))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    section = render(outcomes, args, command)
    print("\n" + section)
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
