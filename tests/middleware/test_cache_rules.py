"""The cache's pure rules as tables: bypasses, never-store rules, freshness, conditionals, 304 updates, entries."""

from __future__ import annotations

import random

import pytest

from edgeway.middleware.cache_entry import PASS, VARY, Entry, decode, encode, vary_marker
from edgeway.middleware.cache_rules import (
    RequestFacts,
    Rules,
    bypass,
    cache_control,
    cdn_cache_control,
    freshness,
    not_modified,
    not_storable,
    refreshed,
    stored_headers,
    validators,
)

NOW = 1_700_000_000.0
GET_HEAD = ("GET", "HEAD")
Headers = list[tuple[bytes, bytes]]

BYPASS = [
    # facts, key has body, key has user, cookies ignored, expected
    (RequestFacts("GET"), False, False, False, None),
    (RequestFacts("HEAD"), False, False, False, None),
    (RequestFacts("POST"), False, False, False, "method"),
    (RequestFacts("GET", authorization=True), False, False, False, "authorization"),
    (RequestFacts("GET", cookie=True), False, False, False, "cookie"),
    (RequestFacts("GET", cookie=True), False, False, True, None),
    (RequestFacts("GET", cookie=True, session_cookie=True), False, False, True, "cookie"),
    (RequestFacts("GET", cookie=True, session_cookie=True), False, True, True, "cookie"),
    (RequestFacts("GET", user=True), False, False, False, "session"),
    (RequestFacts("GET", user=True, authorization=True), False, True, False, None),
    (RequestFacts("GET", authorization=True), False, True, False, "authorization"),
    (RequestFacts("GET", cookie=True), False, True, False, "cookie"),
    (RequestFacts("GET", override_header=True), False, False, False, "unkeyed-header"),
    (RequestFacts("GET", body=True), False, False, False, "request-body"),
    (RequestFacts("GET", body=True), True, False, False, None),
    (RequestFacts("GET", body=True, body_too_large=True), True, False, False, "request-too-large"),
]


@pytest.mark.parametrize(("facts", "body", "user", "ignored", "expected"), BYPASS)
def test_bypass(facts: RequestFacts, body: bool, user: bool, ignored: bool, expected: str | None) -> None:
    methods = ("GET", "HEAD", "POST") if body else GET_HEAD
    assert bypass(facts, key_has_body=body, key_has_user=user, cookies_ignored=ignored, methods=methods) == expected


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
@pytest.mark.parametrize("body", [False, True])
@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
def test_without_a_fact_only_the_method_bypasses(method: str, body: bool, user: bool, ignored: bool) -> None:
    """What the cache's prepare relies on to skip this function for a plain request (every hit)."""
    methods = ("GET", "HEAD", "POST") if body else GET_HEAD
    expected = None if method in methods else "method"
    assert bypass(RequestFacts(method), key_has_body=body, key_has_user=user, cookies_ignored=ignored,
                  methods=methods) == expected


RULES = Rules(ttl=60.0)

NOT_STORABLE = [
    (200, [], None),
    (203, [], None), (204, [], None), (300, [], None), (301, [], None), (308, [], None), (404, [], None),
    (410, [], None),
    (302, [], "status"), (500, [], "status"), (502, [], "status"), (206, [], "status"),
    (200, [(b"set-cookie", b"a=1")], "set-cookie"),
    (200, [(b"Set-Cookie", b"a=1")], "set-cookie"),
    (200, [(b"cache-control", b"private")], "private"),
    (200, [(b"cache-control", b"public, no-store")], "no-store"),
    (200, [(b"cache-control", b"no-cache")], "no-cache"),
    (200, [(b"cache-control", b'private="set-cookie"')], "private"),
    (200, [(b"vary", b"accept, *")], "vary-star"),
    (200, [(b"vary", b"accept")], None),
    (504, [(b"edgeway-error", b"upstream_timeout")], "edgeway-error"),
    (200, [(b"edgeway-error", b"x")], "edgeway-error"),
]


