"""HNSW parameters against recall@10 and latency, on the data of ``bench/index.py``.

    python bench/hnsw_sweep.py --n 1000000                       # run times: bench/README.md
    python bench/hnsw_sweep.py --n 100000 --ef-construction 64,200 --ef-search 32,128,512

Builds FAISS ``IndexHNSWFlat`` (inner product, as the collection store does) over n
clustered unit vectors of dim 896 for each ``--ef-construction`` (``--m`` links), then
for each ``--ef-search`` measures recall@10 against exact search and single-query latency.
This is how the store's HNSW defaults (``service/storage/vector_index.py``) were chosen.
Results: a table on stdout and ``bench/results/hnsw-sweep[-TAG].json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import index as index_bench  # noqa: E402
from common import log  # noqa: E402


def exact_top_k(data: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    return flat.search(q, k)[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    log(f"generating {args.n:,} vectors ...")
    data = index_bench.vectors(0, args.n, seed=args.seed)
    q = index_bench.queries(args.queries, seed=args.seed)
    truth = exact_top_k(data, q, args.k)
    rows = []
    for efc in [int(x) for x in args.ef_construction.split(",")]:
        idx = faiss.IndexHNSWFlat(data.shape[1], args.m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = efc
        log(f"m {args.m}, ef_construction {efc}: building ...")
        t0 = time.perf_counter()
        for lo in range(0, args.n, 50_000):
            idx.add(data[lo : lo + 50_000])
        build_s = time.perf_counter() - t0
        log(f"  built in {build_s:.0f} s ({args.n / build_s:,.0f} vectors/s)")
        for efs in [int(x) for x in args.ef_search.split(",")]:
            params = faiss.SearchParametersHNSW(efSearch=max(efs, args.k))
            found = idx.search(q, args.k, params=params)[1]
            recall = float(
                np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth, strict=True)])
            )
            lat = []
            for i in range(min(len(q), args.latency_queries)):
                t = time.perf_counter()
                idx.search(q[i : i + 1], args.k, params=params)
                lat.append((time.perf_counter() - t) * 1000.0)
            row = {
                "n": args.n,
                "m": args.m,
                "ef_construction": efc,
                "build_vectors_per_s": args.n / build_s,
                "ef_search": efs,
                "recall@10": recall,
                "p50_ms": common.percentile(lat, 50),
                "p99_ms": common.percentile(lat, 99),
            }
            log(f"  ef_search {efs}: recall@10 {recall:.3f}, p50 {row['p50_ms']:.2f} ms")
            rows.append(row)
        del idx
    return {
        "benchmark": "hnsw-sweep",
        "command": "python bench/hnsw_sweep.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
        "machine": common.machine_info(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--ef-construction", default="64,160")
    p.add_argument("--ef-search", default="64,128,256,512")
    p.add_argument("--queries", type=int, default=500, help="queries for recall@10")
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="100k vectors")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.quick and "--n" not in (sys.argv[1:] if argv is None else argv):
        args.n = 100_000
    result = run(args)
    name = (
        "hnsw-sweep"
        + (f"-{args.tag}" if args.tag else "")
        + ("-quick" if args.quick and not args.tag else "")
    )
    common.write_results(name, result)
    print(
        common.table(
            result["rows"],
            [
                "n",
                "m",
                "ef_construction",
                "build_vectors_per_s",
                "ef_search",
                "recall@10",
                "p50_ms",
                "p99_ms",
            ],
            title="HNSW parameters (faiss IndexHNSWFlat, inner product)",
        )
    )


if __name__ == "__main__":
    main()
