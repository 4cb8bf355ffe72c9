"""The store chain a policy's `store:` section builds, including the kill switch."""

from __future__ import annotations

import pytest

from edgeway.gateway.loader import load_text
from edgeway.gateway.stores import build_store
from edgeway.middleware.store.failover import FailoverStore
from edgeway.middleware.store.memory import MemoryStore


def store_for(section: str):  # type: ignore[no-untyped-def]
    text = f"""\
version: 1
store: {section}
upstreams: {{ api: {{ url: "http://127.0.0.1:9" }} }}
routes: [{{ match: {{ path: /* }}, upstream: api }}]
"""
    return build_store(load_text(text, "p.yaml", {}).policy.store)


def kinds(store) -> list[str]:  # type: ignore[no-untyped-def]
    return [entry["kind"] for entry in store.status()]


def test_memory_url_is_the_embedded_store() -> None:
    assert isinstance(store_for('{ url: "memory://" }'), MemoryStore)


def test_redis_falls_back_to_memory_by_default() -> None:
    store = store_for('{ url: "redis://127.0.0.1:1" }')
    assert isinstance(store, FailoverStore) and kinds(store) == ["redis", "memory"]


def test_the_full_chain_in_order() -> None:
    store = store_for('{ url: "redis://127.0.0.1:1", fallback: [{ supabase: { url: "https://x.supabase.co", '
                      'key: k } }, { postgres: { dsn: "postgresql://u@h/db" } }, memory] }')
    assert kinds(store) == ["redis", "supabase", "postgres", "memory"]


def test_empty_fallback_keeps_health_tracking_but_no_fallback() -> None:
    store = store_for('{ url: "redis://127.0.0.1:1", fallback: [] }')
    assert isinstance(store, FailoverStore) and kinds(store) == ["redis"]


@pytest.mark.parametrize("value", ["false", "0", "off", "no"])
def test_kill_switch_env_skips_redis(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("EDGEWAY_REDIS_ENABLED", value)
    assert isinstance(store_for('{ url: "redis://127.0.0.1:1" }'), MemoryStore)
    store = store_for('{ url: "redis://127.0.0.1:1", fallback: [{ postgres: { dsn: "postgresql://u@h/db" } }, '
                      'memory] }')
    assert kinds(store) == ["postgres", "memory"]


def test_kill_switch_in_the_policy() -> None:
    assert isinstance(store_for('{ url: "redis://127.0.0.1:1", enabled: false }'), MemoryStore)


def test_kill_switch_env_true_keeps_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWAY_REDIS_ENABLED", "true")
    assert kinds(store_for('{ url: "redis://127.0.0.1:1" }')) == ["redis", "memory"]
