"""Shared pieces of the reliability tests: error-body checks, raw HTTP, process memory, file listings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx

# What an error body must never hold: traces, source locations, local paths.
LEAKS = ("Traceback", 'File "', '.py"', ".py'", ".py,", "/work/", "/tmp/", "/root", "/home/", "site-packages")


def assert_clean_error(
    response: httpx.Response, statuses: set[int] | None = None, public: tuple[str, ...] = ()
) -> dict:
    """A 4xx/5xx with the documented ``{"error": {"type", "message"}}`` body that leaks nothing.

    ``public``: strings the server publishes anyway (the served model name: the checkpoint
    folder's name unless ``--served-model-name`` is given, never its path) and may repeat in
    a message.
    """
    assert response.status_code >= 400, response.text[:300]
    if statuses is not None:
        assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]
    assert_no_leak(response.text, public)
    return error


def assert_no_leak(text: str, public: tuple[str, ...] = ()) -> None:
    for allowed in public:
        text = text.replace(allowed, "<public>").replace(repr(allowed)[1:-1], "<public>")
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} in response: {text[:500]}"


def assert_healthy(url: str, headers: dict[str, str] | None = None) -> None:
    """Alive, ready, and an embedding request still goes through."""
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        response = client.post("/embed", json={"inputs": [{"text": "still alive"}]})
        assert response.status_code == 200, response.text[:300]


def raw_http(port: int, request: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side URL normalisation) and parse the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def raw_request(
    method: str, target: str, *, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def files_under(root: Path) -> set[str]:
    """Every file and directory below ``root``, relative to it."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out
