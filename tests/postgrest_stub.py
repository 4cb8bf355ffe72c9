"""A minimal PostgREST-compatible RPC server, so SupabaseStore is tested over real HTTP.

``create_postgrest_app(dsn, service_key)`` serves ``POST /rest/v1/rpc/{fn}`` the
way Supabase does (its API gateway, then PostgREST):

- ``apikey`` and ``Authorization: Bearer`` must carry the service key, else 401
  ``{"message": "Invalid API key"}`` (what Supabase's gateway answers);
- the JSON body's keys are the function's named arguments; a function of schema
  ``public`` that does not exist, or does not take those names, is 404
  ``{"code": "PGRST202", ...}``;
- the call runs in a transaction as ``service_role`` (``SET LOCAL ROLE``, as
  PostgREST switches to the JWT's role), so the migration's grants are what is
  tested; the function's JSON result is the response body (200);
- database errors answer like PostgREST: 403 for insufficient privilege, 400
  for raised exceptions and bad input, 500 otherwise, with
  ``{"code", "message", "details", "hint"}``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["create_postgrest_app"]

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_ARGS = """
    select p.proname, coalesce(p.proargnames, '{}') as names,
           array(select format_type(t, null) from unnest(p.proargtypes) as t) as types
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'public' and p.proname = $1
"""


def _error(status: int, code: str, message: str, details: str | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "details": details, "hint": None, "message": message}, status)


def _status_for(sqlstate: str) -> int:
    if sqlstate == "42501":
        return 403
    if sqlstate == "42883":
        return 404
    if sqlstate.startswith(("22", "23", "P0")):
        return 400
    return 500


async def _rpc(request: Request) -> Response:
    app = request.app
    key = app.state.service_key
    if request.headers.get("apikey") != key:
        return JSONResponse({"message": "Invalid API key"}, 401)
    if request.headers.get("authorization") != f"Bearer {key}":
        return _error(401, "PGRST301", "JWSError JWSInvalidSignature")
    fn = request.path_params["fn"]
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return _error(400, "PGRST102", "Empty or invalid json")
    if not isinstance(body, dict):
        return _error(400, "PGRST102", "Expected a JSON object of named arguments")
    pool: asyncpg.Pool = app.state.pool
    async with pool.acquire() as connection:
        found = await connection.fetchrow(_ARGS, fn) if _NAME.match(fn) else None
        names: list[str] = list(found["names"]) if found else []
        if found is None or not set(body) <= set(names):
            signature = ", ".join(sorted(body))
            return _error(404, "PGRST202", f"Could not find the function public.{fn}({signature}) in the schema cache")
        types = dict(zip(names, found["types"], strict=False))
        args = [
            f"{name} => (b -> '{name}')::{types[name]}" if types[name] in ("json", "jsonb")
            else f"{name} => (b ->> '{name}')::{types[name]}"
            for name in names if name in body
        ]
        sql = f"select to_jsonb(public.{fn}({', '.join(args)}))::text from (select $1::jsonb as b) as s"
        try:
            async with connection.transaction():
                await connection.execute("set local role service_role")
                result = await connection.fetchval(sql, json.dumps(body))
        except asyncpg.PostgresError as exc:
            sqlstate = exc.sqlstate or "XX000"
            return _error(_status_for(sqlstate), sqlstate, str(exc), getattr(exc, "detail", None))
    return Response(result if result is not None else "null", 200, media_type="application/json")


def create_postgrest_app(dsn: str, service_key: str) -> Starlette:
    """The stub as an ASGI app; its asyncpg pool lives as long as the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(dsn, min_size=1, max_size=20)
        try:
            yield
        finally:
            await app.state.pool.close()

    app = Starlette(routes=[Route("/rest/v1/rpc/{fn}", _rpc, methods=["POST"])], lifespan=lifespan)
    app.state.service_key = service_key
    return app