@pytest.mark.parametrize(("status", "headers", "expected"), NOT_STORABLE)
def test_not_storable(status: int, headers: Headers, expected: str | None) -> None:
    assert not_storable(status, headers, RULES) == expected


def cc(value: str) -> Headers:
    return [(b"cache-control", value.encode())]


FRESHNESS = [
    # rules, response headers, (fresh, swr, sie) or None
    (Rules(ttl=60.0), [], (60.0, 0.0, 0.0)),
    (Rules(ttl=60.0), cc("max-age=10"), (10.0, 0.0, 0.0)),
    (Rules(ttl=60.0), cc("max-age=600"), (60.0, 0.0, 0.0)),
    (Rules(ttl=60.0), cc("max-age=600, s-maxage=5"), (5.0, 0.0, 0.0)),
    (Rules(ttl=60.0, respect_origin=False), cc("max-age=10"), (60.0, 0.0, 0.0)),
    (Rules(ttl=60.0), [*cc("max-age=10"), (b"age", b"4")], (6.0, 0.0, 0.0)),
    (Rules(ttl=60.0, stale_if_error=300.0), [], (60.0, 0.0, 300.0)),
    (Rules(ttl=60.0), cc("max-age=30, stale-while-revalidate=15, stale-if-error=99"), (30.0, 15.0, 99.0)),
    (Rules(ttl=60.0, stale_if_error=300.0), cc("must-revalidate"), (60.0, 0.0, 0.0)),
    (Rules(ttl=60.0), cc("max-age=0"), None),
    (Rules(ttl=None), [], None),
    (Rules(ttl=None, default_ttl=20.0), [], (20.0, 0.0, 0.0)),
    (Rules(ttl=None), cc("max-age=600"), (600.0, 0.0, 0.0)),
    (Rules(ttl=None), [(b"expires", b"Tue, 14 Nov 2023 22:14:20 GMT")], (60.0, 0.0, 0.0)),  # NOW is 22:13:20
    (Rules(ttl=None), [(b"expires", b"Tue, 14 Nov 2023 22:14:20 GMT"), (b"date", b"Tue, 14 Nov 2023 22:12:40 GMT")],
     (100.0, 0.0, 0.0)),
    (Rules(ttl=None), [(b"expires", b"0")], None),
    (Rules(ttl=None, default_ttl=20.0), cc("max-age=bogus"), (20.0, 0.0, 0.0)),
]


@pytest.mark.parametrize(("rules", "headers", "expected"), FRESHNESS)
def test_freshness(rules: Rules, headers: Headers, expected: tuple[float, float, float] | None) -> None:
    found = freshness(headers, rules, NOW)
    got = None if found is None else (found.fresh, found.stale_while_revalidate, found.stale_if_error)
    assert got == expected


def test_entries_are_kept_for_the_longer_stale_window() -> None:
    found = freshness([], Rules(ttl=60.0, stale_while_revalidate=30.0, stale_if_error=600.0), NOW)
    assert found is not None and found.keep == 660.0


def test_cache_control_parsing() -> None:
    assert cache_control([b'max-age=60, Private="x", no-store', b"s-maxage=\"5\""]) == {
        "max-age": "60", "private": "x", "no-store": None, "s-maxage": "5"}


STORED = [(b"etag", b'"v1"'), (b"last-modified", b"Tue, 14 Nov 2023 22:00:00 GMT")]

CONDITIONALS = [
    ({"if-none-match": ['"v1"']}, True),
    ({"if-none-match": ['W/"v1"']}, True),
    ({"if-none-match": ['"v0", "v1"']}, True),
    ({"if-none-match": ["*"]}, True),
    ({"if-none-match": ['"v2"']}, False),
    ({"if-none-match": ['"v2"'], "if-modified-since": ["Wed, 15 Nov 2023 00:00:00 GMT"]}, False),
    ({"if-modified-since": ["Wed, 15 Nov 2023 00:00:00 GMT"]}, True),
    ({"if-modified-since": ["Tue, 14 Nov 2023 21:00:00 GMT"]}, False),
    ({"if-modified-since": ["not a date"]}, False),
    ({}, False),
]


