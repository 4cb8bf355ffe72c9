"""Bounded memos for values the request path computes again and again (a token's digest, a quoted log field,
a cache key): the one way Edgeway remembers such values without letting a client grow its memory."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V]):
    """A dict of computed values holding at most ``size`` entries: ``keep`` drops the oldest when full.

    Look values up with the dict's own ``get`` (no method of this class on the hit path).
    """

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: K, value: V) -> V:
        """Remember ``value`` for ``key`` and return it."""
        if len(self) >= self.size and key not in self:
            del self[next(iter(self))]
        self[key] = value
        return value
