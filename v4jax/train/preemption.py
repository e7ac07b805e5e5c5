"""Stopping a run cleanly: SIGTERM (what a TPU VM, a cluster scheduler or Colab sends before
preemption) and SIGINT (Ctrl-C, a notebook's "interrupt") ask the trainer to finish the current
step, write a checkpoint and return, instead of killing it.

``StopSignals`` is a context manager around the training loop. In one process it installs
handlers that only record the signal (the loop polls ``requested(step)`` between steps); every
later signal is counted and otherwise ignored, so a second Ctrl-C during the final save cannot
break it (SIGKILL still ends the process at once, and a restart then falls back to the last
complete checkpoint, ``v4jax.train.checkpoints``). With several processes a signal reaching one of
them must stop all of them at the same step, or the others would wait forever in a collective:
there JAX's preemption sync service (``multihost_utils.reached_preemption_sync_point``, started by
``jax.distributed.initialize``, which watches SIGTERM itself) picks the step; SIGINT is left to
its default.

Hand-written because the libraries stop short of it: orbax exposes the multi-process sync point
(``CheckpointManager.reached_preemption``) but nothing for one process, and Python's default
SIGTERM action kills the process with status 143.
"""

from __future__ import annotations

import signal
import threading

import jax


class StopSignals:
    """``with StopSignals() as stop: ... if stop.requested(step): break``."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: list[str] = []       # signal names, in order of arrival
        self._old = {}
        self._multi = False

    def _handler(self, signum, frame):
        self.received.append(signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        self._multi = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self        # Python delivers signals to the main thread only: nothing to install
        for s in self.signals:
            if self._multi and s == signal.SIGTERM:
                continue       # JAX's preemption service owns SIGTERM (see the module docstring)
            if self._multi and s == signal.SIGINT:
                continue
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    @property
    def reason(self) -> str | None:
        return self.received[0] if self.received else None

    def requested(self, step: int) -> bool:
        """True once a stop was asked for (in every process at the same ``step`` when there are several)."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    if not self.received:
                        self.received.append("SIGTERM")
                    return True
            except RuntimeError:      # no preemption service (jax.distributed not initialised by us)
                pass
            return False
        return bool(self.received)
