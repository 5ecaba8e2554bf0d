"""Remote image URLs: refused unless allow-listed, then fetched with tight limits.

An input's ``image`` (shorthand or content part) may be an ``http(s)://`` URL. With no
allow-list (the default) such inputs are refused with 422. With ``--image-url-allow-hosts``
each URL must name an allowed host (``example.com``, or ``*.example.com`` for its
subdomains), every address the host resolves to must be public (not private, loopback,
link-local, multicast or reserved; ``--image-url-allow-private`` lifts this for trusted
internal networks), redirects are followed only to the same host (at most 3), and the body
is streamed with a byte cap (413 beyond it) and an overall time limit. The fetched bytes
replace the URL, so the model core never touches the network.

Known limit: the address check resolves the name before httpx connects, which resolves it
again; a DNS server that answers differently the second time (DNS rebinding) is not
defended against here. Allow-list only hosts whose DNS you trust.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from service.errors import InvalidInputApiError, PayloadTooLargeError

MAX_REDIRECTS = 3


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
    ) -> None:
        self.allow_hosts = [h.lower().rstrip(".") for h in allow_hosts]
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
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
                InvalidInputApiError(
                    "image URLs are not accepted by this server; send the image as base64 or a data: URI"
                ),
            )

        async def fetch(url: str, index: int) -> bytes:
            try:
                return await self.fetch(url)
            except (InvalidInputApiError, PayloadTooLargeError) as exc:
                raise _input_error(index, exc) from None

        fetched = dict(zip(urls, await asyncio.gather(*(fetch(u, i) for u, i in urls.items())), strict=True))
        return [_replace_images(inp, fetched) for inp in inputs]

    # --- one URL -----------------------------------------------------------------------

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise InvalidInputApiError(
                f"fetching the image URL timed out after {self.timeout_s:g} s"
            ) from None

    async def _fetch(self, url: str) -> bytes:
        first_host = None
        for _ in range(MAX_REDIRECTS + 1):
            host = await self._check_url(url)
            if first_host is None:
                first_host = host
            elif host != first_host:
                raise InvalidInputApiError("the image URL redirects to another host")
            client = self._get_client()
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise InvalidInputApiError("the image URL redirects without a location")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InvalidInputApiError(f"the image URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                        raise PayloadTooLargeError(
                            f"the image at the URL is larger than {self.max_bytes} bytes"
                        )
                    chunks = bytearray()
                    async for chunk in response.aiter_bytes():
                        chunks.extend(chunk)
                        if len(chunks) > self.max_bytes:
                            raise PayloadTooLargeError(
                                f"the image at the URL is larger than {self.max_bytes} bytes"
                            )
                    return bytes(chunks)
            except httpx.HTTPError:
                raise InvalidInputApiError("the image URL could not be fetched") from None
        raise InvalidInputApiError(f"the image URL redirects more than {MAX_REDIRECTS} times")

    async def _check_url(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InvalidInputApiError("an image URL must be http(s)://host/...")
        host = parts.hostname.lower().rstrip(".")
        if not host_allowed(host, self.allow_hosts):
            raise InvalidInputApiError(f"image URLs from host {host!r} are not allowed")
        if not self.allow_private:
            for ip in await _resolve(host, parts.port or (443 if parts.scheme.lower() == "https" else 80)):
                if not _public(ip):
                    raise InvalidInputApiError(
                        f"image URL host {host!r} resolves to a non-public address; refused"
                    )
        return host

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # no proxies or netrc from the environment
                timeout=httpx.Timeout(self.timeout_s),
                headers={"User-Agent": "llave-server image fetcher"},
            )
        return self._client


async def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise InvalidInputApiError(f"image URL host {host!r} could not be resolved") from None
    addresses = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone
        addresses.append(ipaddress.ip_address(address))
    if not addresses:
        raise InvalidInputApiError(f"image URL host {host!r} could not be resolved")
    return addresses


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
