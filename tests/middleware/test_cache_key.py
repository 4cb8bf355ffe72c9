"""Cache keys as tables: canonical JSON, include/exclude paths, query order, key parts, Vary."""

from __future__ import annotations

import pytest

from edgeway.middleware.cache_key import (
    body_part,
    canonical_json,
    canonical_query,
    check_json_path,
    check_key_part,
    digest,
    is_json,
    vary_digest,
    vary_names,
)

SAME_JSON = [
    (b'{"a": 1, "b": 2}', b'{"b":2,"a":1}', "key order"),
    (b'{"a":[1, 2]}', b'  {\n "a" : [ 1,2 ] }\n', "whitespace"),
    (b'{"t": 1.0}', b'{"t": 1}', "1.0 is 1"),
    (b'{"t": 1e2}', b'{"t": 100}', "exponent"),
    (b'{"t": -0.0}', b'{"t": 0}', "negative zero"),
    (b'{"s": "\\u00e9"}', '{"s": "é"}'.encode(), "escaped unicode"),
    (b'{"o": {"y": 1, "x": 2}}', b'{"o": {"x": 2, "y": 1}}', "nested key order"),
]


@pytest.mark.parametrize(("left", "right", "why"), SAME_JSON, ids=[row[2] for row in SAME_JSON])
def test_equivalent_json_documents_share_a_canonical_form(left: bytes, right: bytes, why: str) -> None:
    assert canonical_json(left) == canonical_json(right) is not None


DIFFERENT_JSON = [
    (b'{"t": 0.5}', b'{"t": 0.50001}'),
    (b'{"a": [1, 2]}', b'{"a": [2, 1]}'),  # array order is meaning
    (b'{"a": "1"}', b'{"a": 1}'),
    (b'{"a": null}', b"{}"),
]


@pytest.mark.parametrize(("left", "right"), DIFFERENT_JSON)
def test_different_json_documents_stay_different(left: bytes, right: bytes) -> None:
    assert canonical_json(left) != canonical_json(right)


PATHS = [
    ({"include": ["model", "messages"]}, b'{"model":"m","messages":[1],"seed":3}', b'{"messages":[1],"model":"m"}'),
    ({"include": ["meta.kind"]}, b'{"meta":{"kind":"a","id":1},"x":2}', b'{"meta":{"kind":"a"}}'),
    ({"include": ["absent"]}, b'{"a":1}', b"{}"),
    ({"exclude": ["stream", "user"]}, b'{"stream":true,"user":"u","q":1}', b'{"q":1}'),
    ({"exclude": ["meta.request_id"]}, b'{"meta":{"request_id":"r","k":1}}', b'{"meta":{"k":1}}'),
    ({"exclude": ["a.b.c"]}, b'{"a":1}', b'{"a":1}'),
    ({"exclude": ["x"]}, b"[1,2]", b"[1,2]"),  # paths apply to objects only
]


@pytest.mark.parametrize(("options", "body", "canonical"), PATHS)
def test_include_and_exclude_paths(options: dict[str, list[str]], body: bytes, canonical: bytes) -> None:
    assert canonical_json(body, options.get("include", ()), options.get("exclude", ())) == canonical


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"a": NaN'])
def test_what_is_not_json_has_no_canonical_form(body: bytes) -> None:
    assert canonical_json(body) is None


def test_body_part_hashes_non_json_as_bytes() -> None:
    assert body_part(b"{bad", "application/json") == b"b{bad"
    assert body_part(b'{"a": 1}', "text/plain") == b'b{"a": 1}'
    assert body_part(b'{"a": 1}', "application/vnd.api+json") == b'j{"a":1}'


@pytest.mark.parametrize(("content_type", "expected"), [
    ("application/json", True), ("application/json; charset=utf-8", True), ("Application/JSON", True),
    ("application/problem+json", True), ("text/json", False), ("text/plain", False), (None, False), ("", False),
])
def test_is_json(content_type: str | None, expected: bool) -> None:
    assert is_json(content_type) is expected


QUERIES = [
    (b"b=2&a=1", b"a=1&b=2", True, "sorted by name"),
    (b"a=1&a=2", b"a=2&a=1", False, "repeated names keep their order"),
    (b"a=1&utm_source=x&b=2", b"b=2&a=1", True, "tracking parameters ignored"),
    (b"a=%20", b"a=+", True, "decoded before comparing"),
    (b"a=", b"a", True, "blank values kept"),
    (b"a=1", b"a=1&a=1", False, "a repeated value is another request"),
]


@pytest.mark.parametrize(("left", "right", "same", "why"), QUERIES, ids=[row[3] for row in QUERIES])
def test_query_canonical_form(left: bytes, right: bytes, same: bool, why: str) -> None:
    ignore = ("utm_*",)
    assert (canonical_query(left, ignore) == canonical_query(right, ignore)) is same


def test_digest_parts_cannot_run_into_each_other() -> None:
    assert digest([b"ab", b"c"]) != digest([b"a", b"bc"])
    assert len(digest([b"x"])) == 64


@pytest.mark.parametrize(("part", "normal"), [
    ("method", "method"), ("path", "path"), ("query", "query"), ("body", "body"), ("user", "user"),
    ("header:X-Team", "header:x-team"), ("header: Accept ", "header:accept"),
])
def test_key_parts(part: str, normal: str) -> None:
    assert check_key_part(part) == normal


@pytest.mark.parametrize("part", ["cookie", "header:", "ip", "Method", "query:page"])
def test_unknown_key_parts_are_refused(part: str) -> None:
    with pytest.raises(ValueError, match="unknown cache key part"):
        check_key_part(part)


@pytest.mark.parametrize("path", ["a..b", "", "a b", ".a", "a.", "$.a"])
def test_bad_json_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="bad JSON path"):
        check_json_path(path)


def test_vary_names_and_digest() -> None:
    assert vary_names([b"Accept-Encoding, accept-language", b"X-Team"]) == (
        "accept-encoding", "accept-language", "x-team")
    assert vary_names([b"accept, *"]) is None
    assert vary_names([]) == ()
    names = ("accept-language",)
    assert vary_digest(names, {"accept-language": ["en"]}) != vary_digest(names, {"accept-language": ["fr"]})
    assert vary_digest(names, {}) == vary_digest(names, {"accept-language": []})
