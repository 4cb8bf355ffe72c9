"""One access-log line per request, and the gateway's log formats (``--log-format json|text``).

A line holds what ops need to follow a request through the policies: time,
route, method, path (never the query: its values may be secrets), upstream,
status, latency, upstream latency, what the rate limit, cache, breaker and
session did, the store mode and the request id. It never holds header values,
cookies, tokens, API keys or bodies; the user appears only as a short hash of
their id. Lines go to the ``edgeway.access`` logger (stdout under
``edgeway serve``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import sys
import time
from typing import Literal, TextIO

from edgeway.middleware.context import RequestContext
from edgeway.middleware.memo import Memo

LogFormat = Literal["json", "text"]

ACCESS_LOGGER = "edgeway.access"


def default_format() -> LogFormat:
    """Readable text on a terminal, JSON lines otherwise (log collectors)."""
    return "text" if sys.stdout.isatty() else "json"


@functools.lru_cache(maxsize=4096)  # a user's requests come in runs: hash each id once, not per line
def user_hash(user: str) -> str:
    """A stable, non-reversible tag for a user id: enough to follow one user through the log."""
    return hashlib.blake2b(user.encode(), digest_size=6).hexdigest()


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds, formatted once per millisecond (the seconds part once per
    second): at load, many lines share one."""

    __slots__ = ("_millis", "_prefix", "_second", "_text")

    def __init__(self) -> None:
        self._millis = self._second = -1
        self._prefix = self._text = ""

    def now(self) -> str:
        millis = int(time.time() * 1000)
        if millis != self._millis:
            self._millis = millis
            second, fraction = divmod(millis, 1000)
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._text = f"{self._prefix}.{fraction:03d}Z"
        return self._text


_PLAIN = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')  # what a JSON string must escape (and non-ASCII)


def _quoted(value: str) -> str:
    """``value`` as a JSON string, escaping only when it has to: most paths and ids need none."""
    if _PLAIN.search(value) is None:
        return f'"{value}"'
    return json.dumps(value)


_QUOTED_KEPT = 4096
_QUOTED: Memo[str, str] = Memo(_QUOTED_KEPT)  # routes, methods, paths, outcomes: the values lines repeat


def _json_str(value: str | None) -> str:
    """``value`` as a JSON string (or null), remembered: a line's fields but its request id recur."""
    if value is None:
        return "null"
    quoted = _QUOTED.get(value)
    if quoted is None:
        quoted = _QUOTED.keep(value, _quoted(value))
    return quoted


_HEADS: Memo[tuple[str, str, str, int], str] = Memo(_QUOTED_KEPT)  # route, method, path, status
_TAILS: Memo[tuple[str | None, ...], tuple[str, str]] = Memo(_QUOTED_KEPT)  # upstream, outcomes, user, store


def _tail(upstream: str | None, limit: str | None, cache: str | None, breaker: str | None, session: str | None,
          user: str | None, store: str) -> tuple[str, str]:
    """The fields from ``upstream`` to ``request_id``, as the text before and after ``upstream_ms``'s value."""
    return (f',"upstream":{_json_str(upstream)},"upstream_ms":',
            f',"limit":{_json_str(limit)},"cache":{_json_str(cache)},"breaker":{_json_str(breaker)},'
            f'"session":{_json_str(session)},"user":{_json_str(user_hash(user) if user else None)},'
            f'"store":{_json_str(store)},"request_id":')


def _ms(seconds: float | None) -> str:
    return "null" if seconds is None else f"{seconds * 1000:.3f}"


