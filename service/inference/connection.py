"""A front end's link to one engine process: its socket, its status board, its replies.

``EngineClient`` (``client.py``) holds one ``EngineConnection`` per engine (one per
device) and sends each request through the least loaded ready one. A connection

- follows the engine's status board (``ipc.StatusBoard``): when the engine leaves
  ``ready`` (it died, is restarting, stopped), every request waiting on it fails at once
  with ``EngineDiedError`` (the client retries those on another engine); when a new
  generation turns ready it greets it (``hello``) and learns the model's facts;
- sends a request and waits for its reply (``request``), telling the engine to drop it
  when the caller gives up;
- reports its load (``load``): the tokens its engine holds for every front end, from the
  board, plus those this front end has sent it and not yet had answered (which the engine
  may not have received yet).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.gcfreeze import freeze_long_lived
from service.inference import ipc
from service.inference.engine import EngineInfo
from service.inference.errors import EngineDiedError, EngineUnavailableError

logger = logging.getLogger("llave.client")

WATCH_INTERVAL_S = 0.02  # how often the status board is read
HELLO_TIMEOUT_S = 5.0


class EngineConnection:
    """One front end's connection to one engine process."""

    def __init__(
        self,
        index: int,
        address: str,
        board_path: str | Path,
        device: str,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.index = index
        self.address = address
        self.board_path = Path(board_path)
        self.device = device
        self.on_change = on_change
        self.engine: EngineInfo | None = None
        self.sent_tokens = 0  # sent by this front end, not yet answered
        self._board: ipc.StatusBoard | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._hello: asyncio.Future[Any] | None = None
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._seen: tuple[int, int] = (-1, -1)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: Any) -> None:
        import zmq

        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)
        self._tasks = [
            asyncio.create_task(self._receive(), name=f"llave-engine-{self.index}-replies"),
            asyncio.create_task(self._watch(), name=f"llave-engine-{self.index}-watch"),
        ]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.fail_pending(EngineUnavailableError("the server is shutting down", retry=False))
        self._sock.close()
        if self._board is not None:
            self._board.close()
            self._board = None

    def _read_board(self) -> tuple[int, int, int, int] | None:
        if self._board is None:
            if not self.board_path.exists():
                return None
            self._board = ipc.StatusBoard(self.board_path)
        return self._board.read()

    async def _watch(self) -> None:
        """Follow the engine's state: fail waiting calls when it dies, greet it when ready."""
        while True:
            board = self._read_board()
            if board is not None:
                state, generation = board[0], board[1]
                if (state, generation) != self._seen:
                    self._seen = (state, generation)
                    if state != ipc.READY and self._pending:
                        self.fail_pending(EngineDiedError())
                    if self.on_change is not None:
                        self.on_change()
                if state == ipc.READY and (self.engine is None or self.engine.generation != generation):
                    await self._greet()
                    if self.on_change is not None:
                        self.on_change()
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _greet(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        await self._sock.send_multipart([ipc.HELLO, b""])
        try:
            info = await asyncio.wait_for(self._hello, timeout=HELLO_TIMEOUT_S)
        except TimeoutError:
            return
        if info is not None:
            self.engine = info
            freeze_long_lived()  # the model core is imported and the preprocessor here now

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=True)
            kind = frames[0]
            if kind == ipc.HELLO:
                if self._hello is not None and not self._hello.done():
                    self._hello.set_result(ipc.load(frames[1]))
                continue
            header = ipc.load(frames[1])
            fut = self._pending.pop(header["id"], None)
            if fut is None or fut.done():
                continue  # cancelled meanwhile
            if kind == ipc.OK:
                fut.set_result((header, frames[2]))
            else:
                fut.set_exception(header["error"])

    def fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    # --- state -------------------------------------------------------------------------

    @property
    def board_state(self) -> int:
        board = self._read_board()
        return ipc.STARTING if board is None else board[0]

    @property
    def state(self) -> str:
        state = self.board_state
        if state == ipc.READY and not self.ready:
            return "warming"  # ready, not greeted yet
        return ipc.STATE_NAMES[state]

    @property
    def ready(self) -> bool:
        board = self._read_board()
        return (
            board is not None
            and board[0] == ipc.READY
            and self.engine is not None
            and self.engine.generation == board[1]
        )

    @property
    def alive(self) -> bool:
        """False while the engine is dead, restarting, failed or stopped."""
        return self.board_state in (ipc.STARTING, ipc.LOADING, ipc.WARMING, ipc.READY)

    def load(self) -> int:
        """Tokens this engine is busy with, as far as this front end can tell (see the module
        docstring): a request goes to the engine where this is lowest."""
        if self._board is None and self._read_board() is None:
            return self.sent_tokens
        assert self._board is not None
        return self._board.load()[0] + self.sent_tokens

    @property
    def resolved_device(self) -> str:
        """The device the engine runs on once it has said so (``auto`` becomes ``cpu`` or
        ``cuda:N``), else the one it was asked for."""
        return self.engine.device if self.engine is not None else self.device

    def describe(self) -> dict[str, Any]:
        """This engine in ``/health``, ``/ready`` and ``/info``."""
        return {"engine": self.index, "device": self.resolved_device, "status": self.state}

    # --- one request -------------------------------------------------------------------

    async def request(self, header: dict[str, Any], tokens: int) -> tuple[dict[str, Any], bytes]:
        """Send one request (``header`` without its id) and wait for its reply."""
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        self.sent_tokens += tokens
        try:
            await self._sock.send_multipart([ipc.EMBED, ipc.dump({**header, "id": request_id})])
            return await fut  # type: ignore[no-any-return]
        except BaseException:
            if self._pending.pop(request_id, None) is not None:
                await self._sock.send_multipart([ipc.CANCEL, ipc.dump(request_id)])
            raise
        finally:
            self.sent_tokens -= tokens
