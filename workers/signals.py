"""Stop signals, for every loop and child process.

SIGTERM is what SLURM sends on preemption and ``scancel`` (and what torchrun forwards to its
ranks); SIGUSR2 is the conventional "time limit near" signal (``--signal=USR2@120``; USR1 may
be taken by NCCL). A loop installs a :class:`StopSignals`, whose handler only records the
signal: the loop checks the flag where stopping is safe (the next batch, the next optimizer
step). Child processes (decode processes, DataLoader workers) ignore the stop signals, because
SLURM signals every process of a step and a child that died of one would look like a crash.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopSignals:
    """SIGTERM / SIGUSR2 set a flag that the loop checks; ``install``/``restore`` bracket the loop."""

    def __init__(self, stopping_at: str = "the next batch") -> None:
        self.received: Optional[str] = None
        self.signum: Optional[int] = None
        self._stopping_at = stopping_at
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning("%s received: stopping at %s", signal.Signals(signum).name, self._stopping_at)
        self.received, self.signum = signal.Signals(signum).name, signum

    def agreed(self, all_reduce_max: Callable[[int], int]) -> bool:
        """True on every rank if any rank has received a stop signal (one collective per call)."""
        return bool(all_reduce_max(1 if self.received is not None else 0))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


CHILD_IGNORES = (signal.SIGINT, *STOP_SIGNALS)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a child process: leave SIGINT, SIGTERM and SIGUSR2 to the parent, which stops cleanly.

    Then unblocks them, for a child started under :func:`stop_signals_blocked`: a signal that
    arrived while it started is dropped now (it is ignored), instead of having killed it.
    The signature fits DataLoader's ``worker_init_fn``.
    """
    for sig in CHILD_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_IGNORES)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Start child processes inside this: until each calls :func:`ignore_stop_signals`, a stop
    signal waits instead of killing it.

    A blocked mask survives fork and exec, so the child starts with it. Without it, SLURM's
    signal to every process of a step could land in a decode process, or in the fork server,
    while it was still importing (a 2 s window for torch): the rank then lost its decoder to a
    signal it meant to handle by stopping cleanly. In this process the signal waits until the
    block is lifted, then reaches the loop's handler as usual.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_IGNORES)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
