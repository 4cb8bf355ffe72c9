"""Who is the client? Forwarding headers count only when a trusted proxy set them.

The peer address comes from the server (``scope["client"]``). If that peer is a
trusted proxy, ``X-Forwarded-For`` (or RFC 7239 ``Forwarded``) is read from the
right, skipping further trusted proxies; the first untrusted address is the
client. From any other peer the headers are ignored: a client cannot choose its
own rate-limit key by sending ``X-Forwarded-For``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of networks parsed once; ``contains`` is cached per address string."""

    __slots__ = ("_contains", "networks")

    def __init__(self, networks: Iterable[str | IPNetwork] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            n if isinstance(n, IPNetwork) else ipaddress.ip_network(n, strict=False) for n in networks
        )
        nets = self.networks

        @lru_cache(maxsize=4096)
        def contains(address: str) -> bool:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            return any(ip in net for net in nets)

        self._contains = contains

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: str) -> bool:
        return bool(self.networks) and self._contains(address)

    def client_address(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The real client: ``peer`` unless it is trusted and forwarded a chain."""
        if peer not in self:
            return peer
        for hop in reversed(forwarded_for):
            if hop not in self:
                return hop
        return forwarded_for[0] if forwarded_for else peer


def parse_x_forwarded_for(values: Iterable[str]) -> list[str]:
    """All hops of every ``X-Forwarded-For`` line, left to right."""
    return [_strip_port(hop.strip()) for value in values for hop in value.split(",") if hop.strip()]


def parse_forwarded_for(values: Iterable[str]) -> list[str]:
    """The ``for=`` hops of every RFC 7239 ``Forwarded`` line, left to right."""
    hops = []
    for value in values:
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, raw = pair.strip().partition("=")
                if name.lower() == "for" and raw:
                    hops.append(_strip_port(raw.strip().strip('"')))
    return hops


def _strip_port(hop: str) -> str:
    if hop.startswith("["):  # "[2001:db8::1]:4711"
        return hop[1 : hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:  # "192.0.2.1:4711"
        return hop.partition(":")[0]
    return hop
