"""Remote image and video URLs: refused unless allow-listed, then fetched with tight limits.

An input's ``image`` or ``video`` (shorthand or content part) may be an ``http(s)://`` URL;
both follow the same rules (a video's byte cap is its own, ``--max-video-bytes``). With no
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

from model.errors import ImageTooLargeError, InvalidInputError, VideoTooLargeError
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
        video_max_bytes: int = 32 * 1024 * 1024,
        timeout_s: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.allow_hosts = [h.lower().rstrip(".") for h in allow_hosts]
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.video_max_bytes = video_max_bytes
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
        """Return the inputs with every image and video URL replaced by the fetched bytes."""
        urls: dict[tuple[str, str], int] = {}  # (kind, url) -> index of the first input holding it
        for index, inp in enumerate(inputs):
            for kind, url in _media_values(inp):
                if is_image_url(url):
                    urls.setdefault((kind, url), index)
        if not urls:
            return list(inputs)
        if not self.enabled:
            (kind, _), index = min(urls.items(), key=lambda item: item[1])
            raise _input_error(
                index,
                InvalidInputError(
                    f"{kind} URLs are not accepted by this server; send the {kind} as base64 or a data: URI"
                ),
            )

        async def fetch(kind: str, url: str, index: int) -> bytes:
            try:
                return await self.fetch(url, kind)
            except InvalidInputError as exc:  # the too-large errors are InvalidInputErrors too
                raise _input_error(index, exc) from None

        got = await asyncio.gather(*(fetch(k, u, i) for (k, u), i in urls.items()))
        fetched = dict(zip(urls, got, strict=True))
        return [_replace_media(inp, fetched) for inp in inputs]

    # --- one URL -----------------------------------------------------------------------

    async def fetch(self, url: str, kind: str = "image") -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, kind)
        except TimeoutError:
            raise InvalidInputError(f"fetching the {kind} URL timed out after {self.timeout_s:g} s") from None

    async def _fetch(self, url: str, kind: str) -> bytes:
        max_bytes = self.video_max_bytes if kind == "video" else self.max_bytes
        too_large = VideoTooLargeError if kind == "video" else ImageTooLargeError
        first_host = None
        for _ in range(IMAGE_URL_MAX_REDIRECTS + 1):
            host = self._check_url(url, kind)
            if first_host is None:
                first_host = host
            elif host != first_host:
                raise InvalidInputError(f"the {kind} URL redirects to another host")
            client = self._get_client()
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise InvalidInputError(f"the {kind} URL redirects without a location")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InvalidInputError(f"the {kind} URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise too_large(f"the {kind} at the URL is larger than {max_bytes} bytes")
                    chunks = bytearray()
                    async for chunk in response.aiter_bytes():
                        chunks.extend(chunk)
                        if len(chunks) > max_bytes:
                            raise too_large(f"the {kind} at the URL is larger than {max_bytes} bytes")
                    return bytes(chunks)
            except httpx.HTTPError:
                raise InvalidInputError(f"the {kind} URL could not be fetched") from None
        raise InvalidInputError(f"the {kind} URL redirects more than {IMAGE_URL_MAX_REDIRECTS} times")

    def _check_url(self, url: str, kind: str = "image") -> str:
        """The URL's host, if allow-listed; its addresses are checked when connecting."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            article = "an" if kind == "image" else "a"
            raise InvalidInputError(f"{article} {kind} URL must be http(s)://host/...")
        host = parts.hostname.lower().rstrip(".")
        if not host_allowed(host, self.allow_hosts):
            raise InvalidInputError(f"{kind} URLs from host {host!r} are not allowed")
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


MEDIA_KINDS = ("image", "video")


def _media_values(inp: Any) -> list[tuple[str, Any]]:
    """(kind, value) of every image and video of an input object, shorthand or parts."""
    if not isinstance(inp, dict):
        return []
    values = [(kind, inp[kind]) for kind in MEDIA_KINDS if kind in inp]
    content = inp.get("content")
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                values.extend((kind, part[kind]) for kind in MEDIA_KINDS if kind in part)
    return values


def _replace_media(inp: Any, fetched: dict[tuple[str, str], bytes]) -> Any:
    if not isinstance(inp, dict):
        return inp

    def replaced(obj: dict[str, Any]) -> dict[str, Any]:
        out = dict(obj)
        for kind in MEDIA_KINDS:
            value = out.get(kind)
            if isinstance(value, str) and (kind, value) in fetched:
                out[kind] = fetched[(kind, value)]
        return out

    out = replaced(inp)
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = [replaced(part) if isinstance(part, dict) else part for part in content]
    return out


def _input_error(index: int, exc: Exception) -> Exception:
    exc.input_index = index  # type: ignore[attr-defined]
    return exc
