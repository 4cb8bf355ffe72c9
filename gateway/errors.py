"""Edgeway's exceptions, in one tree. Clients never see these: they get JSON with a stable ``error`` code.

::

    Exception
     +-- PolicyError              a policy file is invalid: every problem with FILE:LINE:COL
     +-- StoreError               (middleware.store) a store call failed; the policy's failure mode decides
     |    +-- StoreTimeout        no answer within store.timeout
     +-- ValueError
          +-- StoreConfigurationError   (middleware.store) a store URL that cannot work

Upstream failures (:mod:`edgeway.gateway.upstream`: ``UpstreamError`` and its
``UpstreamTimeout``) are not exceptions past the proxy: :mod:`edgeway.gateway.proxy`
maps them at the boundary to 502 ``bad_gateway`` (no connection, a reset, a
malformed response) and 504 ``upstream_timeout`` (timeout), logged once.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeway.middleware.store import StoreConfigurationError, StoreError, StoreTimeout

__all__ = ["PolicyError", "Problem", "StoreConfigurationError", "StoreError", "StoreTimeout"]


@dataclass(frozen=True, order=True)
class Problem:
    """One problem in a policy file; line and column count from 1."""

    line: int
    col: int
    message: str


class PolicyError(Exception):
    """A policy file has problems; ``str()`` gives one ``FILE:LINE:COL: message`` line each."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}:{p.line}:{p.col}: {p.message}" for p in problems))
