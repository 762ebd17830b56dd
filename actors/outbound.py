"""Outgoing HTTP that only ever connects to an address it has checked.

``engine.urls`` says which addresses are internal; this module resolves names and makes
sure the connection goes to the address that was judged. A check at registration alone is
not enough: a name can resolve to a public address when it is registered and to 127.0.0.1
when the engine connects (DNS rebinding), and a second lookup by the HTTP library could
get yet another answer. So :class:`PinnedTransport` resolves once per request, refuses if
any answer is internal, and connects to the first answer itself: the URL's host becomes
that IP while the ``Host`` header and the TLS SNI / certificate check keep the name.
Redirects are never followed (every client here has ``follow_redirects=False``; a
caller that followed one would pass through this transport again), and proxies from the
environment are ignored (``trust_env=False``), so nothing resolves the name a second time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable

import httpx
import msgspec

from engine import errors, urls
from engine.settings import Settings
from engine.urls import IP, AllowEntry, Target

RESOLVE_TIMEOUT_S = 5.0

# httpcore imports sniffio on every request to learn the async library; without sniffio
# installed each failed import searches sys.path again (~0.5 ms of CPU per request, most
# of a webhook delivery's cost). A None entry makes that import fail at once.
if importlib.util.find_spec("sniffio") is None:
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

Resolver = Callable[[str, int], Awaitable[list[IP]]]


async def system_resolve(host: str, port: int) -> list[IP]:
    """Every address ``host`` resolves to (the system resolver, bounded in time)."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
    )
    out: list[IP] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


async def vet(
    target: Target, allow: tuple[AllowEntry, ...], resolver: Resolver = system_resolve,
    field: str = "url",
) -> IP:
    """The address to connect to for ``target``: every address it resolves to is checked
    and the first is returned. Raises :class:`errors.InternalAddress` when one is internal
    (and not allowed); resolver errors (OSError, TimeoutError) go to the caller."""
    literal = target.literal
    addresses = [literal] if literal is not None else await resolver(target.host, target.port)
    refused = urls.refusal(target, addresses, allow, field)
    if refused is not None:
        raise refused
    return addresses[0]


async def check_url(
    url: object, allow: tuple[AllowEntry, ...], resolver: Resolver = system_resolve,
    field: str = "url",
) -> Target:
    """Registration-time check: the parsed target, or InvalidInput / InternalAddress saying
    why the engine will not request it (a name that does not resolve is refused too)."""
    target = urls.parse(url, field)
    try:
        await vet(target, allow, resolver, field)
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise errors.InvalidInput(
            f"{field}: {target.host} does not resolve ({exc.__class__.__name__})"
        ) from None
    return target


class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that checks each request's host and connects to the checked IP."""

    def __init__(
        self,
        allow: tuple[AllowEntry, ...],
        resolver: Resolver = system_resolve,
        limits: httpx.Limits | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.allow = allow
        self.verify = verify
        self.resolver = resolver
        self.limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        # One connection pool per name: the pool is keyed by the IP connected to, and two
        # names on one IP must not share a TLS connection verified for only one of them.
        self.pools: dict[str, httpx.AsyncBaseTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = urls.parse(str(request.url))
        try:
            ip = await vet(target, self.allow, self.resolver)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise httpx.ConnectError(
                f"{target.host} does not resolve: {exc.__class__.__name__}: {exc}", request=request
            ) from None
        # Host header was set from the name when the request was built; keep it.
        request.headers.setdefault("Host", request.url.netloc.decode("ascii"))
        request.url = request.url.copy_with(host=str(ip))
        if target.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": target.host}
        pool = self.pools.get(target.host)
        if pool is None:
            pool = self.pools[target.host] = self.connect_to(target.host)
        return await pool.handle_async_request(request)

    def connect_to(self, host: str) -> httpx.AsyncBaseTransport:
        """The transport that opens the connections for ``host`` (tests put a mock here)."""
        return httpx.AsyncHTTPTransport(limits=self.limits, verify=self.verify, trust_env=False)

    async def aclose(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            await pool.aclose()


def client(
    allow: tuple[AllowEntry, ...],
    *,
    timeout: float,
    limits: httpx.Limits | None = None,
    resolver: Resolver = system_resolve,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose every request goes through :class:`PinnedTransport`."""
    return httpx.AsyncClient(
        transport=PinnedTransport(allow, resolver, limits, verify),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )


def allow_of(settings: Settings) -> tuple[AllowEntry, ...]:
    return urls.parse_allow(settings.outbound_allow)


def allowing(settings: Settings, sink_urls: list[str] | tuple[str, ...]) -> Settings:
    """``settings`` with ``VOUCHER_OUTBOUND_ALLOW`` extended by exactly the host:port of each
    of ``sink_urls`` (the embedded sinks, which listen on 127.0.0.1)."""
    extra = urls.allow_entries_for(list(sink_urls))
    joined = ",".join(x for x in (settings.outbound_allow, extra) if x)
    return msgspec.structs.replace(settings, outbound_allow=joined)
