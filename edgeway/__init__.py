"""Edgeway: edge policies for Python APIs, as a gateway or as ASGI middleware.

The distribution installs this one import package. In the repository its
subpackages live in the top-level folders ``gateway/`` (the reverse proxy,
policy loading, the command line) and ``middleware/`` (the ASGI policies and
the stores); ``edgeway/gateway`` and ``edgeway/middleware`` link to them, and
the wheel carries them as ``edgeway.gateway`` and ``edgeway.middleware``.

``create_app(policy)`` builds the gateway; ``app.add_middleware(EdgewayMiddleware,
policy=path)`` mounts the same policies in a FastAPI/Starlette app, and
``Edgeway.from_policy(path).wrap(app)`` in any ASGI app.
"""

from __future__ import annotations

from .gateway import (
    Edgeway,
    EdgewayMiddleware,
    Gateway,
    LoadedPolicy,
    PolicyError,
    __version__,
    create_app,
    load_policy,
    load_text,
)

__all__ = ["Edgeway", "EdgewayMiddleware", "Gateway", "LoadedPolicy", "PolicyError", "__version__", "create_app",
           "load_policy", "load_text"]