class AccessLog:
    """Writes one line per request to the ``edgeway.access`` logger, as JSON or text.

    A JSON line is built as text directly (no dict, no ``json.dumps`` unless a
    value needs escaping) and, when the logger's only output is the gateway's
    :class:`BatchedStreamHandler`, queued there without a ``LogRecord``: the
    line costs about 2 us instead of 15 (bench/RESULTS.md). Any other logging
    setup (an app's own handlers or filters) gets an ordinary ``logger.info``.
    """

    def __init__(self, fmt: LogFormat = "json", *, logger: logging.Logger | None = None) -> None:
        self.format = fmt
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._clock = _Clock()

    def record(self, ctx: RequestContext, status: int, seconds: float, store: str) -> None:
        """Log the finished request ``ctx`` answered with ``status`` after ``seconds``."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        line = self._json(ctx, status, seconds, store) if self.format == "json" else \
            self._text(ctx, status, seconds, store)
        handlers = logger.handlers
        if len(handlers) == 1 and not logger.filters and not logger.propagate and \
                type(handlers[0]) is BatchedStreamHandler and handlers[0].level <= logging.INFO:
            handlers[0].enqueue(line)
        else:
            logger.info(line)

    def _json(self, ctx: RequestContext, status: int, seconds: float, store: str) -> str:
        scope = ctx.scope
        outcomes = ctx.outcomes
        get = outcomes.get
        # a line is its time, two latencies and request id between two runs of fields that repeat from one
        # request to the next: each run is built once per distinct set of values and then looked up
        request = (ctx.route, scope["method"], scope["path"], status)
        head = _HEADS.get(request)
        if head is None:
            head = _HEADS.keep(request, f',"route":{_json_str(ctx.route or None)},'
                               f'"method":{_json_str(scope["method"])},"path":{_json_str(scope["path"])},'
                               f'"status":{status},"latency_ms":')
        done = (ctx.upstream, get("limit"), get("cache"), get("breaker"), get("session"), ctx.user, store)
        tail = _TAILS.get(done)
        if tail is None:
            tail = _TAILS.keep(done, _tail(*done))
        line = (f'{{"time":"{self._clock.now()}"{head}{_ms(seconds)}{tail[0]}{_ms(ctx.upstream_seconds)}{tail[1]}'
                f'{_quoted(ctx.request_id)}')
        if not _KNOWN_SET.issuperset(outcomes):  # outcomes of policies beyond the four above
            line += "".join(f",{json.dumps(name)}:{_json_str(value)}" for name, value in outcomes.items()
                            if name not in _KNOWN and name not in _FIELDS)
        return line + "}"

    def _text(self, ctx: RequestContext, status: int, seconds: float, store: str) -> str:
        scope = ctx.scope
        up = ctx.upstream_seconds
        outcomes = ctx.outcomes
        fields: dict[str, object] = {
            "route": ctx.route or None,
            "upstream": ctx.upstream,
            "upstream_ms": round(up * 1000, 3) if up is not None else None,
            **{name: outcomes.get(name) for name in _KNOWN},
            "user": user_hash(ctx.user) if ctx.user else None,
            "store": store,
            "request_id": ctx.request_id,
        }
        for name, value in outcomes.items():
            fields.setdefault(name, value)
        head = (f"{self._clock.now()} {status} {scope['method']} {json.dumps(scope['path'])} "
                f"{round(seconds * 1000, 3)}ms")
        rest = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{head} {rest}"


_KNOWN = ("limit", "cache", "breaker", "session")  # the four policies' outcomes, always in a line
_KNOWN_SET = frozenset(_KNOWN)
_FIELDS = frozenset({"time", "route", "method", "path", "status", "latency_ms", "upstream", "upstream_ms", "user",
                     "store", "request_id"})


class JsonFormatter(logging.Formatter):
    """The gateway's own log records as JSON lines (``--log-format json``), like the access log."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes queued lines together, at most ``FLUSH_EVERY`` seconds after the first.

    A plain ``StreamHandler`` writes and flushes every record: one system call per
    request on the access log, a third of the proxy's throughput at full load.
    Here records are formatted at once and queued; the queue is written and
    flushed ``FLUSH_EVERY`` seconds after its first line, or at once when it holds
    ``FLUSH_LINES`` lines (nginx's ``access_log ... buffer= flush=``, with a
    short delay), so lines keep their order and one write carries many. The
    queue is written on shutdown too (``logging.shutdown`` flushes every
    handler). Outside an event loop a record is written at once.
    """

    FLUSH_EVERY = 0.05
    FLUSH_LINES = 256

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._queued: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's own contract: a bad record is reported, never raised into the caller
            self.handleError(record)
            return
        self.enqueue(line)

    def enqueue(self, line: str) -> None:
        """Queue one formatted line (the access log calls this directly, without a ``LogRecord``)."""
        queued = self._queued
        queued.append(line)
        if self._scheduled:
            if len(queued) >= self.FLUSH_LINES:
                self.flush()
            return
        try:
            asyncio.get_running_loop().call_later(self.FLUSH_EVERY, self._flush_due)
            self._scheduled = True
        except RuntimeError:  # no running loop: write now
            self.flush()

    def _flush_due(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._queued:
            return
        lines, self._queued = self._queued, []
        self.acquire()
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stdout closed or gone: the log is lost, the request is not
            pass
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()


def configure_logging(fmt: LogFormat, *, access_log: bool, level: str = "info") -> None:
    """Set up the ``edgeway`` loggers for a gateway process: events on stderr, access lines on stdout.

    Idempotent (each worker process calls it); handlers installed earlier by this function are replaced.
    """
    events = logging.getLogger("edgeway")
    access = logging.getLogger(ACCESS_LOGGER)
    for logger in (events, access):
        for handler in list(logger.handlers):
            if getattr(handler, "_edgeway", False):
                logger.removeHandler(handler)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(formatter)
    err._edgeway = True  # type: ignore[attr-defined]
    events.addHandler(err)
    events.setLevel(level.upper())
    events.propagate = False
    out = BatchedStreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    out._edgeway = True  # type: ignore[attr-defined]
    access.addHandler(out)
    access.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    access.propagate = False
