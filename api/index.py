"""Vercel entry: the gateway as an ASGI ``app``, built from ``EDGEWAY_POLICY``.

On Vercel use Upstash REST as the store (``UPSTASH_REDIS_REST_URL`` and
``UPSTASH_REDIS_REST_TOKEN``, ``store.url: upstash://``): functions are
short-lived and can't keep TCP connections to Redis.
"""

from edgeway.gateway.asgi import app_from_env

app = app_from_env()
