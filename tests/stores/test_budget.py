"""store.budget: commands counted per store and kind, the month's total kept in the store by every instance
(folded into batches), the 80% warning, and on_budget_exhausted: fallback until the month turns."""

from __future__ import annotations

import calendar
import logging
import uuid

import pytest
import redis
from prometheus_client import REGISTRY

from edgeway.middleware import metrics
from edgeway.middleware.store import Algorithm, Get, Incr, LimitCheck, RateLimit, Set
from edgeway.middleware.store.budget import CommandBudget, month_of
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore
from edgeway.middleware.store.redis import RedisStore
from tests.clock import Clock

NOV = calendar.timegm((2026, 11, 20, 12, 0, 0))
DEC = calendar.timegm((2026, 12, 1, 0, 0, 1))


def limit_command(key: str) -> RateLimit:
    return RateLimit((LimitCheck(key, Algorithm.FIXED_WINDOW, 1000, 60_000),))


# --------------------------------------------------------------------------- the pure bookkeeping


def test_month_is_utc() -> None:
    assert month_of(calendar.timegm((2026, 11, 30, 23, 59, 59))) == "2026-11"
    assert month_of(DEC) == "2026-12"


def test_increment_waits_until_enough_commands_accumulated() -> None:
    budget = CommandBudget(10_000, key_prefix="p:", clock=Clock(NOV))  # flushes every 10 commands
    first = budget.charge(2)  # the first batch carries one at once: the instance learns the month's total
    assert first == Incr("p:budget:2026-11", 3, ttl_ms=40 * 86_400_000)  # 2 commands plus the increment itself
    assert [budget.charge(3) for _ in range(3)] == [None, None, None]
    assert budget.charge(3) == Incr("p:budget:2026-11", 13, ttl_ms=40 * 86_400_000)
    assert budget.charge(1) is None


def test_a_failed_batch_counts_its_commands_again() -> None:
    budget = CommandBudget(1000, clock=Clock(NOV))  # flushes every command
    incr = budget.charge(4)
    assert incr is not None and incr.amount == 5
    budget.refund(incr)
    again = budget.charge(1)
    assert again is not None and again.amount == 6


