"""Collection-store benchmark: upsert throughput, search latency/QPS, recall, reload, memory.

    python bench/index.py --quick                   # 10k and 30k vectors (run times: bench/README.md)
    python bench/index.py                           # 10k, 100k and 1M (long: run it in the background)
    python bench/index.py --sizes 10000 --modes store,http
    python bench/index.py --sizes 100000 --indexes flat,hnsw,hnsw:sq8 --modes store --no-reload
    python bench/index.py --store postgres --sizes 100000 --indexes flat,hnsw,hnsw:halfvec
    python bench/index.py --sizes 100000 --indexes flat,hnsw:binary,hnsw,hnsw:sq8 --modes store \
        --no-reload --queries 200 --recall-queries 200 --filter-queries 100 --tag 100k-selectivity

For each size n (vectors of dim 896, like LLaVE-0.5B) and each index type (flat = exact,
hnsw and ivf = approximate; ``kind:precision`` for a reduced-precision index, ``sq8`` on the
embedded store, ``halfvec`` on PostgreSQL, ``binary`` (sign bits, Hamming distance) on
both, whose candidates are rescored exactly):

1. upsert n clustered unit vectors (a Gaussian mixture: 1,000 centres with Zipf-like
   weights, each point ``centre + noise`` with cos(point, centre) ~ 0.7, then normalised)
   through ``CollectionStore`` directly, ``--batch`` per call, and wait for the index's
   background maintenance (IVF training); report vectors/s;
2. search: ``--queries`` held-out queries from the same mixture, one at a time
   (latency p50/p99, single-thread QPS) and from ``--threads`` threads at once (QPS);
   recall@10 of the approximate indexes against the flat index's answers (which are exact);
   filtered search (each document has ``{"g": i % 100, "s": i % 1000}``, both declared as
   integer payload indexes unless ``--no-payload-index``): ``{"s": 7}`` selects 0.1%,
   ``{"g": 7}`` 1%, ``{"g": [0..9]}`` 10% and ``{"g": {"lt": 50}}`` 50% of the collection;
   latency p50/p99 and recall@10 against the flat index's filtered answers (the last table
   printed: one row per index and selectivity, with the index's bytes per vector);
   the index's size: the serialized FAISS index (embedded; its arrays as held in memory) or
   ``pg_relation_size`` of the vector index (PostgreSQL), per million vectors;
3. reload: close the store, open it again in a fresh subprocess and time ``open`` (the
   approximate indexes come back in exact mode) and the background build that follows;
   the subprocess also reports its anonymous RSS before and after (memory per million
   vectors) and search latency before and after the build;
4. ``--modes http``: a real server (``python -m service`` on a tiny model) on the same
   data directory: its search latency/QPS over HTTP once its index is built
   (``POST /search`` with a raw vector), and HTTP upsert throughput of raw vectors
   (``POST /collections/{name}/documents``, 128 per request, the server's default limit)
   into a fresh collection of min(n, ``--http-upsert-max``) vectors.

On PostgreSQL an HNSW collection is bulk-loaded the way pgvector advises: its vector index
is dropped before the upserts and created again after them (``maintenance_work_mem`` 2 GB,
``--pg-build-workers`` parallel workers); inserting row by row into the graph runs at
~90 vectors/s at dim 896 (measured at 10k), too slow for 100k. The build time is reported.

Results: tables on stdout and ``bench/results/index[-quick].json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

DIM = 896
GEN_CHUNK = 8192
CENTRES = 1000
GROUPS = 100  # metadata {"g": i % GROUPS, "s": i % 1000}: {"g": 7} selects 1%, ten values 10%
FILTERS = {
    "0.1%": {"s": 7},
    "1%": {"g": 7},
    "10%": {"g": list(range(10))},
    "50%": {"g": {"lt": 50}},
}
PAYLOAD_INDEXES = {"g": "integer", "s": "integer"}


# --------------------------------------------------------------------------- data


def _centres(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, CENTRES + 1) ** 0.7  # a few big clusters, a long tail
    return centres, weights / weights.sum()


def mixture_chunk(index: int, dim: int = DIM, seed: int = 0, *, stream: int = 1) -> np.ndarray:
    """Chunk ``index`` (GEN_CHUNK rows) of a deterministic Gaussian-mixture stream."""
    centres, weights = _centres(dim, seed)
    rng = np.random.default_rng([seed, stream, index])
    which = rng.choice(CENTRES, GEN_CHUNK, p=weights)
    spread = rng.uniform(0.7, 1.3, (GEN_CHUNK, 1)).astype(np.float32)  # clusters are not all alike
    x = centres[which] + spread * rng.standard_normal((GEN_CHUNK, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vectors(start: int, stop: int, dim: int = DIM, seed: int = 0, stream: int = 1) -> np.ndarray:
    """Rows ``start:stop`` of the stream (independent of how callers chunk it)."""
    out = []
    for c in range(start // GEN_CHUNK, (stop - 1) // GEN_CHUNK + 1):
        chunk = mixture_chunk(c, dim, seed, stream=stream)
        lo, hi = max(start - c * GEN_CHUNK, 0), min(stop - c * GEN_CHUNK, GEN_CHUNK)
        out.append(chunk[lo:hi])
    return np.concatenate(out)


def queries(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return vectors(0, n, dim, seed, stream=2)  # a separate stream: never a stored vector


# --------------------------------------------------------------------------- store mode


def upsert_direct(store: Any, name: str, n: int, batch: int, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    marks = []
    done = 0
    while done < n:
        block = vectors(done, min(n, done + 8 * GEN_CHUNK), seed=seed)
        for lo in range(0, len(block), batch):
            part = block[lo : lo + batch]
            ids = [f"d{done + lo + i}" for i in range(len(part))]
            meta = [{"g": (done + lo + i) % GROUPS, "s": (done + lo + i) % 1000} for i in range(len(part))]
            store.upsert(name, ids, part, meta)
        done += len(block)
        marks.append((done, time.perf_counter() - started))
    inserted_s = time.perf_counter() - started
    store.wait_for_maintenance()
    total_s = time.perf_counter() - started
    # Rate over the last tenth: how fast it goes once the collection is big.
    tail = [m for m in marks if m[0] >= 0.9 * n] or marks
    first = next((m for m in marks if m[0] >= 0.9 * n), marks[0])
    prev = max((m for m in marks if m[0] < first[0]), default=(0, 0.0), key=lambda m: m[0])
    tail_rate = (tail[-1][0] - prev[0]) / (tail[-1][1] - prev[1]) if tail[-1][1] > prev[1] else float("nan")
    return {
        "vectors_per_s": n / inserted_s,
        "vectors_per_s_incl_maintenance": n / total_s,
        "vectors_per_s_last_10pct": tail_rate,
        "insert_s": inserted_s,
        "maintenance_s": total_s - inserted_s,
    }


def search_direct(store: Any, name: str, qs: np.ndarray, k: int, threads: int) -> dict[str, Any]:
    for q in qs[:5]:
        store.search(name, q, k=k)  # warm
    lat = []
    t_all = time.perf_counter()
    for q in qs:
        t0 = time.perf_counter()
        store.search(name, q, k=k)
        lat.append((time.perf_counter() - t0) * 1000.0)
    single_s = time.perf_counter() - t_all
    # Several threads at once (FAISS releases the GIL; the store takes a read lock).
    per = np.array_split(np.arange(len(qs)), threads)

    def run(rows: np.ndarray) -> None:
        for i in rows:
            store.search(name, qs[i], k=k)

    workers = [threading.Thread(target=run, args=(rows,)) for rows in per]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    multi_s = time.perf_counter() - t0
    return {
        "p50_ms": common.percentile(lat, 50),
        "p99_ms": common.percentile(lat, 99),
        "qps_1_thread": len(qs) / single_s,
        f"qps_{threads}_threads": len(qs) / multi_s,
    }


def top_ids(store: Any, name: str, qs: np.ndarray, k: int, filter: Any = None) -> list[list[str]]:
    return [[h["id"] for h in store.search(name, q, k=k, filter=filter)] for q in qs]


def filtered_search(
    store: Any, name: str, qs: np.ndarray, k: int, truth: dict[str, list[list[str]]] | None
) -> tuple[dict[str, Any], dict[str, list[list[str]]]]:
    """Latency and recall@k of filtered searches at each selectivity of FILTERS."""
    out: dict[str, Any] = {}
    found_all: dict[str, list[list[str]]] = {}
    for label, flt in FILTERS.items():
        for q in qs[:3]:
            store.search(name, q, k=k, filter=flt)  # warm
        lat, found = [], []
        for q in qs:
            t0 = time.perf_counter()
            hits = store.search(name, q, k=k, filter=flt)
            lat.append((time.perf_counter() - t0) * 1000.0)
            found.append([h["id"] for h in hits])
        found_all[label] = found
        out[label] = {
            "p50_ms": common.percentile(lat, 50),
            "p99_ms": common.percentile(lat, 99),
            "mean_hits": float(np.mean([len(f) for f in found])),
            "recall_at_10": recall(found, truth[label], k) if truth else 1.0,
        }
    return out, found_all


def index_bytes(store: Any, name: str) -> dict[str, Any]:
    """The vector index's size: the serialized FAISS index (embedded) or pg_relation_size of
    the pgvector index and of the table (PostgreSQL)."""
    if getattr(store, "backend", "") == "postgres":
        with store._conn("measure") as conn:
            (serial,) = conn.execute(
                "SELECT serial FROM llave_collections WHERE name = %s", (name,)
            ).fetchone()
            table = f"llave_docs_{int(serial)}"
            ann = conn.execute("SELECT pg_relation_size(to_regclass(%s))", (f"{table}_ann",)).fetchone()[0]
            total = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (table,)).fetchone()[0]
        return {"index_bytes": ann or 0, "table_and_indexes_bytes": total}
    import faiss

    index = store._collections[name].live.index
    inner = getattr(index, "_index", None)
    if inner is None:  # FlatIndex
        inner = index._index
    serialize = (
        faiss.serialize_index_binary if isinstance(inner, faiss.IndexBinary) else faiss.serialize_index
    )
    return {"index_bytes": int(serialize(inner).nbytes), "mode": getattr(index, "mode", "flat")}


def pg_drop_index(store: Any, name: str) -> str | None:
    """Drop the collection's pgvector index; its definition, to create it after the load."""
    with store._conn("bulk load") as conn:
        (serial,) = conn.execute("SELECT serial FROM llave_collections WHERE name = %s", (name,)).fetchone()
        row = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = %s", (f"llave_docs_{int(serial)}_ann",)
        ).fetchone()
        if row is None:
            return None
        conn.execute(f"DROP INDEX llave_docs_{int(serial)}_ann")
        return row[0]


