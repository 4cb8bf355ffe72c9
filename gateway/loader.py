"""Load a policy file: safe YAML, ``${VAR}`` interpolation, validation, positions.

Every problem is collected (not just the first) and reported as
``FILE:LINE:COL: message``. The YAML is *composed* with PyYAML's SafeLoader
into nodes, which keep their positions, and built into plain values here with
YAML 1.2 core-schema scalars (only ``true``/``false`` are booleans), so no YAML
tag can construct an object. Anchors, aliases, tags, files over 1 MB and
nesting deeper than 32 levels are refused (a policy never needs them, and each
is a way to make loading slow or huge).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from edgeway.middleware.units import POLICY_FILE

from .checks import policy_checks
from .config import Policy
from .errors import PolicyError, Problem

Loc = tuple[str | int, ...]
Mode = Literal["auto", "gateway", "in-app"]

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class _Built:
    """Plain data plus where each value and each mapping key stands in the file."""

    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    poisoned: set[Loc] = field(default_factory=set)  # values whose interpolation failed


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def interpolate(text: str, environ: Mapping[str, str]) -> tuple[str, list[tuple[int, str]]]:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (``$$`` is a literal ``$``); returns (text, [(offset, unset var)])."""
    unset: list[tuple[int, str]] = []

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                unset.append((match.start(), name))
                return ""
            return default
        return value

    return _VAR.sub(replace, text), unset


MAX_BYTES = 1_000_000  # a policy is a few KB; the cap keeps `check` and reloads fast and small
MAX_DEPTH = 32  # deepest real policy nesting is about 7 (routes, route, cache, key, ...)

_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOAT = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}


class _Refused(yaml.MarkedYAMLError):
    """A YAML feature a policy may not use (anchors, aliases, tags, deep nesting)."""


