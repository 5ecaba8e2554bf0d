"""What keeping documents' sources costs: thumbnail making, upsert and search, embedded store.

    python bench/sources.py              # 2,000 documents, 5 repeats
    python bench/sources.py --quick      # 300 documents, 1 repeat

1. ``make_thumbnail`` (``service/storage/sources.py``) on synthetic photos-like images (smooth
   gradients plus noise, so the encoders have real work): CPU ms per image and thumbnail
   bytes, per input size and format, at the default 256 px. A large JPEG is decoded at a
   reduced DCT scale (``draft``); the table shows the same image as PNG for comparison.
2. The embedded store (SQLite + FLAT): upserts of 64-d vectors in batches of 32 with a
   source per document (a ~120-character text and one 256-px WebP thumbnail, made once
   and reused so only storage is timed) against the same documents in a collection with
   ``store_source: false``; then ``search`` (k=10) without and with
   ``include=["text", "thumbnail"]``, the configurations and query kinds interleaved.
   Reports documents/s (best and median), the best ms per search and the database size.

Results: tables on stdout and ``bench/results/sources[-quick].json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    rgb += rng.normal(0, 12, rgb.shape)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def time_thumbnails(repeats: int) -> list[dict[str, Any]]:
    from model.inputs import ImageLimits
    from service.storage.sources import make_thumbnail

    limits = ImageLimits(max_pixels=4096 * 4096)
    rows = []
    for w, h, src_fmt in ((640, 480, "PNG"), (1920, 1080, "JPEG"), (4000, 3000, "JPEG"), (4000, 3000, "PNG")):
        data = photo(w, h, src_fmt)
        for fmt in ("webp", "jpeg"):
            make_thumbnail(data, 256, fmt, limits)  # warm up
            times = []
            for _ in range(repeats):
                start = time.process_time()
                thumb = make_thumbnail(data, 256, fmt, limits)
                times.append((time.process_time() - start) * 1e3)
            rows.append(
                {
                    "input": f"{w}x{h} {src_fmt}",
                    "input KB": round(len(data) / 1024),
                    "format": fmt,
                    "CPU ms (median)": round(statistics.median(times), 1),
                    "thumbnail bytes": len(thumb.data),
                }
            )
    return rows


def time_store(n: int, repeats: int) -> list[dict[str, Any]]:
    from service.storage.sources import Source, make_thumbnail
    from service.storage.store import CollectionStore

    thumb = make_thumbnail(photo(640, 480, "PNG"), 256, "webp")
    text = "a photo of a red circle next to a blue square, taken on a sunny afternoon in the park " * 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    ids = [f"doc-{i:06d}" for i in range(n)]
    runs: dict[bool, dict[str, list[float]]] = {
        keep: {"rate": [], "search": [], "include": [], "size": []} for keep in (False, True)
    }
    for _ in range(repeats):  # the two configurations interleaved: load drifts hit both alike
        for keep in (False, True):
            run = runs[keep]
            with tempfile.TemporaryDirectory() as d, CollectionStore(d, background_rebuild=False) as store:
                store.create_collection("c", 64, source={"store_source": keep})
                start = time.perf_counter()
                for s in range(0, n, 32):
                    batch = slice(s, s + 32)
                    store.upsert(
                        "c", ids[batch], x[batch], sources=[Source(text, (thumb,))] * len(ids[batch])
                    )
                run["rate"].append(n / (time.perf_counter() - start))
                for _ in range(3):
                    for key, include in (("search", []), ("include", ["text", "thumbnail"])):
                        start = time.perf_counter()
                        for q in x[:100]:
                            store.search("c", q, 10, include=include)
                        run[key].append((time.perf_counter() - start) / 100 * 1e3)
                store.close()
                run["size"].append(sum(p.stat().st_size for p in Path(d).glob("store.sqlite3*")))
    return [
        {
            "store_source": keep,
            "docs/s (best)": round(max(run["rate"])),
            "docs/s (median)": round(statistics.median(run["rate"])),
            "search ms (best)": round(min(run["search"]), 3),
            "search+include ms (best)": round(min(run["include"]), 3),
            "db MB": round(statistics.median(run["size"]) / 2**20, 2),
        }
        for keep, run in runs.items()
    ]


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.docs, args.repeats = 300, 1
    thumbs = time_thumbnails(max(3, args.repeats))
    print("make_thumbnail, 256 px (CPU time of this process)\n" + table(thumbs) + "\n")
    store = time_store(args.docs, args.repeats)
    print(f"embedded store, {args.docs} docs of 64-d, batches of 32\n" + table(store))
    out = Path(__file__).resolve().parent / "results" / f"sources{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"args": vars(args), "thumbnails": thumbs, "store": store}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
