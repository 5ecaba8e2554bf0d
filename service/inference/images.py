"""Remote image URLs: refused unless allow-listed, then fetched with tight limits.

An input's ``image`` (shorthand or content part) may be an ``http(s)://`` URL. With no
allow-list (the default) such inputs are refused with 422. With ``--image-url-allow-hosts``
each URL must name an allowed host (``example.com``, or ``*.example.com`` for its
subdomains), every address the host resolves to must be public (not private, loopback,
link-local, multicast or reserved; ``--image-url-allow-private`` lifts this for trusted
internal networks), redirects are followed only to the same host (at most 3), and the body
is streamed with a byte cap (413 beyond it) and an overall time limit. The fetched bytes
replace the URL, so the model core never touches the network.

DNS rebinding: the name is resolved once per connection, by the HTTP client's network
backend (``CheckedNetworkBackend``), which refuses the connection when any answer is not
public and then connects to the checked addresses themselves; nothing resolves the name a
second time, so a DNS server that answers a public address to the check and a private one
to the connection has nothing to exploit. TLS still verifies the certificate for the host
name. A redirect is a new request: if it needs a new connection, it is resolved and checked
the same way; a kept-alive connection it reuses was checked when it was opened.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from model.errors import ImageTooLargeError, InvalidInputError
from service.limits import IMAGE_URL_MAX_REDIRECTS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the host's addresses; the default asks the system (getaddrinfo).
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


def is_image_url(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def host_allowed(host: str, allow_hosts: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allow_hosts:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class ImageFetcher:
    """Resolves allow-listed image URLs in input objects to bytes."""

    def __init__(
        self,
        allow_hosts: Sequence[str],
        *,
        allow_private: bool = False,
        max_bytes: int = 16 * 1024 * 1024,
        timeout_s: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.allow_hosts = [h.lower().rstrip(".") for h in allow_hosts]
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.resolver: Resolver = resolver or system_resolve
        self._client: httpx.AsyncClient | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.allow_hosts)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- inputs ------------------------------------------------------------------------

    async def resolve_inputs(self, inputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return the inputs with every image URL replaced by the fetched bytes."""
        urls: dict[str, int] = {}  # url -> index of the first input holding it
        for index, inp in enumerate(inputs):
            for url in _image_values(inp):
                if is_image_url(url):
                    urls.setdefault(url, index)
        if not urls:
            return list(inputs)
        if not self.enabled:
            index = min(urls.values())
            raise _input_error(
                index,
                InvalidInputError(
                    "image URLs are not accepted by this server; send the image as base64 or a data: URI"
                ),
            )

        async def fetch(url: str, index: int) -> bytes:
            try:
                return await self.fetch(url)
            except (InvalidInputError, ImageTooLargeError) as exc:
                raise _input_error(index, exc) from None

        fetched = dict(zip(urls, await asyncio.gather(*(fetch(u, i) for u, i in urls.items())), strict=True))
        return [_replace_images(inp, fetched) for inp in inputs]

    # --- one URL -----------------------------------------------------------------------

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise InvalidInputError(f"fetching the image URL timed out after {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        first_host = None
        for _ in range(IMAGE_URL_MAX_REDIRECTS + 1):
            host = self._check_url(url)
            if first_host is None:
                first_host = host
            elif host != first_host:
                raise InvalidInputError("the image URL redirects to another host")
            client = self._get_client()
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise InvalidInputError("the image URL redirects without a location")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InvalidInputError(f"the image URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                        raise ImageTooLargeError(
                            f"the image at the URL is larger than {self.max_bytes} bytes"
                        )
                    chunks = bytearray()
                    async for chunk in response.aiter_bytes():
                        chunks.extend(chunk)
                        if len(chunks) > self.max_bytes:
                            raise ImageTooLargeError(
                                f"the image at the URL is larger than {self.max_bytes} bytes"
                            )
                    return bytes(chunks)
            except httpx.HTTPError:
                raise InvalidInputError("the image URL could not be fetched") from None
        raise InvalidInputError(f"the image URL redirects more than {IMAGE_URL_MAX_REDIRECTS} times")

    def _check_url(self, url: str) -> str:
        """The URL's host, if allow-listed; its addresses are checked when connecting."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InvalidInputError("an image URL must be http(s)://host/...")
        host = parts.hostname.lower().rstrip(".")
        if not host_allowed(host, self.allow_hosts):
            raise InvalidInputError(f"image URLs from host {host!r} are not allowed")
        return host

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            backend = CheckedNetworkBackend(self.resolver, allow_private=self.allow_private)
            self._client = httpx.AsyncClient(
                transport=_CheckedTransport(backend),
                follow_redirects=False,
                trust_env=False,  # no proxies or netrc from the environment
                timeout=httpx.Timeout(self.timeout_s),
                headers={"User-Agent": "llave-server image fetcher"},
            )
        return self._client


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses from the system resolver (a literal address as it is)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise InvalidInputError(f"image URL host {host!r} could not be resolved") from None
    addresses = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone
        addresses.append(ipaddress.ip_address(address))
    return list(dict.fromkeys(addresses))


class CheckedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host once, refuses non-public answers, connects to the checked addresses.

    The HTTP client's only way to the network: ``InvalidInputError`` (422) when the host
    has a non-public address (unless ``allow_private``) or none; the addresses are tried in
    the resolver's order. TLS is started on the stream afterwards by httpcore with the URL's
    host name, so the certificate is verified for the name, not the address.
    """

    def __init__(self, resolver: Resolver, *, allow_private: bool = False) -> None:
        self.resolver = resolver
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        addresses = await self.resolver(host, port)
        if not addresses:
            raise InvalidInputError(f"image URL host {host!r} could not be resolved")
        if not self.allow_private and not all(_public(ip) for ip in addresses):
            raise InvalidInputError(f"image URL host {host!r} resolves to a non-public address; refused")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.checked_addresses(host, port)
        error: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image URLs are fetched over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over ``CheckedNetworkBackend``.

    httpx takes no network backend, so the httpcore pool it built is replaced by one with
    the same options and ours (``_pool`` is the pool ``handle_async_request`` uses; the
    DNS-rebinding tests fail if that ever stops being true).
    """

    def __init__(self, backend: CheckedNetworkBackend) -> None:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
        super().__init__(trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def _image_values(inp: Any) -> list[Any]:
    if not isinstance(inp, dict):
        return []
    values = []
    if "image" in inp:
        values.append(inp["image"])
    content = inp.get("content")
    if isinstance(content, list):
        values.extend(part.get("image") for part in content if isinstance(part, dict) and "image" in part)
    return values


def _replace_images(inp: Any, fetched: dict[str, bytes]) -> Any:
    if not isinstance(inp, dict):
        return inp
    out = dict(inp)
    if isinstance(out.get("image"), str) and out["image"] in fetched:
        out["image"] = fetched[out["image"]]
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = [
            dict(part, image=fetched[part["image"]])
            if isinstance(part, dict) and isinstance(part.get("image"), str) and part["image"] in fetched
            else part
            for part in content
        ]
    return out


def _input_error(index: int, exc: Exception) -> Exception:
    exc.input_index = index  # type: ignore[attr-defined]
    return exc
