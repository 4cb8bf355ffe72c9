"""The bounded memo the request path keeps computed values in."""

from __future__ import annotations

from edgeway.middleware.memo import Memo


def test_keeps_at_most_its_size_dropping_the_oldest_first() -> None:
    memo: Memo[str, int] = Memo(3)
    assert [memo.keep(key, n) for n, key in enumerate("abcd")] == [0, 1, 2, 3]
    assert dict(memo) == {"b": 1, "c": 2, "d": 3}
    assert memo.keep("c", 9) == 9 and dict(memo) == {"b": 1, "c": 9, "d": 3}  # a known key drops nothing
    assert memo.get("a") is None and memo.get("d") == 3
