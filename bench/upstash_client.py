"""Which Upstash client for the hot path? The upstash-redis SDK vs Edgeway's own REST client, measured.

Both talk to the same Upstash-REST-compatible bridge (``edgeway.gateway.upstash_bridge``)
over a private redis-server. Each simulated request makes one rate-limit
decision (the same Lua script, by SHA); ``CONCURRENCY`` requests run at once,
as under load in the gateway. The SDK sends one HTTP request per call (its
``pipeline()`` batches one caller's commands, not concurrent callers'), while
``UpstashStore`` coalesces every batch of an event-loop turn into one
``POST /pipeline``. Run: ``.venv/bin/python bench/upstash_client.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from upstash_redis.asyncio import Redis as SdkRedis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeway.gateway.upstash_bridge import create_bridge_app  # noqa: E402
from edgeway.middleware.store import Algorithm, LimitCheck, RateLimit  # noqa: E402
from edgeway.middleware.store.redis_protocol import RATE_LIMIT_SCRIPT  # noqa: E402
from edgeway.middleware.store.upstash import UpstashStore  # noqa: E402
from tests.servers import free_port, wait_for_port  # noqa: E402

TOKEN = "bench-token"
CONCURRENCY = 32
SECONDS = 5.0


async def drive(call: object, label: str) -> float:
    """Requests per second with CONCURRENCY callers looping on ``call`` for SECONDS."""
    done = 0
    deadline = time.monotonic() + SECONDS

    async def caller(i: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await call(i)  # type: ignore[operator]
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(CONCURRENCY)))
    rate = done / (time.monotonic() - started)
    print(f"{label:<40} {rate:>8.0f} decisions/s")
    return rate


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis_port, bridge_port = free_port(), free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no",
                                  "--dir", tmp], stdout=subprocess.DEVNULL)
        server = uvicorn.Server(uvicorn.Config(create_bridge_app(f"redis://127.0.0.1:{redis_port}", TOKEN),
                                               port=bridge_port, log_level="warning", loop="uvloop"))
        thread = threading.Thread(target=server.run, daemon=True)
        try:
            wait_for_port(redis_port)
            thread.start()
            wait_for_port(bridge_port)
            url = f"http://127.0.0.1:{bridge_port}"
            ours = UpstashStore(url, token=TOKEN, timeout=5.0)

            async def edgeway_call(i: int) -> None:
                await ours.execute([RateLimit((LimitCheck(f"b:{{{i}}}:m", Algorithm.SLIDING_WINDOW, 10**9, 60_000),
                                               LimitCheck(f"b:{{{i}}}:d", Algorithm.SLIDING_WINDOW, 10**9,
                                                          86_400_000)))])

            sdk = SdkRedis(url, TOKEN, rest_encoding=None, allow_telemetry=False, read_your_writes=False)
            await sdk.script_load(RATE_LIMIT_SCRIPT.source)
            args = ["", "sliding-window", 10**9, 60_000, 1, 0, 1, "sliding-window", 10**9, 86_400_000, 1, 0, 1]

            async def sdk_call(i: int) -> None:
                await sdk.evalsha(RATE_LIMIT_SCRIPT.sha, [f"s:{{{i}}}:m", f"s:{{{i}}}:d"], args)

            await edgeway_call(0)
            sdk_rate = await drive(sdk_call, "upstash-redis 1.8 SDK (evalsha)")
            ours_rate = await drive(edgeway_call, "Edgeway UpstashStore (auto-pipelined)")
            print(f"ratio Edgeway/SDK: {ours_rate / sdk_rate:.2f}")
            await ours.close()
            await sdk.close()
        finally:
            server.should_exit = True
            thread.join(timeout=5)
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    asyncio.run(main())
