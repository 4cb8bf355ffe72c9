"""Who the user is, for limits keyed by ``user``.

Looked up once per request, first found wins:

1. ``RequestContext.user`` already set (the session policy sets it from a verified token);
2. the app's own authentication: ``scope["user"]`` when authenticated, as Starlette's
   ``AuthenticationMiddleware`` leaves it. Edgeway must then run *inside* that middleware:
   with ``app.add_middleware`` the middleware added last runs first, so add Edgeway first;
3. ``user_from``: a header an auth layer in front sets (``header:X-User-Id``), believed only
   when the request comes from one of the trusted proxies, or, in Python, a function of the
   ASGI scope returning the user id (or None).
"""

from __future__ import annotations

from collections.abc import Callable

from .context import RequestContext, Scope

UserSource = Callable[[RequestContext], "str | None"]
"""A compiled ``user_from``: the user id of a request, or None."""

UserFrom = str | Callable[[Scope], "str | None"]
"""What users write: ``"header:X-User-Id"`` or a function of the ASGI scope."""

_IDENTITY_ATTRIBUTES = ("identity", "id", "username", "display_name")


def scope_user(scope: Scope) -> str | None:
    """The authenticated user's id from ``scope["user"]`` (Starlette's ``BaseUser`` and look-alikes)."""
    user = scope.get("user")
    if user is None or isinstance(user, str):
        return user or None
    try:
        if not user.is_authenticated:
            return None
    except (AttributeError, NotImplementedError):
        return None
    for attribute in _IDENTITY_ATTRIBUTES:
        try:
            value = getattr(user, attribute, None)
        except NotImplementedError:  # BaseUser's properties raise it when a subclass leaves them out
            continue
        if value is not None and value != "":
            return str(value)
    return None


def user_source(spec: UserFrom | None) -> UserSource | None:
    """Compile ``user_from``; a header is believed only from trusted proxies (a client could send it too)."""
    if spec is None:
        return None
    if callable(spec):
        function = spec

        def from_function(ctx: RequestContext) -> str | None:
            value = function(ctx.scope)
            return None if value is None or value == "" else str(value)

        return from_function
    kind, sep, name = spec.partition(":")
    if kind != "header" or not sep or not name.strip():
        raise ValueError(f"bad user_from {spec!r}: expected header:NAME or a function of the ASGI scope")
    header = name.strip().lower()

    def from_header(ctx: RequestContext) -> str | None:
        if ctx.peer not in ctx.trusted:
            return None
        return ctx.header(header) or None

    return from_header


def find_user(ctx: RequestContext, source: UserSource | None) -> str | None:
    """The request's user by the order in the module docstring; remembered in ``ctx.user``."""
    if ctx.user is None:
        user = scope_user(ctx.scope)
        if user is None and source is not None:
            user = source(ctx)
        ctx.user = user
    return ctx.user
