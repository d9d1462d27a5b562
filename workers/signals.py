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
from typing import Any, Callable, Optional

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


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a child process: leave SIGINT, SIGTERM and SIGUSR2 to the parent, which stops cleanly.

    The signature fits DataLoader's ``worker_init_fn``.
    """
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
