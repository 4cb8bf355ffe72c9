"""The ``edgeway`` command: serve, check, demo, upstash-bridge, --version."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
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
    from .server import uvicorn_options

    stores = asyncio.run(probe_stores(loaded))
    logger.info("starting\n%s", startup_block(loaded, stores, host=args.host, port=args.port, workers=args.workers))
    primary = next((reach for reach in stores if reach.role == "primary"), None)
    if args.require_store and primary is not None and not primary.reachable:
        print(f"edgeway serve: --require-store: the primary store {primary.location} cannot be reached "
              f"({primary.error}); not starting", file=sys.stderr)
        return 1
    os.environ["EDGEWAY_POLICY"] = path
    uvicorn.run(
        "edgeway.gateway.asgi:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
        log_level=args.log_level,
        **uvicorn_options(args.http),
    )
    return 0


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
    serve.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
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
