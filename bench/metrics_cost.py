"""What the per-request metrics cost: ``RouteMeter.record`` (one counter increment and one histogram
observation per answered request), timed in-process.

    .venv/bin/python bench/metrics_cost.py [--requests 200000]

``edgeway serve`` keeps metrics in memory with one worker and in per-process mmap files with
``--workers N`` (prometheus-client's multiprocess mode); both are timed, each in a fresh interpreter
(the mode is chosen when prometheus-client is first imported). The access log's cost is measured with
wrk by ``bench/run.py`` (targets edgeway and edgeway-access-log-off).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
from edgeway.gateway.routing import RouteMeter
meter = RouteMeter("/api/*", ("GET",))
n = int(sys.argv[1])
for _ in range(1000):
    meter.record("GET", 200, 0.001)
started = time.perf_counter()
for _ in range(n):
    meter.record("GET", 200, 0.001)
print((time.perf_counter() - started) / n * 1e6)
"""


def timed(requests: int, multiprocess_dir: str | None) -> float:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiprocess_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
    out = subprocess.run([sys.executable, "-c", CHILD, str(requests)], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    single = timed(args.requests, None)
    with tempfile.TemporaryDirectory(prefix="edgeway-metrics-") as directory:
        multi = timed(args.requests, directory)
    print(f"metrics per request (RouteMeter.record, {args.requests} requests): one worker {single:.2f} us, "
          f"--workers N (multiprocess files) {multi:.2f} us")


if __name__ == "__main__":
    main()
