"""Probing many videos in long-lived spawned processes, each probe under a timeout.

A hostile file can hang the demuxer (a FIFO, a stalled network mount) or crash it. Each probe
runs in a worker process; a probe that outlives its timeout gets its worker killed and the
video recorded as ``timeout``; a worker that dies is recorded as ``crashed`` with the signal's
name. Either way the worker is replaced and the listing goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any, Callable, Optional, Sequence

from videofeat.manifests.status import CRASHED, TIMEOUT, describe_exit


def _worker(task_queue: "mp.Queue", result_queue: "mp.Queue", slot: int) -> None:
    from videofeat.manifests.probe import probe_video

    while True:
        uri = task_queue.get()
        if uri is None:
            return
        result_queue.put((slot, uri, probe_video(uri)))


class _Slot:
    def __init__(self, ctx, result_queue, index: int):
        self.index = index
        self.tasks = ctx.Queue()
        self.process = ctx.Process(target=_worker, args=(self.tasks, result_queue, index), daemon=True)
        self.process.start()
        self.uri: Optional[str] = None
        self.started = 0.0

    def assign(self, uri: str) -> None:
        self.uri, self.started = uri, time.monotonic()
        self.tasks.put(uri)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


def probe_all(uris: Sequence[str], procs: int = 2, timeout_s: float = 60.0,
              on_result: Optional[Callable[[str, dict], None]] = None) -> dict[str, dict[str, Any]]:
    """Probe every uri; returns ``{uri: record}`` and never raises for a bad video."""
    results: dict[str, dict[str, Any]] = {}
    if not uris:
        return results
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    pending = list(reversed(uris))
    slots = [_Slot(ctx, result_queue, i) for i in range(max(1, min(procs, len(uris))))]

    def finish(uri: str, record: dict) -> None:
        results[uri] = record
        if on_result:
            on_result(uri, record)

    try:
        for slot in slots:
            if pending:
                slot.assign(pending.pop())
        while len(results) < len(uris):
            try:
                index, uri, record = result_queue.get(timeout=0.2)
                slot = slots[index]
                if slot.uri == uri:
                    finish(uri, record)
                    slot.uri = None
                    if pending:
                        slot.assign(pending.pop())
            except queue.Empty:
                pass
            for i, slot in enumerate(slots):
                if slot.uri is None:
                    continue
                failure = None
                if not slot.process.is_alive():
                    failure = {"status": CRASHED, "error": f"probing {slot.uri} killed the prober "
                               f"({describe_exit(slot.process.exitcode)}); the file is likely corrupt"}
                elif time.monotonic() - slot.started > timeout_s:
                    failure = {"status": TIMEOUT, "error": f"probing {slot.uri} took over {timeout_s:.0f} s "
                               "(a hung read: is it a FIFO or a stalled mount?); raise --probe-timeout-s if it is just slow"}
                if failure:
                    slot.kill()
                    finish(slot.uri, {"num_frames": 0, "vfr": False, **failure})
                    slots[i] = _Slot(ctx, result_queue, i)
                    if pending:
                        slots[i].assign(pending.pop())
    finally:
        for slot in slots:
            if slot.process.is_alive():
                slot.tasks.put(None)
        for slot in slots:
            slot.process.join(2)
            slot.kill()
    return results
