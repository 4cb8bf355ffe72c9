"""``edgeway diff OLD NEW``: what applying a policy change would do, before it is applied (decK-style).

Routes are matched between the two files by what they match (path and
methods), upstreams by name, limits by their policy name (``minute``, or
``name:``; the name their store keys carry); everything else by
its place in the file. Every field of the typed policy is compared, so keys
added to the schema later (cache, breaker, session options) show up without
changes here. Secrets (tokens, keys, passwords, credentials in URLs) are never
printed: a change to one shows as ``(changed)``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from edgeway.middleware.ratelimit import _limit_ids as limit_ids

from .config import Policy, Route

_SECRET_FIELDS = frozenset({"token", "jwt_secret", "anon_key", "dsn", "password", "service_role_key", "secret"})
_SECRET_PARENTS = frozenset({"supabase"})  # {supabase: {url, key}}: its key is the service role key


def route_id(route: Route) -> str:
    """How a route is known across two files: its ``id``, else its path and methods (what its store keys and
    metrics carry, so the same id means the same counters)."""
    return route.route_id


def show(value: object) -> str:
    """A value as ops read it: whole floats as integers, credentials in URLs masked."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if value is None:
        return "none"
    if isinstance(value, str) and "://" in value and "@" in urlsplit(value).netloc:
        parts = urlsplit(value)
        return value.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
    return str(value)


def _flat(value: object, prefix: str, out: dict[str, object]) -> dict[str, object]:
    """Dotted paths to leaf values; lists of scalars are leaves, lists of objects are indexed."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        for index, item in enumerate(value):
            _flat(item, f"{prefix}[{index}]", out)
    else:
        out[prefix] = value
    return out


def _secret(path: str) -> bool:
    parts = path.replace("[", ".").split(".")
    last = parts[-1]
    return last in _SECRET_FIELDS or (last == "key" and len(parts) > 1 and parts[-2] in _SECRET_PARENTS)


def _changes(old: dict[str, object], new: dict[str, object], indent: str) -> list[str]:
    lines = []
    for path in sorted(old.keys() | new.keys()):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        if _secret(path):
            lines.append(f"{indent}{path}: (changed)")
        elif path not in old:
            lines.append(f"{indent}{path}: + {show(after)}")
        elif path not in new:
            lines.append(f"{indent}{path}: - {show(before)}")
        else:
            lines.append(f"{indent}{path}: {show(before)} -> {show(after)}")
    return lines


def _route_changes(old: Route, new: Route) -> list[str]:
    """Field changes of a route kept across the files; limits are matched by their policy name (the name the
    RateLimit headers and the store keys use: same name, same counters)."""
    was, now = old.model_dump(mode="json"), new.model_dump(mode="json")
    old_limits = dict(zip(limit_ids(old.limits), was.pop("limits"), strict=True)) if old.limits else {}
    new_limits = dict(zip(limit_ids(new.limits), now.pop("limits"), strict=True)) if new.limits else {}
    now.pop("limits", None)
    was.pop("limits", None)
    lines = _changes(_flat(was, "", {}), _flat(now, "", {}), "    ")
    for ident in old_limits.keys() - new_limits.keys():
        lines.append(f"    - limit {ident}: {old_limits[ident]['rate']} by {'+'.join(old_limits[ident]['key'])}")
    for ident in new_limits.keys() - old_limits.keys():
        lines.append(f"    + limit {ident}: {new_limits[ident]['rate']} by {'+'.join(new_limits[ident]['key'])}")
    for ident in sorted(old_limits.keys() & new_limits.keys()):
        prefix = f"limit {ident}"
        lines += _changes(_flat(old_limits[ident], prefix, {}), _flat(new_limits[ident], prefix, {}), "    ")
    return lines


def _summary(route: Route) -> str:
    parts = [f"upstream {route.upstream}"]
    parts += [f"limit {limit.rate} by {'+'.join(limit.key)}" for limit in route.limits]
    if route.cache is not None:
        parts.append(f"cache ttl {show(route.cache.ttl)}s")
    if route.session != "off":
        parts.append(f"session {route.session}")
    return ", ".join(parts)


def diff(old: Policy, new: Policy) -> list[str]:
    """Lines describing every difference (``+`` added, ``-`` removed, ``~`` changed); empty when the same."""
    lines: list[str] = []
    skip = {"upstreams", "routes"}
    settings = _changes(_flat(old.model_dump(mode="json", exclude=skip), "", {}),
                        _flat(new.model_dump(mode="json", exclude=skip), "", {}), "    ")
    if settings:
        lines += ["~ settings", *settings]

    for name in sorted(old.upstreams.keys() | new.upstreams.keys()):
        was, now = old.upstreams.get(name), new.upstreams.get(name)
        if was is None and now is not None:
            lines.append(f"+ upstream {name} ({show(now.url)}" + (", breaker)" if now.breaker else ")"))
        elif now is None and was is not None:
            lines.append(f"- upstream {name}")
        elif was is not None and now is not None and was != now:
            lines += [f"~ upstream {name}", *_changes(_flat(was.model_dump(mode="json"), "", {}),
                                                      _flat(now.model_dump(mode="json"), "", {}), "    ")]

    old_routes = {route_id(route): (index, route) for index, route in enumerate(old.routes)}
    new_routes = {route_id(route): (index, route) for index, route in enumerate(new.routes)}
    for ident, (index, _) in old_routes.items():
        if ident not in new_routes:
            lines.append(f"- route {ident} (was routes[{index}])")
    kept_old = [ident for ident in old_routes if ident in new_routes]
    kept_new = [ident for ident in new_routes if ident in old_routes]
    for ident, (index, route) in new_routes.items():
        if ident not in old_routes:
            lines.append(f"+ route {ident} at routes[{index}]: {_summary(route)}")
            continue
        before_index, before = old_routes[ident]
        changed = _route_changes(before, route)
        moved = kept_old.index(ident) != kept_new.index(ident)
        if changed or moved:
            lines.append(f"~ route {ident}" + (f" (moved: routes[{before_index}] -> routes[{index}]; first match "
                                               "wins)" if moved else ""))
            lines += changed
    return lines
