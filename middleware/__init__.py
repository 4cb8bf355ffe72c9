"""Edgeway's policies as pure ASGI middleware, usable in any ASGI app."""
