"""ASGI entry points that read the policy path from the environment (uvicorn workers, Vercel)."""

from __future__ import annotations

import os

from .app import Gateway, create_app


def app_from_env() -> Gateway:
    """The gateway for ``EDGEWAY_POLICY`` (default ``policies/gateway.yaml``); a factory for uvicorn."""
    return create_app(os.environ.get("EDGEWAY_POLICY", "policies/gateway.yaml"))
