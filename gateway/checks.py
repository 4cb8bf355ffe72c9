"""Checks that need the whole validated policy: store settings that cannot work, duplicate
route ids, and warnings for settings that work but probably not as meant.

Problems make ``edgeway check`` fail like any other (FILE:LINE:COL); warnings are printed
and the policy still loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

from edgeway.middleware.store import StoreConfigurationError
from edgeway.middleware.store.postgres import POSTGRES_EXTRA

from .config import Policy, Route
from .errors import Problem

Locate = Callable[[tuple[str | int, ...], bool], tuple[int, int]]
"""Where a value (False) or a mapping key (True) stands in the file."""



def installed(module: str) -> bool:
    """Whether an optional dependency can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def store_problems(policy: Policy, data: Mapping[str, Any], locate: Locate,
                   environ: Mapping[str, str]) -> list[Problem]:
    """A store URL, option or fallback that would fail at startup, reported before any traffic."""
    problems = []
    store = policy.store
    if store.enabled and not store.url.lower().startswith("memory://"):
        try:
            _check_url(store.url, environ)
        except StoreConfigurationError as exc:
            problems.append(Problem(*locate(("store", "url"), False), str(exc)))
    for i, entry in enumerate(store.fallback or ()):
        if entry.postgres is not None and not installed("asyncpg"):
            problems.append(Problem(*locate(("store", "fallback", i, "postgres"), False),
                                    f"the postgres fallback needs asyncpg, which is not installed: {POSTGRES_EXTRA}"))
    return problems


def _check_url(url: str, environ: Mapping[str, str]) -> None:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        from edgeway.middleware.store.redis import RedisAddress

        RedisAddress.parse(url)
    elif scheme.startswith("upstash"):
        from edgeway.middleware.store.upstash import upstash_location

        upstash_location(None if scheme == "upstash" else url, environ)


def route_problems(policy: Policy, locate: Locate) -> list[Problem]:
    """Two routes with one id would share counters."""
    problems = []
    seen: dict[str, int] = {}
    for i, route in enumerate(policy.routes):
        ident = route.route_id
        if ident in seen and _same_match(policy.routes[seen[ident]], route):
            continue  # already reported as a duplicate route
        if ident in seen:
            where = ("routes", i, "id") if route.id is not None else ("routes", i, "match")
            problems.append(Problem(*locate(where, False), f"duplicate route id '{ident}': routes[{seen[ident]}] "
                                                          "has it too (give one of them its own id:)"))
        else:
            seen[ident] = i
    return problems


def _same_match(first: Route, second: Route) -> bool:
    return first.id is None and second.id is None and first.match.path == second.match.path and (
        sorted(first.match.methods or ()) == sorted(second.match.methods or ()))


def warnings(policy: Policy, data: Mapping[str, Any], locate: Locate,
             mode: Literal["gateway", "in-app"]) -> list[Problem]:
    """Settings that load but probably do not do what was meant."""
    found = []
    if "name" not in data and not policy.store.url.lower().startswith("memory://"):
        found.append(Problem(*locate(("store", "url"), False),
                             "warning: no name: set; every app sharing this store without one shares its counters "
                             "and instance count (give each app its own name:)"))
    if policy.user_from is not None and not policy.trusted_proxies:
        found.append(Problem(*locate(("user_from",), False),
                             "warning: user_from is believed only from trusted_proxies, and none are listed, so it "
                             "never supplies a user"))
    if mode == "in-app" and "server" in data:
        found.append(Problem(*locate(("server",), True),
                             "warning: server: configures the connections `edgeway serve` accepts; inside an app "
                             "your own server (uvicorn, ...) does that, so these settings do nothing here"))
    if mode == "gateway" and policy.user_from is None:
        for i, route in enumerate(policy.routes):
            if route.session != "off":
                continue
            for j, limit in enumerate(route.limits):
                if "user" in limit.key:
                    found.append(Problem(
                        *locate(("routes", i, "limits", j, "key"), False),
                        f"warning: this limit is keyed by user, but nothing on this route supplies one (no "
                        f"session:, no user_from:), so on_missing ({limit.on_missing}) decides every request",
                    ))
    return found


def policy_checks(policy: Policy, data: Mapping[str, Any], locate: Locate, problems: list[Problem],
                  environ: Mapping[str, str], mode: Literal["gateway", "in-app"]) -> list[Problem]:
    """Append the problems to ``problems``; return the warnings."""
    problems.extend(store_problems(policy, data, locate, environ))
    problems.extend(route_problems(policy, locate))
    return warnings(policy, data, locate, mode)