def pg_create_index(store: Any, indexdef: str, workers: int) -> float:
    t0 = time.perf_counter()
    with store._conn("bulk load") as conn, conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '2GB'")
        conn.execute(f"SET LOCAL max_parallel_maintenance_workers = {int(workers)}")
        conn.execute(indexdef)
    return time.perf_counter() - t0


def recall(found: list[list[str]], truth: list[list[str]], k: int) -> float:
    """Mean share of the true top k found (a filter matching fewer than k: of those that match)."""
    return float(
        np.mean(
            [len(set(f[:k]) & set(t[:k])) / max(1, len(t[:k])) for f, t in zip(found, truth, strict=True)]
        )
    )


# --------------------------------------------------------------------------- reload probe


def reload_probe(data_dir: str, name: str, n_queries: int, k: int, seed: int) -> dict[str, Any]:
    """Run in a fresh process: open the store, time it, measure memory and search before/after the build."""
    from service.storage.store import CollectionStore

    def anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    qs = queries(n_queries, seed=seed)
    import faiss  # noqa: F401  (import cost and its arenas before the baseline)

    base = anon()
    base_rss = common.rss_bytes()
    store = CollectionStore(data_dir)
    t0 = time.perf_counter()
    store.open()
    open_s = time.perf_counter() - t0
    lat_before = []
    for q in qs[: min(20, n_queries)]:
        s0 = time.perf_counter()
        store.search(name, q, k=k)
        lat_before.append((time.perf_counter() - s0) * 1000.0)
    store.wait_for_maintenance()
    build_s = time.perf_counter() - t0 - open_s
    lat_after = []
    for q in qs:
        s0 = time.perf_counter()
        store.search(name, q, k=k)
        lat_after.append((time.perf_counter() - s0) * 1000.0)
    rss = anon() - base
    peak = common.peak_rss_bytes() - base_rss  # includes the background build's transient copies
    count = store.describe(name)["count"]
    store.close()
    return {
        "open_s": open_s,
        "background_build_s": build_s,
        "ready_s": open_s + build_s,
        "search_p50_ms_while_building": common.percentile(lat_before, 50),
        "search_p50_ms_after": common.percentile(lat_after, 50),
        "rss_anon_bytes": rss,
        "rss_anon_gb_per_million": rss / 1e9 / (count / 1e6) if count else float("nan"),
        "peak_rss_gb_per_million": peak / 1e9 / (count / 1e6) if count else float("nan"),
        "count": count,
    }