@pytest.mark.parametrize(("request_headers", "expected"), CONDITIONALS)
def test_not_modified(request_headers: dict[str, list[str]], expected: bool) -> None:
    assert not_modified(request_headers, STORED) is expected


def test_validators_for_revalidation() -> None:
    assert validators(STORED) == [(b"if-none-match", b'"v1"'),
                                  (b"if-modified-since", b"Tue, 14 Nov 2023 22:00:00 GMT")]
    assert validators([(b"content-type", b"text/plain")]) == []


def test_stored_headers_drop_hop_by_hop_and_per_answer_fields() -> None:
    headers = [(b"Connection", b"x-private"), (b"x-private", b"1"), (b"keep-alive", b"5"),
               (b"transfer-encoding", b"chunked"), (b"set-cookie", b"a"), (b"age", b"3"), (b"date", b"d"),
               (b"ratelimit", b"r"), (b"content-type", b"application/json"), (b"x-kept", b"1")]
    assert stored_headers(headers) == [(b"content-type", b"application/json"), (b"x-kept", b"1")]


def test_304_updates_stored_fields_but_not_the_body_description() -> None:
    stored = [(b"content-type", b"application/json"), (b"content-length", b"10"), (b"etag", b'"v1"'),
              (b"x-version", b"1")]
    update = [(b"etag", b'"v1"'), (b"x-version", b"2"), (b"content-length", b"0"), (b"connection", b"close")]
    assert refreshed(stored, update) == [(b"content-type", b"application/json"), (b"content-length", b"10"),
                                         (b"etag", b'"v1"'), (b"x-version", b"2")]


@pytest.mark.parametrize(("headers", "expected"), [
    ([], [(b"cache-control", b"public, s-maxage=60"), (b"cdn-cache-control", b"max-age=60")]),
    (cc("max-age=5, s-maxage=1"), [(b"cache-control", b"public, max-age=5, s-maxage=60"),
                                   (b"cdn-cache-control", b"max-age=60")]),
    (cc("private"), cc("private")),
    ([(b"set-cookie", b"a=1")], [(b"set-cookie", b"a=1")]),
])
def test_cdn_cache_control(headers: Headers, expected: Headers) -> None:
    assert cdn_cache_control(headers, 60) == expected


# -- the stored value ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[], [b""], [b"ok"], [b"data: 1\n\n", b"data: 2\n\n"], [bytes(range(256)) * 64],
                                    [b"x" * 5000, b"y"]])
def test_entries_round_trip(chunks: list[bytes]) -> None:
    entry = Entry(203, [(b"content-type", b"text/event-stream"), (b"x-bin", bytes(range(128, 256)))], chunks,
                  NOW, 60.0, 5.0, 300.0)
    decoded = decode(encode(entry))
    assert decoded == entry


def test_compression_only_when_it_saves_space() -> None:
    compressible = Entry(200, [], [b"a" * 5000], NOW, 60.0)
    random_like = Entry(200, [], [random.Random(1).randbytes(5000)], NOW, 60.0)
    assert len(encode(compressible)) < 200
    assert len(encode(random_like)) > 5000
    assert decode(encode(random_like)) == random_like


def test_vary_markers_and_hit_for_miss_entries_round_trip() -> None:
    marker = decode(encode(vary_marker(("accept", "x-team"), NOW, 90.0)))
    assert marker is not None and marker.kind == VARY and marker.vary == ("accept", "x-team")
    passed = decode(encode(Entry(0, [], [], NOW, 0.0, kind=PASS)))
    assert passed is not None and passed.kind == PASS


@pytest.mark.parametrize("value", [None, b"", b"\x00", b"\x10short", b"\x11not zlib", encode(Entry(200, [], [b"x"],
                                                                                                     NOW, 1.0)) + b"!"])
def test_undecodable_values_are_misses(value: bytes | None) -> None:
    assert decode(value) is None


def test_age_and_ttl() -> None:
    entry = Entry(200, [], [], NOW, 60.0)
    assert (entry.age(NOW + 10), entry.ttl(NOW + 10), entry.ttl(NOW + 70)) == (10.0, 50.0, -10.0)