class _PolicyComposer(yaml.SafeLoader):
    """SafeLoader's scanner and parser, composing nodes only: no aliases, anchors or tags, bounded depth.

    PyYAML's scanner and parser are iterative; only composing (and building) recurse, so bounding the
    depth here turns ``[[[[...`` into one positioned problem instead of a RecursionError, and refusing
    aliases makes an alias bomb impossible rather than merely expensive.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(None, None, "aliases (*name) are not allowed in a policy: write the value out", mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(None, None, "anchors (&name) are not allowed in a policy: write the value out", mark)
        if getattr(event, "tag", None) not in (None, "!"):
            tag = str(event.tag).replace("tag:yaml.org,2002:", "!!")
            raise _Refused(None, None, f"YAML tags ({tag}) are not allowed: policies are plain YAML", mark)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(None, None, f"nesting deeper than {MAX_DEPTH} levels is not allowed in a policy", mark)
        try:
            node: yaml.Node | None = super().compose_node(parent, index)
            return node
        finally:
            self.depth -= 1


def scalar(node: yaml.ScalarNode) -> Any:
    """A scalar's value under the YAML 1.2 core schema: only ``true``/``false`` are booleans, so ``on``,
    ``off``, ``yes`` and ``no`` stay the words written (PyYAML alone would apply YAML 1.1)."""
    text: str = node.value
    if node.style is not None:  # quoted or block scalars are always strings
        return text
    if text in _NULL:
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT.fullmatch(text):
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    special = _SPECIAL_FLOAT.get(text.lower())
    return text if special is None else special


class _Builder:
    def __init__(self, environ: Mapping[str, str], built: _Built) -> None:
        self.environ = environ
        self.built = built

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.built.values[loc] = _position(node)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str | int | bool | float) or key is None:
                    self.built.problems.append(Problem(*_position(key_node), f"unsupported key {key!r}"))
                    continue
                key = (str(key).lower() if isinstance(key, bool) else str(key)) if not isinstance(key, str) else key
                if key in result:
                    self.built.problems.append(Problem(*_position(key_node), f"duplicate key '{key}'"))
                self.built.keys[(*loc, key)] = _position(key_node)
                result[key] = self.build(value_node, (*loc, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        value = scalar(node)
        if isinstance(value, str) and "$" in value:
            value, unset = interpolate(value, self.environ)
            line, col = _position(node)
            quoted = 1 if node.style in ("'", '"') else 0
            for offset, name in unset:
                self.built.problems.append(
                    Problem(line, col + quoted + offset,
                            f"environment variable {name} is not set and has no default "
                            f"(write ${{{name}:-default}} to give one)")
                )
                self.built.poisoned.add(loc)
        return value


def parse_yaml(text: str, environ: Mapping[str, str] | None = None) -> tuple[Any, _Built]:
    """Compose ``text`` (YAML 1.2 core scalars, no aliases/anchors/tags, bounded size and depth) and build
    plain data with positions; problems are collected, not raised."""
    built = _Built()
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        built.problems.append(Problem(1, 1, f"the policy file is {size} bytes; the limit is {MAX_BYTES} (1 MB)"))
        return None, built
    loader = _PolicyComposer(text)
    try:
        node = loader.get_single_node()
        if node is None:
            built.problems.append(Problem(1, 1, "the policy file is empty"))
            return None, built
        return _Builder(os.environ if environ is None else environ, built).build(node, ()), built
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        if isinstance(exc, _Refused):
            message = str(exc.problem)
        else:
            what = exc.problem or exc.context or "not valid YAML"
            where = f" {exc.context}" if exc.context and exc.problem else ""
            hint = "; check the indentation" if "block" in f"{what}{where}" else ""
            message = f"invalid YAML: {what}{where}{hint}"
        built.problems.append(Problem(line, col, message))
        return None, built
    except yaml.YAMLError as exc:  # reader errors (control characters) carry no mark
        built.problems.append(Problem(1, 1, f"invalid YAML: {exc}"))
        return None, built
    finally:
        loader.dispose()


def _fields_at(loc: Loc) -> list[str]:
    """Field names of the model at ``loc`` (for did-you-mean); empty when unknown."""
    annotation: Any = Policy
    for part in loc:
        model = _model_of(annotation)
        if model is None:
            annotation = _item_type(annotation)
            if annotation is None:
                return []
            continue
        if isinstance(part, int) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
    model = _model_of(annotation)
    return list(model.model_fields) if model else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if (model := _model_of(arg)) is not None:
                return model
    return None


def _item_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (tuple, list) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    if isinstance(annotation, UnionType) or origin is typing.Union:
        for arg in args:
            if arg is not type(None):
                return _item_type(arg) or arg
    return None


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    # pydantic inserts validator/union tags such as "function-after[...]" that are not in the file
    return tuple(p for p in loc if isinstance(p, int) or not (("[" in p and "]" in p) or p.startswith("function")))


def _message(error: Any, loc: Loc) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        listing = f"; expected one of: {', '.join(known)}" if known else ""
        hint = f" (did you mean '{close[0]}'?)" if close else listing
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    where = ".".join(str(p) for p in loc)
    return f"{where}: {message}" if where else message


def _locate(built: _Built, loc: Loc, key: bool) -> tuple[int, int]:
    if key and loc in built.keys:
        return built.keys[loc]
    probe = loc
    while probe:
        if probe in built.values:
            return built.values[probe]
        probe = probe[:-1]
    return built.values.get((), (1, 1))


def validate(data: Any, built: _Built, mode: Mode = "gateway") -> Policy | None:
    """Validate into a :class:`Policy`, appending positioned problems; None when invalid."""
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data, context={POLICY_FILE: True})
    except ValidationError as exc:
        for error in exc.errors():
            loc = _clean_loc(error["loc"])
            if any(loc[: len(p)] == p for p in built.poisoned):
                continue  # already reported as an unset variable
            line, col = _locate(built, loc, key=error["type"] == "extra_forbidden")
            built.problems.append(Problem(line, col, _message(error, loc)))
    if isinstance(data, dict):
        _cross_checks(data, built, mode)
    return policy if not built.problems else None


def policy_mode(data: Any, mode: Mode = "auto") -> Literal["gateway", "in-app"]:
    """``auto``: a policy that names no upstream anywhere is an in-app policy, otherwise a gateway one."""
    if mode != "auto":
        return mode
    if not isinstance(data, dict):
        return "gateway"
    routes: list[Any] = data["routes"] if isinstance(data.get("routes"), list) else []
    names_upstream = bool(data.get("upstreams")) or any(isinstance(r, dict) and "upstream" in r for r in routes)
    return "gateway" if names_upstream else "in-app"


def _cross_checks(data: dict[str, Any], built: _Built, mode: Mode) -> None:
    upstreams: dict[str, Any] = data["upstreams"] if isinstance(data.get("upstreams"), dict) else {}
    routes: list[Any] = data["routes"] if isinstance(data.get("routes"), list) else []
    seen: dict[tuple[str, tuple[str, ...]], int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        if mode == "gateway" and "upstream" not in route:
            line, col = _locate(built, ("routes", i), key=False)
            built.problems.append(Problem(line, col, "this route has no upstream: the gateway proxies every route "
                                                     "to one (only in-app policies may leave it out)"))
        name = route.get("upstream")
        if isinstance(name, str) and name not in upstreams:
            close = difflib.get_close_matches(name, list(upstreams), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else (
                f"; defined: {', '.join(upstreams)}" if upstreams else "; no upstreams are defined")
            line, col = _locate(built, ("routes", i, "upstream"), key=False)
            built.problems.append(Problem(line, col, f"unknown upstream '{name}'{hint}"))
        session = route.get("session", "off")
        if session in ("required", "optional") and not isinstance(data.get("sessions"), dict):
            line, col = _locate(built, ("routes", i, "session"), key=False)
            built.problems.append(Problem(line, col, f"session: {session} needs a sessions: block (provider, url) "
                                                     "saying how tokens are verified"))
        if route.get("privileged") is True and session not in ("required", "optional"):
            line, col = _locate(built, ("routes", i, "privileged"), key=False)
            built.problems.append(Problem(line, col, "privileged: true applies to routes with session: required or "
                                                     "optional"))
        match = route.get("match")
        _check_cache_methods(route, i, match, built)
        if isinstance(match, dict) and isinstance(match.get("path"), str):
            methods = match.get("methods")
            methods = [methods] if isinstance(methods, str) else methods
            signature = (match["path"], tuple(sorted(str(m).upper() for m in methods)) if isinstance(methods, list)
                         else ("*",))
            if signature in seen:
                line, col = _locate(built, ("routes", i, "match"), key=False)
                built.problems.append(
                    Problem(line, col, f"duplicate route: routes[{seen[signature]}] already matches "
                                       f"{match['path']} for the same methods, so this one can never match")
                )
            else:
                seen[signature] = i


def _check_cache_methods(route: dict[str, Any], index: int, match: object, built: _Built) -> None:
    """A body-keyed cache is for POST answers: a route that admits no POST would store nothing by its body."""
    cache = route.get("cache")
    if not isinstance(cache, dict) or not isinstance(cache.get("key"), list) or "body" not in cache["key"]:
        return
    methods = match.get("methods") if isinstance(match, dict) else None
    if isinstance(methods, list) and "POST" not in {str(m).upper() for m in methods}:
        line, col = _locate(built, ("routes", index, "cache", "key"), key=False)
        built.problems.append(Problem(line, col, f"routes.{index}.cache.key: `body` keys POST answers, but this "
                                                 "route's match.methods excludes POST"))


@dataclass(frozen=True)
class LoadedPolicy:
    """A valid policy with where it came from and a short version hash (for readyz and logs).

    ``mode`` is how it was validated (``gateway``: every route names an upstream; ``in-app``:
    mounted with ``EdgewayMiddleware``, upstreams unused); ``warnings`` are things that work
    but probably not as meant (``edgeway check`` prints them).
    """

    policy: Policy
    source: str
    version: str
    mode: Literal["gateway", "in-app"] = "gateway"
    warnings: tuple[Problem, ...] = ()


def load_text(text: str, source: str = "<policy>", environ: Mapping[str, str] | None = None, *,
              mode: Mode = "auto") -> LoadedPolicy:
    """Parse and validate policy text; raises :class:`PolicyError` listing every problem.

    ``mode``: ``gateway`` (``edgeway serve``), ``in-app`` (``EdgewayMiddleware``), or ``auto``
    (``edgeway check``): in-app when the policy names no upstream at all.
    """
    env = os.environ if environ is None else environ
    data, built = parse_yaml(text, env)
    resolved = policy_mode(data, mode)
    policy = validate(data, built, resolved) if isinstance(data, dict) else None
    warnings: list[Problem] = []
    if policy is not None and isinstance(data, dict):
        warnings = policy_checks(policy, data, functools.partial(_locate, built), built.problems, env, resolved)
    if policy is None or built.problems:
        if not isinstance(data, dict) and not built.problems:
            line, col = built.values.get((), (1, 1))
            what = "only null (~)" if data is None else f"a {type(data).__name__}"
            built.problems.append(Problem(line, col, f"the policy holds {what}: it must be a mapping with "
                                                     "version and routes"))
        raise PolicyError(source, sorted(built.problems))
    return LoadedPolicy(policy, source, hashlib.sha256(text.encode()).hexdigest()[:12], resolved,
                        tuple(sorted(warnings)))


def load_policy(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *,
                mode: Mode = "auto") -> LoadedPolicy:
    """Read and validate a policy file; raises :class:`PolicyError` (also for an unreadable file)."""
    try:
        with Path(path).open("rb") as file:  # read one byte past the cap, never a whole huge file
            raw = file.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise PolicyError(str(path), [Problem(1, 1, f"the policy file is over {MAX_BYTES} bytes (1 MB), "
                                                        "the limit for a policy")])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [Problem(1, 1, f"cannot read the policy file: {exc}")]) from None
    return load_text(text, str(path), environ, mode=mode)
