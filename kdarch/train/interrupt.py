"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, stop cleanly.

Schedulers and torchrun stop a job with SIGTERM, people with Ctrl-C (SIGINT). Killing the process mid-step
would lose everything since the last periodic checkpoint, and a traceback from wherever the signal landed
says nothing useful. While `stop_on_signal()` is active (the training loop holds it), the first signal only
raises a flag; the loop finishes the current step, writes a checkpoint atomically and raises `Interrupted`,
which the command line turns into one line and exit status 128 + signal number (130 for Ctrl-C, 143 for
SIGTERM). A second signal raises `Interrupted` at once, wherever the process is: a checkpoint being written
is then abandoned (its temp directory removed), never left looking complete.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Interrupted", "StopFlag", "stop_on_signal"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped by a signal; `checkpoint` is the one written for `step` (None: stopped at once)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class StopFlag:
    signum: int | None = None
    """The first signal received, or None."""


@contextmanager
def stop_on_signal() -> Iterator[StopFlag]:
    """Within the block the first SIGINT / SIGTERM sets the yielded flag and the second raises `Interrupted`;
    the previous handlers come back afterwards. Outside the main thread (where Python cannot take signals)
    the flag just stays unset."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag.signum is not None:
            raise Interrupted(signum)
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
