"""ASGI entry points that read the policy path from the environment (uvicorn workers, Vercel)."""

from __future__ import annotations

import gc
import os
import signal
from typing import cast

from .accesslog import AccessLog, LogFormat, configure_logging, default_format
from .app import Gateway, create_app

WATCH_EVERY = 1.0
"""Seconds between checks of the policy file under ``--watch``."""


def app_from_env() -> Gateway:
    """The gateway for ``EDGEWAY_POLICY`` (default ``policies/gateway.yaml``); a factory for uvicorn.

    ``edgeway serve`` passes its logging options to every worker as ``EDGEWAY_LOG_FORMAT`` (json|text),
    ``EDGEWAY_ACCESS_LOG`` (on|off), ``EDGEWAY_LOG_LEVEL`` and ``EDGEWAY_WATCH`` (1: reload when the
    file changes); outside it the access log is off unless ``EDGEWAY_ACCESS_LOG=on``.
    """
    fmt = os.environ.get("EDGEWAY_LOG_FORMAT", "")
    log_format = cast(LogFormat, fmt) if fmt in ("json", "text") else default_format()
    access = os.environ.get("EDGEWAY_ACCESS_LOG", "off") == "on"
    if "EDGEWAY_LOG_FORMAT" in os.environ:  # under edgeway serve: this process's logging is ours to set
        configure_logging(log_format, access_log=access, level=os.environ.get("EDGEWAY_LOG_LEVEL", "info"))
        # a worker told to reload (SIGHUP) before its handler is installed at startup must not die of it
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = create_app(os.environ.get("EDGEWAY_POLICY", "policies/gateway.yaml"),
                     access_log=AccessLog(log_format) if access else None,
                     watch=WATCH_EVERY if os.environ.get("EDGEWAY_WATCH") == "1" else None)
    if "EDGEWAY_LOG_FORMAT" in os.environ:
        # a serving process: what exists now (modules, the policy, its compiled routes) lives as long as it
        # does; frozen, the cyclic collector's full passes stop walking it on every request burst (measured
        # in bench/RESULTS.md: a few percent of a cache hit's CPU)
        gc.freeze()
    return app
