"""Edgeway gateway: the reverse proxy, policy loading and the command line.

``create_app(policy)`` builds the ASGI app; ``app.add_middleware(EdgewayMiddleware,
policy=path)`` (or ``Edgeway.from_policy(path).wrap(app)``) mounts the same policies in an app.
"""

from __future__ import annotations

from .app import Gateway, create_app
from .embed import Edgeway, EdgewayMiddleware
from .errors import PolicyError
from .loader import LoadedPolicy, load_policy, load_text

__version__ = "0.1.0"

__all__ = ["Edgeway", "EdgewayMiddleware", "Gateway", "LoadedPolicy", "PolicyError", "__version__", "create_app",
           "load_policy", "load_text"]
