"""How front ends and the engine process should talk: measured, not assumed.

    python bench/ipc.py                  # table on stdout, bench/results/ipc.json
    python bench/ipc.py --round-trips 2000 --pixel-mb 8,32

Two questions, each measured between two real processes on this machine:

1. Messages (a text request: a ~300-byte header out, one 896-float vector back): round-trip
   time and the CPU it costs, over a ZeroMQ DEALER/ROUTER pair on an ``ipc://`` endpoint
   (what the server uses), a ``multiprocessing`` Pipe, and a ``multiprocessing`` Queue.
2. Pixels (one request's image crops, MB of float32): time from the front end having the
   array to the engine having a usable array, pickled through the ZeroMQ socket against
   written once into POSIX shared memory and mapped by the engine (what the server uses).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 896
HEADER = {"id": 1, "shm": None, "items": [(list(range(40)), [], None)]}


# --- echo servers (the "engine" side) ------------------------------------------------------


def zmq_echo(address: str, n: int) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    reply = np.zeros(DIM, np.float32).tobytes()
    for _ in range(n):
        ident, kind, header = sock.recv_multipart()
        pickle.loads(header)
        sock.send_multipart([ident, b"ok", header, reply])
    sock.close()


def pipe_echo(conn, n: int) -> None:  # type: ignore[no-untyped-def]
    reply = np.zeros(DIM, np.float32)
    for _ in range(n):
        conn.recv()
        conn.send(reply)


def queue_echo(inq, outq, n: int) -> None:  # type: ignore[no-untyped-def]
    reply = np.zeros(DIM, np.float32)
    for _ in range(n):
        inq.get()
        outq.put(reply)


def zmq_pixels(address: str, n: int) -> None:
    import zmq

    from service.inference import ipc

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    for _ in range(n):
        ident, kind, payload = sock.recv_multipart(copy=False)
        if kind.bytes == b"pickle":
            arr = pickle.loads(payload.buffer)
            arr.sum(dtype=np.float64)  # touch it, as collate does
        else:
            name, shape = pickle.loads(payload.buffer)
            seg = ipc.open_pixels(name)
            view = ipc.view_pixels(seg, ipc.PixelSlot(0, shape))
            view.sum(dtype=np.float64)
            del view
            ipc.release(seg, unlink=False)
        sock.send_multipart([ident, b"done"])
    sock.close()


# --- clients -----------------------------------------------------------------------------


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def bench_messages(round_trips: int) -> list[dict]:
    import zmq

    ctx = mp.get_context("spawn")
    rows = []
    run_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    address = f"ipc://{run_dir}/llave-bench-ipc-{os.getpid()}.sock"

    # ZeroMQ
    proc = ctx.Process(target=zmq_echo, args=(address, round_trips + 100))
    proc.start()
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    header = pickle.dumps(HEADER)
    times = []
    for i in range(round_trips + 100):
        t0 = time.perf_counter()
        sock.send_multipart([b"embed", header])
        frames = sock.recv_multipart()
        np.frombuffer(frames[2], np.float32)
        if i >= 100:
            times.append(time.perf_counter() - t0)
    proc.join()
    sock.close()
    rows.append(_summary("ZeroMQ DEALER/ROUTER (ipc://)", times))

    # Pipe
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=pipe_echo, args=(child, round_trips + 100))
    proc.start()
    times = []
    for i in range(round_trips + 100):
        t0 = time.perf_counter()
        parent.send(HEADER)
        parent.recv()
        if i >= 100:
            times.append(time.perf_counter() - t0)
    proc.join()
    rows.append(_summary("multiprocessing Pipe", times))

    # Queue
    inq, outq = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=queue_echo, args=(inq, outq, round_trips + 100))
    proc.start()
    times = []
    for i in range(round_trips + 100):
        t0 = time.perf_counter()
        inq.put(HEADER)
        outq.get()
        if i >= 100:
            times.append(time.perf_counter() - t0)
    proc.join()
    rows.append(_summary("multiprocessing Queue", times))
    return rows


def bench_pixels(megabytes: list[float], repeats: int) -> list[dict]:
    import zmq

    from service.inference import ipc

    ctx = mp.get_context("spawn")
    address = f"ipc:///tmp/llave-bench-pix-{os.getpid()}.sock"
    total = len(megabytes) * repeats * 2
    proc = ctx.Process(target=zmq_pixels, args=(address, total))
    proc.start()
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    rows = []
    for mb in megabytes:
        n = int(mb * 1024 * 1024 / 4)
        arr = np.random.default_rng(0).random(n, dtype=np.float32)
        for how in ("pickle", "shm"):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                if how == "pickle":
                    sock.send_multipart([b"pickle", pickle.dumps(arr, protocol=5)])
                    sock.recv_multipart()
                else:
                    seg, slots = ipc.put_pixels([arr], f"llave-bench-{os.getpid()}")
                    sock.send_multipart([b"shm", pickle.dumps((seg.name, slots[0].shape))])
                    sock.recv_multipart()
                    ipc.release(seg, unlink=True)
                times.append(time.perf_counter() - t0)
            label = "pickled through the socket" if how == "pickle" else "shared memory"
            rows.append({**_summary(f"{mb:g} MB pixels, {label}", times), "mb": mb, "how": how})
    proc.join()
    sock.close()
    return rows


def _summary(name: str, times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {
        "name": name,
        "n": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "mean_ms": statistics.fmean(ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=3000)
    ap.add_argument("--pixel-mb", default="2,10,40", help="comma-separated sizes in MB")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ipc.json")
    args = ap.parse_args()
    messages = bench_messages(args.round_trips)
    pixels = bench_pixels([float(x) for x in args.pixel_mb.split(",")], args.repeats)
    print(f"{'channel':<48} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for row in messages + pixels:
        print(f"{row['name']:<48} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['mean_ms']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"messages": messages, "pixels": pixels, "cpus": os.cpu_count()}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
