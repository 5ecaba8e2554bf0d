"""The embedded store in its own process, for several front ends.

SQLite is the source of truth and FAISS an in-memory index of it, so exactly one process
may hold them. With several front ends (``--api-workers`` > 1), that process is this one:
it opens the store and answers calls from every front end over a ZeroMQ socket (ROUTER in
front, a pool of threads behind, since the store is thread-safe). An acknowledged upsert
is committed (SQLite, synchronous) and in the index before its answer leaves this process,
so the next search from any front end sees it. With one front end, or with PostgreSQL
(which several processes share by design), the store is opened in the front end itself.

``StoreClient`` is the front ends' proxy: every store method, called in a thread as the
routes do (``asyncio.to_thread``), becomes one request/reply; the store's own errors come
back as they were raised. A call that gets no answer in time (the store process died or
hangs) raises ``StoreUnavailableError`` (503).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from service.inference import ipc
from service.storage.errors import StoreUnavailableError

logger = logging.getLogger("llave.store.server")

STORE_THREADS = 8
CALL_TIMEOUT_S = 120.0


def _worker(ctx: Any, store: Any) -> None:
    import zmq

    sock = ctx.socket(zmq.REP)
    sock.connect("inproc://store-workers")
    while True:
        try:
            method, args, kwargs = ipc.load(sock.recv())
        except zmq.ContextTerminated:
            return
        try:
            if method.startswith("_") or method in ("open", "close"):
                raise AttributeError(f"store method {method!r} is not callable remotely")
            reply = (True, getattr(store, method)(*args, **kwargs))
        except Exception as exc:  # the store's errors travel back as they are
            reply = (False, exc)
        try:
            sock.send(ipc.dump(reply))
        except zmq.ContextTerminated:
            return


def main(data_dir: str, index_snapshots: bool, address: str, log_level: str) -> None:
    """Entry point of the store process."""
    import zmq

    from service.proctitle import exit_with_parent, set_role
    from service.storage.store import CollectionStore

    exit_with_parent()
    set_role("store")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the store stops
    store = CollectionStore(Path(data_dir), index_snapshots=index_snapshots)
    store.open()
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    front.bind(address)
    back = ctx.socket(zmq.DEALER)
    back.bind("inproc://store-workers")
    for i in range(STORE_THREADS):
        threading.Thread(target=_worker, args=(ctx, store), name=f"llave-store-{i}", daemon=True).start()

    def stop(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    logger.info("collection store open in %s, serving front ends", data_dir)
    try:
        zmq.proxy(front, back)
    except (SystemExit, zmq.ContextTerminated):
        pass
    finally:
        # A clean stop: saves index snapshots. Calls in flight when SIGTERM arrived were
        # either committed (answered or not) or never started: SQLite has no half batch.
        store.close()
        front.close(linger=0)
        back.close(linger=0)
        ctx.term()
    sys.exit(0)


class StoreClient:
    """A front end's proxy for the store process (same methods as the store)."""

    def __init__(self, address: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        import zmq

        self.address = address
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context.instance()
        self._local = threading.local()

    def _socket(self) -> Any:
        import zmq

        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            sock.connect(self.address)
            self._local.sock = sock
        return sock

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import zmq

        sock = self._socket()
        try:
            sock.send(ipc.dump((method, args, kwargs)))
            ok, value = ipc.load(sock.recv())
        except zmq.Again:
            sock.close()  # a REQ socket that missed its reply cannot be reused
            self._local.sock = None
            raise StoreUnavailableError("the collection store did not answer in time") from None
        if not ok:
            raise value
        return value

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self.call(method, *args, **kwargs)

    def close(self) -> None:
        """Close this thread's socket (the store process stays up)."""
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None
