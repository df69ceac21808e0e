"""Stopping a run cleanly: on SIGINT or SIGTERM, and after repeated non-finite batches.

The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) asks the loop to stop
after the step in progress and write a checkpoint; a second one abandons the step at once
(the newest periodic checkpoint still stands).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path


class RunStopped(Exception):
    """Training stopped before run.steps with a checkpoint to resume from; exit non-zero."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None):
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


class StopRequests:
    """While active, SIGINT and SIGTERM set `signal_name` instead of killing the process."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.exit_code = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt  # the second request: abandon the step
        self.signal_name, self.exit_code = signal.Signals(signum).name, 128 + signum
        # os.write, not print: a handler may interrupt a print already under way
        os.write(sys.stderr.fileno(), f"\n{self.signal_name}: stopping after this step to write a checkpoint "
                                      "(send it again to stop at once)\n".encode())
