"""The ``edgeway`` command: serve, check, diff, explain, demo, upstash-bridge, --version."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from . import __version__
from .accesslog import default_format
from .errors import PolicyError
from .loader import load_policy

logger = logging.getLogger("edgeway")


def _check(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.file, mode="in-app" if args.in_app else "auto")
    except PolicyError as exc:
        print(exc, file=sys.stdout)
        return 1
    for warning in loaded.warnings:
        print(f"{args.file}:{warning.line}:{warning.col}: {warning.message}")
    policy = loaded.policy
    limits = sum(len(route.limits) for route in policy.routes)
    kind = f"{len(policy.upstreams)} upstream(s)" if loaded.mode == "gateway" else "in-app policy"
    print(
        f"{args.file}: ok (version {loaded.version}): {kind}, "
        f"{len(policy.routes)} route(s), {limits} limit(s), store {policy.store.url.split('://')[0]}://"
    )
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .diff import diff

    try:
        old, new = load_policy(args.old), load_policy(args.new)
    except PolicyError as exc:
        print(exc, file=sys.stdout)
        return 2
    lines = diff(old.policy, new.policy)
    if not lines:
        print(f"no changes: {args.old} and {args.new} describe the same policy")
        return 0
    print(f"changes from {args.old} (version {old.version}) to {args.new} (version {new.version}):")
    print("\n".join(lines))
    return 1


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain

    try:
        loaded = load_policy(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stdout)
        return 2
    matched, lines = explain(loaded.policy, args.method, args.path, args.header, args.client_ip)
    print("\n".join(lines))
    return 0 if matched else 1


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from .startup import probe_stores, startup_block

    path = args.policy or os.environ.get("EDGEWAY_POLICY")
    if not path:
        print("edgeway serve: no policy: pass --policy FILE or set EDGEWAY_POLICY", file=sys.stderr)
        return 2
    try:
        loaded = load_policy(path, mode="gateway")  # fail fast, with every problem, before any worker starts
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    stores = asyncio.run(probe_stores(loaded))
    logger.info("starting\n%s", startup_block(loaded, stores, host=args.host, port=args.port, workers=args.workers))
    primary = next((reach for reach in stores if reach.role == "primary"), None)
    if args.require_store and primary is not None and not primary.reachable:
        print(f"edgeway serve: --require-store: the primary store {primary.location} cannot be reached "
              f"({primary.error}); not starting", file=sys.stderr)
        return 1
    os.environ["EDGEWAY_POLICY"] = path
    # read by each worker's app factory (edgeway.gateway.asgi), which configures its own logging
    os.environ["EDGEWAY_LOG_FORMAT"] = args.log_format or default_format()
    os.environ["EDGEWAY_ACCESS_LOG"] = args.access_log
    os.environ["EDGEWAY_LOG_LEVEL"] = args.log_level
    metrics_dir = None
    if args.workers > 1:
        # every worker writes its metric values here and a scrape of any worker sums them; a private
        # directory per run, so values of an earlier run (or another gateway) are never counted
        metrics_dir = tempfile.mkdtemp(prefix="edgeway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run_uvicorn(uvicorn, args)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return 0


def _run_uvicorn(uvicorn: Any, args: argparse.Namespace) -> None:
    from .server import uvicorn_options
    from .workers import run

    os.environ["EDGEWAY_WATCH"] = "1" if args.watch else ""
    run(
        args.workers,
        host=args.host,
        port=args.port,
        access_log=False,  # Edgeway writes its own access log (--access-log), with the policies' outcomes
        log_level=args.log_level,
        **uvicorn_options(args.http),
    )


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(requests=args.requests)


def _bridge(args: argparse.Namespace) -> int:
    try:
        from .upstash_bridge import main as bridge_main
    except ImportError as exc:  # redis-py is an extra: only this development bridge needs it
        print(f"edgeway upstash-bridge needs redis-py ({exc}): pip install 'edgeway[bridge]'", file=sys.stderr)
        return 1

    return bridge_main(["--redis", args.redis, "--token", args.token, "--host", args.host, "--port", str(args.port)])


class _ShowDefaults(argparse.HelpFormatter):
    """Help that shows each option's default, except where there is none to show (flags, unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeway", description="Edge policies for Python APIs.")
    parser.add_argument("--version", action="version", version=f"edgeway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = _ShowDefaults
    serve = commands.add_parser("serve", help="run the gateway", formatter_class=defaults)
    serve.add_argument("--policy", help="policy file (default: $EDGEWAY_POLICY)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument("--http", default="httptools", choices=["httptools", "h11"],
                       help="HTTP/1.1 parser (default: httptools; h11 is pure Python); the policy's server: block "
                            "sets timeouts and limits")
    serve.add_argument("--watch", action="store_true",
                       help="reload when the policy file changes (every worker; an invalid file is refused)")
    serve.add_argument("--access-log", choices=["on", "off"], default="on",
                       help="one log line per request on stdout (default on)")
    serve.add_argument("--log-format", choices=["json", "text"], default=None,
                       help="log lines as JSON (default) or readable text (default on a terminal)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="log level")
    serve.add_argument("--require-store", action="store_true",
                       help="refuse to start (exit 1) when the primary store cannot be reached")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a policy file", formatter_class=defaults)
    check.add_argument("file")
    check.add_argument("--in-app", action="store_true",
                       help="validate as an in-app policy (EdgewayMiddleware): upstreams not needed; without it, "
                            "a policy naming no upstream at all is taken as in-app")
    check.set_defaults(run=_check)

    diff = commands.add_parser("diff", help="what changes from one policy file to another (exit 0 same, 1 different)",
                               formatter_class=defaults)
    diff.add_argument("old", help="the policy running now")
    diff.add_argument("new", help="the policy to apply")
    diff.set_defaults(run=_diff)

    explain = commands.add_parser("explain", help="which route, limits (with store keys), cache, breaker and session "
                                  "rules apply to a request", formatter_class=defaults)
    explain.add_argument("file", help="policy file")
    explain.add_argument("method", help="HTTP method, e.g. GET")
    explain.add_argument("path", help="the request target, e.g. /api/items?page=1")
    explain.add_argument("--header", action="append", type=_header, default=[], metavar="'K: V'",
                         help="a request header (repeatable)")
    explain.add_argument("--client-ip", default="127.0.0.1", help="the address the request comes from")
    explain.set_defaults(run=_explain)

    demo = commands.add_parser("demo", help="run a sample upstream and gateway and show the policies at work",
                               formatter_class=defaults)
    demo.add_argument("--requests", type=int, default=60, help="requests per demo step")
    demo.set_defaults(run=_demo)

    bridge = commands.add_parser("upstash-bridge", help="serve an Upstash-REST-compatible API over a Redis (dev/CI)")
    bridge.add_argument("--redis", default="redis://127.0.0.1:6379")
    bridge.add_argument("--token", default=os.environ.get("UPSTASH_REDIS_REST_TOKEN", "dev-token"))
    bridge.add_argument("--host", default="127.0.0.1")
    bridge.add_argument("--port", type=int, default=8079)
    bridge.set_defaults(run=_bridge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeway`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
