"""The reference for serving overhead: a bare FastAPI endpoint of ``POST /embed``'s shape.

It parses one request ``{"inputs": [{"text": ...}]}`` with pydantic and answers one unit
vector of the model's dimension ``{"embeddings": [[...]]}`` rendered by orjson (as the
server renders vectors), with no model, batching or tokenising: what uvicorn + FastAPI
alone cost per request on this machine. ``python bench/serve.py --simulate`` serves it
with ``uvicorn bench.bare_fastapi:app`` (``LLAVE_BARE_DIM``, default 896 = LLaVE-0.5B)
and drives it with the same client as the real server.
"""

from __future__ import annotations

import math
import os
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

DIM = int(os.environ.get("LLAVE_BARE_DIM", "896"))
_VECTOR = [((i * 7919) % 1000 - 500) / 1000.0 for i in range(DIM)]
_NORM = math.sqrt(sum(x * x for x in _VECTOR))
_VECTOR = [x / _NORM for x in _VECTOR]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[_Input] = Field(min_length=1, max_length=1)


class _OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


app = FastAPI()


@app.post("/embed")
async def embed(request: _Request) -> _OrjsonResponse:
    return _OrjsonResponse({"embeddings": [_VECTOR], "dim": DIM})


@app.get("/ready")
async def ready() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/metrics")
async def metrics() -> PlainTextResponse:
    return PlainTextResponse("")
