"""``python -m service``: the process tree of one server.

With ``--api-workers 1``: this process is the front end (uvicorn, HTTP, preprocessing,
the store) and supervises the engine processes (the model: one per device, ``--devices``).

With ``--api-workers N`` > 1: this process only supervises. It binds the listening socket
once and starts

- the engine processes (``service/inference/engine.py``), one per device, each restarted
  alone when it dies;
- the store process (``service/storage/server.py``) when collections are in the embedded
  store (PostgreSQL is opened by every front end instead);
- N front-end processes that share the listening socket (the kernel spreads connections
  among them), each with its own event loop and preprocessing threads, each sending every
  request to the least loaded engine; a front end that dies is started again.

SIGTERM (or Ctrl-C) stops the front ends first (each finishes its in-flight requests), then
the engines and the store. When no engine can be kept alive (``--engine-restarts`` spent,
or the model does not load; with ``--require-all-devices``, any engine) the server exits
with status 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from service.settings import Settings, configure_logging

logger = logging.getLogger("llave.server")

FRONT_END_RESTARTS = 10


def _uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    from service.http.connections import uvicorn_options

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # the logging configured at start-up
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        # Keep-alive, header and body deadlines, connection cap: service/http/connections.py.
        **uvicorn_options(settings, app.state.metrics),
    )


def serve_one(settings: Settings, embedder_factory: str | None = None) -> int:
    """One front end in this process, supervising its own engine process."""
    import uvicorn

    from service.http.app import create_app

    gave_up = threading.Event()
    server: uvicorn.Server | None = None

    def give_up() -> None:
        gave_up.set()
        if server is not None:
            server.should_exit = True  # uvicorn's graceful shutdown, then exit status 1

    app = create_app(settings, embedder_factory=embedder_factory, on_engine_give_up=give_up)
    server = uvicorn.Server(_uvicorn_config(app, settings))
    server.run()
    return 1 if gave_up.is_set() else 0


def _front_end(
    index: int,
    settings: Settings,
    sock: socket.socket,
    link: Any,
    store_address: str | None,
    embedder_factory: str | None,
) -> None:
    """Entry point of a front-end process."""
    import uvicorn

    from service.http.app import create_app
    from service.proctitle import exit_with_parent, set_role

    exit_with_parent()
    set_role(f"api-{index}")
    configure_logging(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor sends SIGTERM
    store = None
    if store_address is not None:
        from service.storage.server import StoreClient

        store = StoreClient(store_address, timeout_s=settings.request_timeout_s)
    app = create_app(settings, engine=link, store=store, embedder_factory=embedder_factory)
    server = uvicorn.Server(_uvicorn_config(app, settings))
    server.run(sockets=[sock])


class Child:
    """A supervised child process (front end or store)."""

    def __init__(self, name: str, target: Any, args: tuple[Any, ...], restarts: int) -> None:
        self.name, self.target, self.args, self.restarts_left = name, target, args, restarts
        self.proc: Any = None

    def start(self, ctx: Any) -> None:
        self.proc = ctx.Process(target=self.target, args=self.args, name=self.name)
        self.proc.start()


def serve_many(settings: Settings, embedder_factory: str | None = None) -> int:
    from service.http.app import EngineLink
    from service.inference.supervisor import EngineGroup, _forget_metrics

    ctx = multiprocessing.get_context("spawn")
    run_dir = tempfile.mkdtemp(prefix="llave-")
    stop = threading.Event()
    exit_code = 0

    def on_give_up() -> None:
        nonlocal exit_code
        exit_code = 1
        stop.set()

    engines = EngineGroup(
        settings.engine_configs(embedder_factory),
        run_dir,
        log_level=settings.log_level,
        require_all=settings.require_all_devices,
        on_give_up=on_give_up,
    )
    engines.start()
    children: list[Child] = []
    store_address = None
    if not settings.store_url:
        from service.inference import ipc
        from service.storage import server as store_server

        store_address = ipc.endpoint(run_dir, "store")
        children.append(
            Child(
                "llave-store",
                store_server.main,
                (str(settings.data_dir), settings.index_snapshots, store_address, settings.log_level),
                settings.engine_restarts,
            )
        )
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    link = EngineLink(tuple(engines.links), queue_share=settings.front_end_queue_share)
    for i in range(settings.api_workers):
        children.append(
            Child(
                f"llave-api-{i}",
                _front_end,
                (i, settings, sock, link, store_address, embedder_factory),
                FRONT_END_RESTARTS,
            )
        )
    for child in children:
        child.start(ctx)
    logger.info(
        "%d front ends, engine process%s %s%s",
        settings.api_workers,
        "es" if len(engines.pids) > 1 else "",
        ", ".join(str(pid) for pid in engines.pids),
        ", store process" if store_address else "",
    )

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.is_set():
        sentinels = {c.proc.sentinel: c for c in children}
        ready = wait(list(sentinels), timeout=0.2)
        for sentinel in ready:
            child = sentinels[sentinel]
            child.proc.join()
            _forget_metrics(child.proc.pid)
            if stop.is_set():
                break
            if child.restarts_left <= 0:
                logger.critical("%s died (exit code %s) too often; stopping", child.name, child.proc.exitcode)
                exit_code = 1
                stop.set()
                break
            child.restarts_left -= 1
            logger.error("%s died (exit code %s); starting it again", child.name, child.proc.exitcode)
            child.start(ctx)
    # Front ends first: they finish their requests, which need the engine and the store.
    front_ends = [c for c in children if c.name.startswith("llave-api")]
    for child in front_ends:
        if child.proc.is_alive():
            child.proc.terminate()
    deadline = time.monotonic() + settings.shutdown_timeout_s + 10
    for child in front_ends:
        child.proc.join(max(0.1, deadline - time.monotonic()))
        if child.proc.is_alive():
            child.proc.kill()
            child.proc.join()
    engines.stop()
    for child in children:
        if child not in front_ends and child.proc.is_alive():
            child.proc.terminate()
            child.proc.join(30)
            if child.proc.is_alive():
                child.proc.kill()
    sock.close()
    _cleanup(run_dir)
    return exit_code


def _cleanup(run_dir: str) -> None:
    name = Path(run_dir).name
    for leftover in Path("/dev/shm").glob(f"llave-{name}-*"):  # segments of killed front ends
        leftover.unlink(missing_ok=True)
    for path in Path(run_dir).iterdir():
        path.unlink(missing_ok=True)
    Path(run_dir).rmdir()


def serve(settings: Settings, embedder_factory: str | None = None) -> int:
    """Run the server until SIGTERM; the process's exit status."""
    from service.proctitle import set_role

    set_role("server")
    if settings.api_workers == 1:
        return serve_one(settings, embedder_factory)
    return serve_many(settings, embedder_factory)
