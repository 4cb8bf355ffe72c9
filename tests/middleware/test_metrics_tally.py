"""Request-path counting (``tally``/``timings``): what a scrape shows must be exactly what direct
``inc``/``observe`` calls would have shown, at every collection."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from edgeway.middleware import metrics
from edgeway.middleware.metrics import Counter, Histogram, fold, tally, timings

AMOUNTS = (0.0, 0.0005, 0.0007, 0.001, 0.003, 0.005, 0.02, 1.0, 59.0, 60.0, 61.0, 1e9)


def families(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    counter = Counter("t_requests", "test", ["who"], registry=registry)
    histogram = Histogram("t_seconds", "test", ["who"], buckets=(0.0005, 0.001, 0.005, 1.0, 60.0), registry=registry)
    return counter, histogram


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample a scrape would show, but the creation times (which differ between two registries)."""
    return [(sample.name, sample.labels, sample.value) for family in registry.collect() for sample in family.samples
            if not sample.name.endswith("_created")]


def test_a_scrape_shows_what_direct_calls_show() -> None:
    folded, direct = CollectorRegistry(), CollectorRegistry()
    folded_counter, folded_histogram = families(folded)
    direct_counter, direct_histogram = families(direct)
    count, observe = tally(folded_counter.labels("a")), timings(folded_histogram.labels("a"))
    for round_no in range(3):  # collections in between: each shows the total so far, nothing counted twice
        for amount in AMOUNTS:
            count.inc()
            count.inc(2)
            observe.observe(amount)
            direct_counter.labels("a").inc()
            direct_counter.labels("a").inc(2)
            direct_histogram.labels("a").observe(amount)
        assert samples(folded) == samples(direct), round_no


def test_a_child_has_one_tally_whoever_binds_it() -> None:
    counter, histogram = families(CollectorRegistry())
    assert tally(counter.labels("b")) is tally(counter.labels("b"))
    assert timings(histogram.labels("b")) is timings(histogram.labels("b"))


def test_under_several_workers_the_children_are_counted_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers share values through files that another worker's scrape reads: nothing may wait in memory."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    counter, histogram = families(CollectorRegistry())
    child, timed = counter.labels("c"), histogram.labels("c")
    assert tally(child) is child and timings(timed) is timed


def test_folding_in_another_thread_loses_no_increment() -> None:
    registry = CollectorRegistry()
    counter, _ = families(registry)
    count = tally(counter.labels("d"))
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            fold()

    thread = threading.Thread(target=scraper)
    thread.start()
    for _ in range(100_000):
        count.inc()
    done.set()
    thread.join()
    assert registry.get_sample_value("t_requests_total", {"who": "d"}) == 100_000


def test_every_family_folds_before_it_is_collected() -> None:
    for family in metrics.FAMILIES:
        if family._type in ("counter", "histogram"):
            assert isinstance(family, Counter | Histogram), family._name