def test_warns_once_at_80_percent_and_reports_exhaustion(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(NOV)
    budget = CommandBudget(1000, on_exhausted="fallback", store="upstash", clock=clock)
    incr = budget.charge(1)
    assert incr is not None
    with caplog.at_level(logging.WARNING, "edgeway.store"):
        budget.record(incr, 799)
        assert not caplog.records and not budget.status()["warning"]
        budget.record(incr, 800)
        budget.record(incr, 900)
        assert [r.getMessage() for r in caplog.records] == [
            "store upstash used 800 of its 1000 commands for 2026-11 (80%)"]
        assert budget.status() == {"month": "2026-11", "used": 900, "limit": 1000, "percent": 90.0, "warning": True,
                                   "exhausted": False, "on_exhausted": "fallback", "pending": 0}
        budget.record(incr, 1000)
    assert budget.exhausted and budget.diverting
    assert "budget of 1000 commands for 2026-11 is used up: shared state moves" in caplog.text
    assert metrics.STORE_BUDGET_USED.labels("upstash")._value.get() == 1000
    assert metrics.STORE_BUDGET_LIMIT.labels("upstash")._value.get() == 1000
    clock.now = DEC  # a new month starts from zero
    assert not budget.exhausted and budget.status()["used"] == 0


def test_alert_mode_never_diverts() -> None:
    budget = CommandBudget(10, clock=Clock(NOV))
    incr = budget.charge(1)
    assert incr is not None
    budget.record(incr, 50)
    assert budget.exhausted and not budget.diverting


# --------------------------------------------------------------------------- on real Redis


@pytest.fixture
def prefix() -> str:
    return f"budget-{uuid.uuid4().hex[:8]}:"


def chain(redis_url: str, prefix: str, limit: int, clock: Clock, on_exhausted: str = "alert") -> FailoverStore:
    budget = CommandBudget(limit, on_exhausted=on_exhausted, key_prefix=prefix, store="redis", clock=clock)
    return FailoverStore(RedisStore(redis_url, timeout=1.0), [MemoryStore()], key_prefix=prefix, budget=budget,
                         instances=1)


async def test_instances_share_one_count_folded_into_their_batches(redis_url: str, prefix: str) -> None:
    clock = Clock(NOV)
    first, second = chain(redis_url, prefix, 1000, clock), chain(redis_url, prefix, 1000, clock)
    server = redis.Redis.from_url(redis_url)
    before = server.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    try:
        for n in range(5):
            await first.execute([limit_command(f"{prefix}a{n}")])
            await second.execute([limit_command(f"{prefix}b{n}"), Get(f"{prefix}g")])
        key = f"{prefix}budget:2026-11"
        # first: 5 batches of 1 command + 5 increments; second: 5 batches of 2 + 5 increments
        assert int(server.get(key) or 0) == 10 + 15
        assert 0 < server.pttl(key) <= 40 * 86_400_000
        assert second.budget is not None and second.budget.used == 25
        # every increment rode in a batch that went anyway: no command was sent on its own
        evalsha = server.info("commandstats")["cmdstat_evalsha"]["calls"] - before
        assert evalsha == 10 + 10  # each batch's rate limit and its folded increment
    finally:
        await first.close()
        await second.close()
        server.close()


def commands_counted(kind: str) -> float:
    """``edgeway_store_commands_total`` as a scrape shows it (counts on the request path are folded then)."""
    return REGISTRY.get_sample_value("edgeway_store_commands_total", {"store": "redis", "kind": kind}) or 0.0


async def test_commands_are_counted_by_store_and_kind(redis_url: str, prefix: str) -> None:
    store = chain(redis_url, prefix, 1000, Clock(NOV))
    before = {kind: commands_counted(kind) for kind in ("ratelimit", "set", "incr")}
    try:
        await store.execute([limit_command(f"{prefix}x"), Set(f"{prefix}s", "v", 1000)])
    finally:
        await store.close()
    assert {kind: commands_counted(kind) - count for kind, count in before.items()} == \
        {"ratelimit": 1, "set": 1, "incr": 1}


async def test_fallback_mode_leaves_the_primary_until_the_month_turns(redis_url: str, prefix: str) -> None:
    clock = Clock(NOV)
    store = chain(redis_url, prefix, 10, clock, on_exhausted="fallback")
    server = redis.Redis.from_url(redis_url)
    try:
        for n in range(5):  # 5 batches of 1 command, each with its increment: 10 = the budget
            await store.execute([limit_command(f"{prefix}k{n}")])
        assert store.kind == "redis"
        assert store.budget is not None and store.budget.exhausted
        await store.execute([limit_command(f"{prefix}k")])
        assert store.kind == "memory"  # shared state moved on; the primary got nothing more
        assert int(server.get(f"{prefix}budget:2026-11") or 0) == 10
        clock.now = DEC
        await store.execute([limit_command(f"{prefix}k")])
        assert store.kind == "redis"
        assert int(server.get(f"{prefix}budget:2026-12") or 0) == 2
    finally:
        await store.close()
        server.close()


async def test_alert_mode_keeps_using_the_primary(redis_url: str, prefix: str) -> None:
    store = chain(redis_url, prefix, 4, Clock(NOV))
    try:
        for n in range(5):
            await store.execute([limit_command(f"{prefix}k{n}")])
        assert store.budget is not None and store.budget.exhausted and store.kind == "redis"
    finally:
        await store.close()



@pytest.mark.parametrize(("store", "problem"), [
    ('{ url: "memory://", budget: 500000/month }', "<policy>:3:8: store: store.budget counts commands sent to a "
     "remote store; memory:// sends none"),
    ('{ url: "redis://r", budget: 500000/day }', "<policy>:3:36: store.budget: a budget is N/month, such as "
     "500000/month (Upstash's free tier), got '500000/day'"),
    ('{ url: "redis://r", budget: 9/month, fallback: [], on_budget_exhausted: fallback }',
     "<policy>:3:8: store: on_budget_exhausted: fallback needs a store to fall back to (store.fallback is [])"),
])
def test_budget_settings_that_cannot_work_are_refused(store: str, problem: str) -> None:
    from edgeway.gateway import PolicyError, load_text

    text = f"""
version: 1
store: {store}
upstreams: {{ a: {{ url: "http://127.0.0.1:9" }} }}
routes: [{{ match: {{ path: /x }}, upstream: a }}]
"""
    with pytest.raises(PolicyError) as refused:
        load_text(text)
    assert str(refused.value) == problem


def test_budget_with_underscores_and_its_default_mode() -> None:
    from edgeway.gateway import load_text

    store = load_text("""
version: 1
store: { url: "redis://r", budget: 500_000/month }
upstreams: { a: { url: "http://127.0.0.1:9" } }
routes: [{ match: { path: /x }, upstream: a }]
""").policy.store
    assert (store.budget, store.on_budget_exhausted) == (500_000, "alert")
