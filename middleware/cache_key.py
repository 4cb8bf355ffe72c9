"""Cache keys: which parts of a request name a stored response, and how they are canonicalised.

Pure functions, no I/O. A key is a SHA-256 over the parts a route names in
``key:`` (``method``, ``path``, ``query``, ``body``, ``user``, ``header:NAME``),
each part length-prefixed so no two different requests can spell the same
digest input. Only the digest reaches the store: a key never holds a raw
token, cookie or body.

- ``query``: parameters parsed and sorted by name; a repeated parameter keeps
  the relative order of its values (``?a=1&a=2`` and ``?a=2&a=1`` are two
  entries, because an upstream may read them as a list); ``ignore_query``
  patterns (``utm_*``) drop parameters first.
- ``body``: a JSON body (``application/json`` or ``+json``) is canonicalised
  (sorted object keys, no insignificant whitespace, ``1.0`` == ``1``) after
  ``body_include`` / ``body_exclude`` paths; any other body, or JSON that does
  not parse, is hashed as its bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl

KEY_PARTS = ("method", "path", "query", "body", "user", "header:NAME")
_JSON_PATH = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def check_key_part(part: str) -> str:
    """A key part as the policy wrote it, normalised (``header:X-Team`` -> ``header:x-team``); ValueError if unknown."""
    kind, sep, name = part.partition(":")
    if not sep and part in KEY_PARTS:
        return part
    if sep and kind == "header" and name.strip():
        return f"header:{name.strip().lower()}"
    raise ValueError(f"unknown cache key part {part!r}: expected {', '.join(KEY_PARTS)}")


def check_json_path(path: str) -> str:
    """A dotted JSON path (``messages``, ``metadata.user_id``); ValueError otherwise."""
    if not _JSON_PATH.match(path):
        raise ValueError(f"bad JSON path {path!r}: expected names joined by dots, such as metadata.user_id")
    return path


def canonical_query(query_string: bytes, ignore: Sequence[str] = ()) -> bytes:
    """The query's parameters sorted by name (stable: repeated names keep their order), ignored ones dropped."""
    if not query_string:
        return b""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    if ignore:
        pairs = [(name, value) for name, value in pairs if not any(fnmatch.fnmatchcase(name, p) for p in ignore)]
    pairs.sort(key=lambda pair: pair[0])
    return "&".join(f"{len(name)}:{name}={value}" for name, value in pairs).encode("utf-8", "surrogateescape")


def is_json(content_type: str | None) -> bool:
    """Whether a media type is JSON (``application/json``, ``application/problem+json``, ...)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _number(value: float) -> int | float:
    # 1.0, 1e0 and 1 are one number to every JSON reader that matters
    if math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _pick(document: Any, paths: Sequence[str]) -> Any:
    """Only the values at ``paths`` (each kept at its place in the tree)."""
    if not isinstance(document, dict):
        return document
    kept: dict[str, Any] = {}
    for path in paths:
        source: Any = document
        names = path.split(".")
        for name in names:
            if not isinstance(source, dict) or name not in source:
                break
            source = source[name]
        else:
            target = kept
            for name in names[:-1]:
                target = target.setdefault(name, {})
            target[names[-1]] = source
    return kept


def _drop(document: Any, paths: Sequence[str]) -> Any:
    if not isinstance(document, dict):
        return document
    for path in paths:
        names = path.split(".")
        parent: Any = document
        for name in names[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(names[-1], None)
    return document


def canonical_json(body: bytes, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bytes | None:
    """The JSON document's canonical bytes, after include/exclude paths; None when it is not JSON."""
    try:
        document = json.loads(body, parse_float=lambda text: _number(float(text)))
    except (ValueError, RecursionError):
        return None
    if include:
        document = _pick(document, include)
    if exclude:
        document = _drop(document, exclude)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )


def body_part(body: bytes, content_type: str | None, include: Sequence[str] = (),
              exclude: Sequence[str] = ()) -> bytes:
    """What the ``body`` key part hashes: canonical JSON for a JSON body, else the bytes themselves."""
    if is_json(content_type):
        canonical = canonical_json(body, include, exclude)
        if canonical is not None:
            return b"j" + canonical
    return b"b" + body


def digest(parts: Iterable[bytes]) -> str:
    """SHA-256 over length-prefixed parts, in hex."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "big"))
        hasher.update(part)
    return hasher.hexdigest()


def vary_digest(names: Sequence[str], headers: dict[str, list[str]]) -> str:
    """The secondary key of a response that varies on ``names``: the request's values of those headers."""
    return digest(
        f"{name}:{','.join(headers.get(name, ()))}".encode("utf-8", "surrogateescape") for name in names
    )


def vary_names(values: Iterable[bytes]) -> tuple[str, ...] | None:
    """Header names of the response's ``Vary`` fields, sorted; None for ``Vary: *`` (never stored)."""
    names: set[str] = set()
    for value in values:
        for item in value.decode("latin-1").split(","):
            name = item.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))
