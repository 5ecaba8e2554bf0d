"""Starts the engine processes (one per device), watches each, and restarts it when it dies.

A thread waits on the process's sentinel, so a death is seen the moment it happens: the
status board turns ``dead`` (every front end's ``/health`` answers 503 and its waiting
requests get 503 within milliseconds), then the process is started again with the next
generation number, at most ``engine_restarts`` times in the server's life (each logged).
A model that fails to load is not restarted (it would fail again). When the supervisor
gives up it calls ``on_give_up``.

``EngineGroup`` runs one ``EngineSupervisor`` per device (``--devices``): each engine is
restarted alone while the others keep serving, and the server is given up on (it exits
non-zero, for an orchestrator to restart it whole) when no engine is left, or, with
``--require-all-devices``, when any one is.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path

from service.inference import engine, ipc
from service.inference.config import EngineConfig

logger = logging.getLogger("llave.supervisor")


class EngineSupervisor:
    def __init__(
        self,
        config: EngineConfig,
        run_dir: str | Path,
        *,
        index: int = 0,
        log_level: str = "info",
        on_give_up: Callable[[], None] | None = None,
        role: str = "engine",
    ) -> None:
        self.config = config
        self.index = index
        self.role = role  # the process title's role: engine, or engine-N among several
        self.run_dir = Path(run_dir)
        self.address = ipc.endpoint(self.run_dir, f"engine-{index}")
        self.board_path = str(self.run_dir / f"engine-{index}.status")
        self.log_level = log_level
        self.on_give_up = on_give_up
        self.restarts = 0
        self.gave_up = False
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._thread: threading.Thread | None = None
        self.board: ipc.StatusBoard | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self.board = ipc.StatusBoard(self.board_path, create=True)
        self._spawn(1)
        self._thread = threading.Thread(target=self._watch, name=f"llave-{self.role}-watch", daemon=True)
        self._thread.start()

    def _spawn(self, generation: int) -> None:
        assert self.board is not None
        self.board.write(ipc.STARTING, generation=generation)
        proc = self._ctx.Process(
            target=engine.main,
            args=(self.config, self.address, self.board_path, generation, self.log_level, self.role),
            name=f"llave-{self.role}-{generation}",
        )
        proc.start()
        self.board.write(ipc.STARTING, pid=proc.pid)
        self._proc = proc
        logger.info(
            "%s process %d started on %s (generation %d)", self.role, proc.pid, self.config.device, generation
        )

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            assert proc is not None and self.board is not None
            ready = wait([proc.sentinel, self._wake_r])
            if self._stopping.is_set() or proc.sentinel not in ready:
                return
            proc.join()
            code = proc.exitcode
            _forget_metrics(proc.pid)
            state = self.board.state
            self.board.write(ipc.DEAD)
            self.board.set_load(0, 0)
            if state == ipc.FAILED or code == engine.EXIT_LOAD_FAILED:
                self.board.write(ipc.FAILED)
                logger.critical(
                    "the model could not be loaded on %s (%s exit code %s); not restarting",
                    self.config.device,
                    self.role,
                    code,
                )
                self._give_up()
                return
            if self.restarts >= self.config.engine_restarts:
                self.board.write(ipc.FAILED)
                logger.critical(
                    "the %s process died (exit code %s) and was restarted %d times already; giving up",
                    self.role,
                    code,
                    self.restarts,
                )
                self._give_up()
                return
            self.restarts += 1
            self.board.count_restart()
            generation = self.board.generation + 1
            logger.error(
                "the %s process died (exit code %s); restarting it (%d of at most %d)",
                self.role,
                code,
                self.restarts,
                self.config.engine_restarts,
            )
            self.board.write(ipc.RESTARTING, generation=generation)
            self._spawn(generation)

    def _give_up(self) -> None:
        self.gave_up = True
        if self.on_give_up is not None:
            self.on_give_up()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the engine (it finishes what it holds), wait, then kill if need be."""
        self._stopping.set()
        self._wake_w.send(b"")
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                logger.warning("the %s process did not stop within %g s; killing it", self.role, timeout)
                proc.kill()
                proc.join()
        if self._thread is not None:
            self._thread.join(5)
        if self.board is not None:
            self.board.write(ipc.STOPPED)
            self.board.close()
            self.board = None


class EngineGroup:
    """One supervised engine per configuration (one per device), started and stopped together."""

    def __init__(
        self,
        configs: Sequence[EngineConfig],
        run_dir: str | Path,
        *,
        log_level: str = "info",
        require_all: bool = False,
        on_give_up: Callable[[], None] | None = None,
    ) -> None:
        self.require_all = require_all
        self.on_give_up = on_give_up
        self._gave_up = False
        several = len(configs) > 1
        self.supervisors = [
            EngineSupervisor(
                config,
                run_dir,
                index=config.index,
                log_level=log_level,
                on_give_up=self._one_gave_up,
                role=f"engine-{config.index}" if several else "engine",
            )
            for config in configs
        ]

    @property
    def links(self) -> list[tuple[str, str, str]]:
        """(address, status board, device) of each engine, for the front ends."""
        return [(s.address, s.board_path, s.config.device) for s in self.supervisors]

    @property
    def pids(self) -> list[int | None]:
        return [s.pid for s in self.supervisors]

    def start(self) -> None:
        for supervisor in self.supervisors:
            supervisor.start()

    def _one_gave_up(self) -> None:
        if self._gave_up:
            return
        left = [s for s in self.supervisors if not s.gave_up]
        if left and not self.require_all:
            logger.critical(
                "%d of %d engines still serve; the server goes on", len(left), len(self.supervisors)
            )
            return
        self._gave_up = True
        if self.on_give_up is not None:
            self.on_give_up()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every engine at once (each finishes what it holds)."""
        threads = [threading.Thread(target=s.stop, args=(timeout,)) for s in self.supervisors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _forget_metrics(pid: int | None) -> None:
    """Drop a dead process's live gauges from the shared metrics (multi-process export)."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
