"""A running server's POST /embed as an embedder (``embed(inputs, batch_size=...)``), so
evaluation and mining can use a deployment as it serves instead of loading the model."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


class ServerEmbedder:
    """``embed`` through a running server's POST /embed (images sent as base64), so a
    deployment is evaluated as it serves. 429 and 503 are retried after Retry-After; a
    request over the server's size limits (413) is split in two."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 60,
        transport: Any = None,  # an httpx transport, for tests
    ):
        try:
            import httpx
        except ImportError as exc:  # the `serve` extra
            raise SystemExit("--server needs httpx (pip install 'llave-server[serve]')") from exc
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.retries = retries
        info = self._request("GET", "/info")
        self.name = str(info.get("model") or self.url)
        self.dim = info.get("dim")
        self.max_inputs = int((info.get("limits") or {}).get("max_inputs_per_request") or 0) or None

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        for _attempt in range(self.retries):
            r = self.client.request(method, path, json=body)
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("retry-after") or 1))
                continue
            if r.status_code >= 400:
                try:
                    message = r.json()["error"]["message"]
                except Exception:
                    message = r.text[:300]
                raise ServerError(
                    r.status_code, f"{method} {self.url}{path}: HTTP {r.status_code}: {message}"
                )
            return r.json()
        raise ServerError(
            r.status_code, f"{method} {self.url}{path}: still HTTP {r.status_code} after {self.retries} tries"
        )

    @staticmethod
    def _wire(item: dict[str, Any]) -> dict[str, Any]:
        """Raw image or video bytes (in the shorthand or in content parts) as base64."""

        def encode(value: Any) -> Any:
            return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value

        if "content" not in item:
            return {k: encode(v) if k in ("image", "video") else v for k, v in item.items()}
        parts = []
        for part in item["content"]:
            if part["type"] in ("image", "video"):
                part = {**part, part["type"]: encode(part[part["type"]])}
            parts.append(part)
        return {**item, "content": parts}

    def _post(self, inputs: list[dict[str, Any]]) -> np.ndarray:
        try:
            body = self._request("POST", "/embed", {"inputs": inputs, "normalize": True, "truncate": True})
        except ServerError as exc:
            if exc.status != 413 or len(inputs) == 1:
                raise
            half = len(inputs) // 2
            return np.concatenate([self._post(inputs[:half]), self._post(inputs[half:])])
        return np.asarray(body["embeddings"], dtype=np.float32)

    def embed(self, inputs: Sequence[dict[str, Any]], *, batch_size: int = 16) -> np.ndarray:
        size = min(batch_size, self.max_inputs) if self.max_inputs else batch_size
        wire = [self._wire(x) for x in inputs]
        return np.concatenate([self._post(wire[i : i + size]) for i in range(0, len(wire), size)])

    def close(self) -> None:
        self.client.close()


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