def run_reload_probe(data_dir: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [common.PYTHON, __file__, "--_reload-probe", str(data_dir), name,
           "--queries", str(args.queries), "--seed", str(args.seed)]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env=common.offline_env(), cwd=common.REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- HTTP mode


class HttpServer:
    """``python -m service`` on the tiny model (the model does not matter for raw vectors)."""

    def __init__(self, checkpoint: Path, data_dir: Path, extra: list[str] | None = None) -> None:
        self.port = common.free_port()
        self.log_path = data_dir.parent / f"server-{data_dir.name}.log"
        cmd = [common.PYTHON, "-m", "service", "--model", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", str(data_dir), "--log-level", "info", *(extra or [])]  # fmt: skip
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                cmd, cwd=common.REPO, env=common.offline_env(), stdout=logf, stderr=logf
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, predicate: Any, timeout: float, what: str) -> float:
        import httpx

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            try:
                if predicate(httpx):
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server: {what} not reached in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def http_search(url: str, name: str, qs: np.ndarray, k: int, concurrency: int) -> dict[str, Any]:
    import httpx

    bodies = [json.dumps({"collection": name, "query": {"vector": q.tolist()}, "k": k}).encode() for q in qs]
    lat: list[float] = []
    it = iter(range(len(bodies)))
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 2)
    ) as c:
        for b in bodies[:5]:
            (
                await c.post("/search", content=b, headers={"content-type": "application/json"})
            ).raise_for_status()

        async def worker() -> None:
            for i in it:
                t0 = time.perf_counter()
                r = await c.post("/search", content=bodies[i], headers={"content-type": "application/json"})
                r.raise_for_status()
                lat.append((time.perf_counter() - t0) * 1000.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        span = time.perf_counter() - t0
    return {"concurrency": concurrency, "qps": len(bodies) / span, "p50_ms": common.percentile(lat, 50),
            "p99_ms": common.percentile(lat, 99)}  # fmt: skip


async def http_upsert(
    url: str, name: str, index: str, n: int, batch: int, concurrency: int, seed: int
) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 2)
    ) as c:
        (await c.put(f"/collections/{name}", json={"dim": DIM, "index": index})).raise_for_status()
        data = vectors(0, n, seed=seed, stream=3)
        starts = iter(range(0, n, batch))
        encode_s = 0.0

        async def worker() -> None:
            nonlocal encode_s
            for lo in starts:
                e0 = time.perf_counter()
                body = json.dumps(
                    {
                        "documents": [
                            {"id": f"h{lo + i}", "vector": v.tolist()}
                            for i, v in enumerate(data[lo : lo + batch])
                        ]
                    }
                ).encode()
                encode_s += time.perf_counter() - e0
                r = await c.post(
                    f"/collections/{name}/documents",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        span = time.perf_counter() - t0
        count = (await c.get(f"/collections/{name}")).json()["count"]
    assert count == n, (count, n)
    return {"n": n, "batch": batch, "concurrency": concurrency, "vectors_per_s": n / span,
            "client_encode_share": encode_s / span}  # fmt: skip


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from service.storage.store import CollectionStore

    pg_server = None
    if args.store == "postgres":
        from service.storage.postgres import PostgresCollectionStore

        if args.store_url is None:  # a throwaway PostgreSQL + pgvector (tests/postgres.py)
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.postgres import PostgresServer

            pg_server = PostgresServer(args.work_dir)
            pg_server.start()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    kinds = args.indexes.split(",")  # kind or kind:precision
    modes = set(args.modes.split(","))
    qs = queries(args.queries, seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix="llave-index-bench-", dir=args.work_dir))
    tiny = common.ensure_checkpoint("tiny", args.cache_dir) if "http" in modes else None
    result: dict[str, Any] = {
        "benchmark": "index",
        "command": "python bench/index.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dim": DIM,
        "rows": [],
    }
    try:
        for n in sizes:
            truth: list[list[str]] | None = None
            filtered_truth: dict[str, list[list[str]]] | None = None
            for spec in kinds:
                kind, _, precision = spec.partition(":")
                log(f"n={n:,} index={spec}: upserting ...")
                data_dir = root / f"{spec.replace(':', '-')}-{n}"
                row: dict[str, Any] = {"n": n, "index": spec}
                foreign = common.ForeignLoad()
                if args.store == "postgres":
                    url = (
                        pg_server.new_database(f"bench_{spec.replace(':', '_')}_{n}")
                        if pg_server
                        else args.store_url
                    )
                    store: Any = PostgresCollectionStore(url)
                    row["store"] = "postgres"
                else:
                    store = CollectionStore(data_dir)
                store.open()
                try:
                    if args.store == "postgres" and pg_server is None:
                        try:
                            store.delete_collection("bench")
                        except Exception:
                            pass
                    store.create_collection(
                        "bench",
                        DIM,
                        kind,
                        {"precision": precision} if precision else None,
                        indexes=None if args.no_payload_index else PAYLOAD_INDEXES,
                    )
                    indexdef = None
                    if args.store == "postgres" and kind == "hnsw":
                        indexdef = pg_drop_index(store, "bench")  # bulk load, then build (see above)
                    row["upsert"] = upsert_direct(store, "bench", n, args.batch, args.seed)
                    if indexdef is not None:
                        log("  building the pgvector HNSW index ...")
                        row["upsert"]["index_build_s"] = pg_create_index(
                            store, indexdef, args.pg_build_workers
                        )
                        row["upsert"]["vectors_per_s_incl_build"] = n / (
                            row["upsert"]["insert_s"] + row["upsert"]["index_build_s"]
                        )
                        log(f"  index built in {row['upsert']['index_build_s']:.1f} s")
                    row["memory"] = index_bytes(store, "bench")
                    row["memory"]["index_gb_per_million"] = row["memory"]["index_bytes"] / 1e9 / (n / 1e6)
                    log(f"  upsert: {row['upsert']['vectors_per_s']:,.0f} vectors/s "
                        f"(+{row['upsert']['maintenance_s']:.1f} s maintenance)")  # fmt: skip
                    common.wait_for_quiet(max_wait=args.quiet_wait)
                    search_load = common.ForeignLoad()
                    row["search"] = search_direct(store, "bench", qs, args.k, args.threads)
                    row["search"]["foreign_cpu_cores"] = search_load.cores()
                    found = top_ids(store, "bench", qs[: args.recall_queries], args.k)
                    if kind == "flat":
                        truth = found
                        row["recall_at_10"] = 1.0
                    elif truth is not None:
                        row["recall_at_10"] = recall(found, truth, args.k)
                    log(f"  search: p50 {row['search']['p50_ms']:.2f} ms, p99 {row['search']['p99_ms']:.2f} ms, "
                        f"recall@10 {row.get('recall_at_10', float('nan')):.3f}")  # fmt: skip
                    fqs = qs[: args.filter_queries]
                    row["filtered"], found_f = filtered_search(
                        store, "bench", fqs, args.k, None if kind == "flat" else filtered_truth
                    )
                    if kind == "flat":
                        filtered_truth = found_f
                    elif filtered_truth is None:
                        for v in row["filtered"].values():
                            v["recall_at_10"] = float("nan")
                    log("  filtered: " + ", ".join(
                        f"{sel} p50 {v['p50_ms']:.2f} ms recall {v['recall_at_10']:.3f}"
                        for sel, v in row["filtered"].items()))  # fmt: skip
                finally:
                    store.close()
                row["foreign_cpu_cores"] = foreign.cores()
                if args.store == "postgres" or args.no_reload:  # PostgreSQL: no in-process index to reload
                    result["rows"].append(row)
                    common.write_results(args.out_name, {**result, "machine": common.machine_info()})
                    continue
                log("  reloading in a fresh process ...")
                row["reload"] = run_reload_probe(data_dir, "bench", args)
                log(f"  reload: open {row['reload']['open_s']:.1f} s, build {row['reload']['background_build_s']:.1f} s, "
                    f"{row['reload']['rss_anon_gb_per_million']:.2f} GB anon RSS per million")  # fmt: skip
                # (--quick: over HTTP at the first size only)
                if "http" in modes and (not args.quick or n == sizes[0]):
                    row["http"] = run_http(tiny, data_dir, kind, n, qs, args)  # type: ignore[arg-type]
                result["rows"].append(row)
                shutil.rmtree(data_dir, ignore_errors=True)
                common.write_results(args.out_name, {**result, "machine": common.machine_info()})
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if pg_server is not None:
            pg_server.cleanup()
    result["machine"] = common.machine_info()
    return result


