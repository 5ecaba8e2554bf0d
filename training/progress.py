"""Progress that reads well in a terminal and in a log file.

On a terminal (the stream is a TTY) this is a tqdm bar. Anywhere else (a log file, a
pipe, a CI console) a bar would redraw itself hundreds of times into the file, so it
writes one plain line whenever another ``every_percent`` of the total is done or
``every_seconds`` have passed since the last line, and a last line when it closes:

    train: 120/600 steps (20%), 48 s, about 3 min 12 s left, loss 1.234, lr 4.9e-04

``log`` (a callable taking one string, e.g. a logger's ``info``) receives those lines
instead of the stream, so they carry the caller's log format.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Progress:
    """``update(n, **fields)``, ``set_description(text)``, ``close()``; also a context manager."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        log: Callable[[str], Any] | None = None,
        every_percent: float = 10.0,
        every_seconds: float = 30.0,
        terminal: bool | None = None,
    ):
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.log = log
        self.every_percent = every_percent
        self.every_seconds = every_seconds
        self.fields: dict[str, Any] = {}
        self._start = self._last_time = time.monotonic()
        self._initial = initial
        self._last_n = initial
        self._closed = False
        self._bar = None
        use_bar = is_terminal(self.stream) if terminal is None else terminal
        if enabled and use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True
            )

    # -- the interface
    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += n
        if fields:
            self.fields = fields
        if not self.enabled:
            return
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(fields, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        step = self.total * self.every_percent / 100 if self.total else float("inf")
        crossed = step > 0 and int(self.n / step) > int(self._last_n / step)
        if crossed or now - self._last_time >= self.every_seconds:
            self._write(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n != self._last_n:
            self._write(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plain lines
    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        timing = _duration(elapsed)
        done = self.n - self._initial
        if 0 < done and self.n < self.total:
            timing += f", about {_duration(elapsed / done * (self.total - self.n))} left"
        parts.append(timing)
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        text = self.line(now)
        self._last_time, self._last_n = now, self.n
        if self.log is not None:
            self.log(text)
        else:
            print(text, file=self.stream, flush=True)
