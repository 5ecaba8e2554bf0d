"""Video on CPU: decode ms per clip, embedded clips/s, and decoding's share of the time.

    python bench/video.py                          # tiny checkpoint, 4 clips, 3 repeats
    python bench/video.py --quick                  # 2 clips, 1 repeat (smoke check)
    python bench/video.py --big                    # also the LLaVE-0.5B-shaped model on the short clip

Clips are encoded here with PyAV (libx264, yuv420p, FFmpeg's default key-frame interval of
250 frames, no audio), shaped like the retrieval sets: a 1-second clip, MSR-VTT-like
320x240 at 30 fps for 10 s, MSVD-like 640x360 at 25 fps, and 1280x720 at 30 fps.

1. **Decode**: ``model.video.decode_video`` (packets read, the authors' frame indices, each
   kept frame decoded from its key frame and squashed to the crop, bicubic) plus
   ``frames_to_pixels`` (rescale and normalise), at the tiny tower's 64 px and at LLaVE's
   384 px. Wall ms per clip (median and best of the repeats) and the frames the decoder had
   to produce to reach the kept ones.
2. **Embed**: ``Embedder.preprocess`` (everything on the CPU side: parse, decode, pixels,
   prompt, tokens; what a server's front end does) and ``Embedder.forward`` (tower,
   projector, 2x2 pooling, splice, the language model; what the engine does), one clip at
   a time and, for the tiny model, in batches of 4. ``clips/s`` is one clip after the other
   (preprocess + forward); ``decode share`` is preprocess / (preprocess + forward).
   ``--big`` adds the random LLaVE-0.5B-shaped checkpoint (``model.tiny --preset
   llave-0.5b``: SigLIP so400m at 384 px + Qwen2-0.5B, float32 on CPU) on the 1-second
   clip only: a 32-frame clip is 6,720 visual tokens, minutes per clip on two cores.

The machine is shared: the load average and the CPU other processes took during the run
are recorded with the results. Results: tables on stdout and
``bench/results/video[-quick].json``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ForeignLoad,
    ensure_checkpoint,
    load_average,
    log,
    machine_info,
    table,
    write_results,
)

# name -> (width, height, fps, seconds)
CLIPS = {
    "short 320x240 30fps 1s": (320, 240, 30, 1),
    "msrvtt-like 320x240 30fps 10s": (320, 240, 30, 10),
    "msvd-like 640x360 25fps 10s": (640, 360, 25, 10),
    "hd 1280x720 30fps 10s": (1280, 720, 30, 10),
}
QUICK_CLIPS = ("short 320x240 30fps 1s", "msrvtt-like 320x240 30fps 10s")


def encode_clip(width: int, height: int, fps: int, seconds: float) -> bytes:
    """A clip whose every frame differs: a drifting colour gradient, two moving shapes and
    coarse block noise, so the encoder (and the decoder) have real work."""
    import av

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    n = int(fps * seconds)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            t = i / max(n - 1, 1)
            img = np.stack(
                [x / width * 200 + 40 * t, y / height * 200, (x + y) / (width + height) * 255 * (1 - t)],
                axis=-1,
            )
            blocks = rng.normal(0, 10, (height // 16 + 1, width // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)
            img += blocks[:height, :width]
            side = height // 5
            cx = int((width - side) * t)
            img[height // 4 : height // 4 + side, cx : cx + side] = (230, 40, 40)
            cy = int((height - side) * (1 - t))
            img[cy : cy + side, width // 2 : width // 2 + side] = (40, 40, 230)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def _stats(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "best": min(times), "all": times}


def time_decode(clips: dict[str, bytes], repeats: int) -> list[dict[str, Any]]:
    from model.video import decode_video, frames_to_pixels

    rows = []
    for name, data in clips.items():
        for size in (64, 384):
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                decoded = decode_video(data, size=size)
                frames_to_pixels(decoded.frames, [0.5] * 3, [0.5] * 3)
                times.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
            rows.append(
                {
                    "clip": name,
                    "KB": round(len(data) / 1024),
                    "stream frames": decoded.info.frames,
                    "kept": len(decoded.indices),
                    "decoded": decoded.decoded_frames,
                    "crop": size,
                    "ms (median)": statistics.median(times),
                    "ms (best)": min(times),
                    "CPU ms (median)": statistics.median(cpu),
                    "times_ms": times,
                }
            )
    return rows


def time_embed(preset: str, clips: dict[str, bytes], repeats: int, batch: int) -> list[dict[str, Any]]:
    import torch

    from model import load_embedder
    from model.video import VIDEO_TEXT

    checkpoint = ensure_checkpoint(preset)
    emb = load_embedder(str(checkpoint), device="cpu", dtype="float32")
    emb.embed([{"text": "warm up"}])
    rows = []
    for name, data in clips.items():
        inp = {"video": data, "text": VIDEO_TEXT}
        emb.forward([emb.preprocess(inp)])  # warm up this shape
        pre, fwd = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            prep = emb.preprocess(inp)
            t1 = time.perf_counter()
            emb.forward([prep])
            pre.append((t1 - t0) * 1e3)
            fwd.append((time.perf_counter() - t1) * 1e3)
        row: dict[str, Any] = {
            "model": preset,
            "clip": name,
            "frames": prep.video_frames[0],
            "tokens": prep.cost,
            "preprocess ms": statistics.median(pre),
            "forward ms": statistics.median(fwd),
            "clips/s": 1e3 / (statistics.median(pre) + statistics.median(fwd)),
            "decode share": statistics.median(pre) / (statistics.median(pre) + statistics.median(fwd)),
            "preprocess_ms": pre,
            "forward_ms": fwd,
            "torch_threads": torch.get_num_threads(),
        }
        if batch > 1:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                emb.forward([prep] * batch)
                times.append((time.perf_counter() - t0) * 1e3)
            per_clip = statistics.median(times) / batch
            row[f"forward ms/clip (batch {batch})"] = per_clip
            row[f"clips/s (batch {batch})"] = 1e3 / (statistics.median(pre) + per_clip)
            row["batched_forward_ms"] = times
        rows.append(row)
        log(f"{preset} {name}: preprocess {row['preprocess ms']:.0f} ms, forward {row['forward ms']:.0f} ms")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two clips, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="batch size of the batched tiny forward")
    p.add_argument("--big", action="store_true", help="also the LLaVE-0.5B-shaped model on the 1-second clip")
    args = p.parse_args()
    repeats = 1 if args.quick else args.repeats
    names = QUICK_CLIPS if args.quick else tuple(CLIPS)
    info = machine_info()
    log("encoding the clips ...")
    clips = {name: encode_clip(*CLIPS[name]) for name in names}
    foreign = ForeignLoad()
    started = time.perf_counter()
    decode = time_decode(clips, repeats)
    embed = time_embed("tiny", clips, repeats, args.batch)
    if args.big:
        short = {n: clips[n] for n in names[:1]}
        embed += time_embed("llave-0.5b", short, 1, 1)
    result = {
        "machine": info,
        "load_average_at_end": load_average(),
        "foreign_cores_during_run": foreign.cores(),
        "seconds": time.perf_counter() - started,
        "args": vars(args),
        "clips": {n: {"width_height_fps_seconds": CLIPS[n], "bytes": len(clips[n])} for n in names},
        "decode": decode,
        "embed": embed,
    }
    print(
        table(
            decode,
            [
                "clip",
                "KB",
                "stream frames",
                "kept",
                "decoded",
                "crop",
                "ms (median)",
                "ms (best)",
                "CPU ms (median)",
            ],
            "Decoding (PyAV, the authors' frame indices, squash to the crop, normalise), per clip",
        )
    )
    cols = ["model", "clip", "frames", "tokens", "preprocess ms", "forward ms", "clips/s", "decode share"]
    if args.batch > 1:
        cols += [f"forward ms/clip (batch {args.batch})", f"clips/s (batch {args.batch})"]
    print(table(embed, cols, "Embedding one clip after the other on CPU (float32), medians"))
    print(
        f"\nload average at start {info['load_average_at_start']}, at end {result['load_average_at_end']}; "
        f"other processes used {result['foreign_cores_during_run']:.2f} cores during the run"
    )
    write_results("video-quick" if args.quick else "video", result)


if __name__ == "__main__":
    main()