def run_http(
    tiny: Path, data_dir: Path, kind: str, n: int, qs: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    log("  HTTP: starting a server on the data directory ...")
    server = HttpServer(tiny, data_dir)
    out: dict[str, Any] = {}
    try:
        out["ready_s"] = server.wait(lambda h: h.get(server.url + "/ready").status_code == 200, 900, "ready")
        if kind != "flat":  # wait for the reloaded index: its saved snapshot, or a background build
            out["index_built_s"] = server.wait(
                lambda h: any(m in server.log_text() for m in ("rebuilt the", "loaded the saved")),
                3600,
                "index build",
            )
        out["search"] = [
            asyncio.run(http_search(server.url, "bench", qs, args.k, c)) for c in (1, args.http_concurrency)
        ]
        m = min(n, args.http_upsert_max)
        out["upsert"] = asyncio.run(
            http_upsert(server.url, f"http-{kind}", kind, m, 128, args.http_concurrency, args.seed)
        )
        log(f"  HTTP: search p50 {out['search'][0]['p50_ms']:.2f} ms, {out['search'][1]['qps']:.0f} QPS at "
            f"c={args.http_concurrency}; upsert {out['upsert']['vectors_per_s']:,.0f} vectors/s")  # fmt: skip
    finally:
        server.stop()
    return out


def report(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        th = next((k for k in r["search"] if k.startswith("qps_") and k != "qps_1_thread"), None)
        row = {
            "n": f"{r['n']:,}",
            "index": r["index"],
            "upsert_vec_s": r["upsert"]["vectors_per_s"],
            "upsert_last10%_vec_s": r["upsert"]["vectors_per_s_last_10pct"],
            "maint_s": r["upsert"]["maintenance_s"],
            "search_p50_ms": r["search"]["p50_ms"],
            "search_p99_ms": r["search"]["p99_ms"],
            "qps_1": r["search"]["qps_1_thread"],
            "qps_threads": r["search"][th] if th else float("nan"),
            "recall@10": r.get("recall_at_10", float("nan")),
            "store": r.get("store", "sqlite"),
        }
        if "memory" in r:
            row["index_GB_per_M"] = r["memory"]["index_gb_per_million"]
        if "index_build_s" in r["upsert"]:
            row["pg_index_build_s"] = r["upsert"]["index_build_s"]
        for sel, f in r.get("filtered", {}).items():
            row[f"filter{sel}_p50_ms"] = f["p50_ms"]
            row[f"filter{sel}_p99_ms"] = f["p99_ms"]
            row[f"filter{sel}_recall"] = f["recall_at_10"]
        if "reload" in r:
            row.update(
                {
                    "reload_open_s": r["reload"]["open_s"],
                    "reload_build_s": r["reload"]["background_build_s"],
                    "p50_ms_while_building": r["reload"]["search_p50_ms_while_building"],
                    "anon_GB_per_M": r["reload"]["rss_anon_gb_per_million"],
                    "peak_GB_per_M": r["reload"].get("peak_rss_gb_per_million", float("nan")),
                }
            )
        row.update(
            {
                "others_cores": r.get("foreign_cpu_cores", float("nan")),
            }
        )
        if "http" in r:
            h = r["http"]
            row.update(
                http_p50_ms=h["search"][0]["p50_ms"],
                http_p99_ms=h["search"][0]["p99_ms"],
                http_qps=h["search"][1]["qps"],
                http_upsert_vec_s=h["upsert"]["vectors_per_s"],
            )
        rows.append(row)
    cols = list(rows[0]) if rows else []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return common.table(
        rows, cols, title=f"Collection store, dim {result['dim']} (search k=10, one query at a time)"
    )


def selectivity_table(result: dict[str, Any]) -> str:
    """One row per index and filter selectivity: latency, recall@10 and index bytes per vector."""
    rows = []
    for r in result["rows"]:
        kind, _, precision = r["index"].partition(":")
        per_vector = r.get("memory", {}).get("index_bytes", float("nan")) / r["n"]
        cases = {"none": {**r["search"], "recall_at_10": r.get("recall_at_10", float("nan"))}}
        for sel, f in {**cases, **r.get("filtered", {})}.items():
            rows.append(
                {
                    "backend": r.get("store", "embedded"),
                    "n": f"{r['n']:,}",
                    "index": kind,
                    "precision": precision or "float32",
                    "selectivity": sel,
                    "p50_ms": f["p50_ms"],
                    "p99_ms": f["p99_ms"],
                    "recall@10": f["recall_at_10"],
                    "bytes/vector": per_vector,
                }
            )
    return common.table(rows, list(rows[0]) if rows else [], title="Filtered search by selectivity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated collection sizes")
    p.add_argument(
        "--indexes", default="flat,hnsw,ivf", help="index types (flat first: it is the recall truth)"
    )
    p.add_argument("--modes", default="store,http", help="store (always) and http (a real server)")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="backend: the embedded SQLite + FAISS store, or PostgreSQL + pgvector (store mode only)",
    )
    p.add_argument(
        "--store-url",
        default=None,
        help="with --store postgres: a postgresql:// URL (default: a throwaway embedded PostgreSQL)",
    )
    p.add_argument("--batch", type=int, default=1000, help="vectors per direct upsert call")
    p.add_argument("--queries", type=int, default=500, help="queries for latency/QPS")
    p.add_argument("--recall-queries", type=int, default=200, help="queries for recall@10")
    p.add_argument("--filter-queries", type=int, default=200, help="queries per filtered-search selectivity")
    p.add_argument(
        "--no-reload",
        action="store_true",
        help="skip the reload probe (a fresh process rebuilding the index)",
    )
    p.add_argument(
        "--no-payload-index",
        action="store_true",
        help="filter by scanning the metadata (no payload index on g and s)",
    )
    p.add_argument(
        "--pg-build-workers", type=int, default=1, help="parallel workers for the pgvector HNSW build"
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="threads for the concurrent-search QPS")
    p.add_argument("--http-concurrency", type=int, default=8, help="clients for HTTP QPS and upsert")
    p.add_argument("--http-upsert-max", type=int, default=20000, help="vectors upserted over HTTP per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE)
    p.add_argument("--work-dir", type=Path, default=None, help="where the stores are written (default: /tmp)")
    p.add_argument(
        "--quiet-wait", type=float, default=60.0, help="wait up to this long for quiet before timing searches"
    )
    p.add_argument("--quick", action="store_true", help="10k and 30k, fewer queries")
    p.add_argument("--tag", default="")
    p.add_argument(
        "--_reload-probe", nargs=2, metavar=("DIR", "NAME"), dest="reload_probe", help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.quick:
        explicit = set(sys.argv[1:] if argv is None else argv)
        if "--sizes" not in explicit:
            args.sizes = "10000,30000"
        if "--queries" not in explicit:
            args.queries = 200
        if "--recall-queries" not in explicit:
            args.recall_queries = 100
        if "--http-upsert-max" not in explicit:
            args.http_upsert_max = 5000
        if "--quiet-wait" not in explicit:
            args.quiet_wait = 0.0
    if args.store == "postgres":
        args.modes = "store"
    args.out_name = (
        "index"
        + ("-postgres" if args.store == "postgres" else "")
        + (f"-{args.tag}" if args.tag else "")
        + ("-quick" if args.quick and not args.tag else "")
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reload_probe:
        print(
            json.dumps(
                reload_probe(args.reload_probe[0], args.reload_probe[1], args.queries, args.k, args.seed)
            )
        )
        return
    result = run(args)
    common.write_results(args.out_name, result)
    print(report(result))
    print(selectivity_table(result))


if __name__ == "__main__":
    main()
