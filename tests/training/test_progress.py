"""training/progress.py: a bar on a terminal, plain lines anywhere else."""

from __future__ import annotations

import io

from training.progress import Progress


def test_a_log_file_gets_a_line_every_tenth_and_no_carriage_returns():
    stream = io.StringIO()  # not a TTY, like a log file
    with Progress(600, "train", "step", stream=stream, every_seconds=3600) as progress:
        for step in range(600):
            progress.update(1, loss=f"{10 - step / 100:.2f}")
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 10
    assert lines[0].startswith("train: 60/600 steps (10%), ") and "left" in lines[0]
    assert lines[-1].startswith("train: 600/600 steps (100%), ") and lines[-1].endswith("loss 4.01")
    assert "left" not in lines[-1]


def test_lines_also_come_with_time_and_close_writes_the_last_one():
    got: list[str] = []
    progress = Progress(1000, "embed", "input", stream=io.StringIO(), log=got.append, every_seconds=0)
    progress.update(3)
    progress.update(4)
    assert got[-1].startswith("embed: 7/1000 inputs (1%)")  # every update: every_seconds=0
    assert len(got) == 2
    progress.close()
    progress.close()
    assert len(got) == 2  # nothing new since the last line


def test_a_terminal_gets_a_bar_and_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with Progress(5, "train", "step", stream=stream, terminal=True) as progress:
        for _ in range(5):
            progress.update(1, loss="1.0")
    assert "\r" in stream.getvalue() and "5/5" in stream.getvalue()  # tqdm's redraws

    quiet = io.StringIO()
    with Progress(5, "train", "step", stream=quiet, enabled=False) as progress:
        progress.update(5)
    assert quiet.getvalue() == "" and progress.n == 5
