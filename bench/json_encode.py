"""Response encoding: the stdlib JSON encoder against orjson on one ``/embed`` response.

    python bench/json_encode.py              # 3,000 encodes per repeat, 5 interleaved repeats
    python bench/json_encode.py --quick      # 300 encodes, 2 repeats

Builds the body ``POST /embed`` returns for ``--vectors`` unit vectors of ``--dim`` floats
(``embeddings`` from a float32 array's ``tolist()``, as ``service/http/routes/embed.py`` does),
then times, alternately, Starlette's ``JSONResponse.render`` (the stdlib encoder with the
options Starlette passes) and ``service.http.routes.common.VectorJSONResponse.render`` (orjson),
checking first that both decode to the same floats. Reports ms per response (best and
median of the repeats) and the ratio. Results: a table on stdout and
``bench/results/json-encode[-quick].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def response_body(vectors: int, dim: int, seed: int = 0) -> dict[str, Any]:
    x = np.random.default_rng(seed).standard_normal((vectors, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {
        "embeddings": x.tolist(),
        "model": "LLaVE-0.5B",
        "dim": dim,
        "usage": {"prompt_tokens": 40 * vectors, "total_tokens": 40 * vectors, "images": 0, "truncated": 0},
    }


def ms_per_call(render, content: dict[str, Any], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        render(content)
    return (time.perf_counter() - start) / loops * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=1, help="vectors in the response")
    p.add_argument("--dim", type=int, default=896, help="floats per vector (LLaVE-0.5B: 896)")
    p.add_argument("--loops", type=int, default=3000, help="encodes per repeat and encoder")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    p.add_argument("--quick", action="store_true", help="300 encodes, 2 repeats (a smoke check)")
    args = p.parse_args(argv)
    if args.quick:
        args.loops, args.repeats = 300, 2

    from starlette.responses import JSONResponse

    from service.http.routes.common import VectorJSONResponse

    encoders = {"stdlib": JSONResponse(None).render, "orjson": VectorJSONResponse(None).render}
    content = response_body(args.vectors, args.dim)
    decoded = {name: json.loads(render(content)) for name, render in encoders.items()}
    assert decoded["stdlib"] == decoded["orjson"] == content, "the encoders disagree"

    times: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.repeats):
        for name, render in encoders.items():
            times[name].append(ms_per_call(render, content, args.loops))
    rows = [
        {
            "encoder": name,
            "best ms": min(ms),
            "median ms": statistics.median(ms),
            "bytes": len(encoders[name](content)),
        }
        for name, ms in times.items()
    ]
    ratio = min(times["stdlib"]) / min(times["orjson"])
    print(common.table(rows, ["encoder", "best ms", "median ms", "bytes"], "One /embed response"))
    print(f"\nstdlib / orjson (best): {ratio:.1f}x")
    common.write_results(
        "json-encode" + ("-quick" if args.quick else ""),
        {"args": vars(args), "machine": common.machine_info(), "times_ms": times, "ratio": ratio},
    )


if __name__ == "__main__":
    main()
