"""Ctrl-C during training: the first one ends the run cleanly, a second one at once.

Killing a run mid-step would lose every step since its last checkpoint (with the default
`checkpoint_interval` 0, the whole run). So while the loop runs, the first Ctrl-C only asks it to
stop: the loop finishes the step in progress, writes a checkpoint (atomically, as always) and
ends with one line saying how to resume. The request also puts Python's own handler back, so a
second Ctrl-C raises KeyboardInterrupt wherever the loop is; a checkpoint write it cuts short
leaves the previous checkpoint whole (training/checkpointing.py commits in two phases).

Only a single process asks this way: under torchrun every process gets the signal at a moment of
its own, and stopping them at one step would need a collective every step; there Ctrl-C keeps
its usual meaning.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """A context manager: while it is active, a first Ctrl-C sets `requested` instead of raising."""

    def __init__(self, enabled: bool = True):
        # Signal handlers can only be set from the main thread (a test runner's worker thread cannot).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C stops at once
        print("\nCtrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
