"""A pool of long-lived, spawned decode processes with a watchdog in the parent.

Why not DataLoader workers: one segfaulting DataLoader worker ends the whole iterator, and a
hanging one hangs it. Here each decode process decodes one video at a time and the parent
watches it:

- a process that delivered no frame for ``stall_s`` seconds while it had room to deliver is
  killed, its video recorded as ``timeout``, and a fresh process takes its place;
- a process that dies (a signal, a hard exit) has its video recorded as ``crashed`` with the
  signal's name, and is replaced.

Frames travel through a ring of frame slots in shared memory (one ring per process), and only
small messages (< 4 KB, so a pipe write is atomic) go through a pipe: a process killed at any
moment can never leave half a message behind. A semaphore counts free ring slots; it is the
backpressure (a process waits when the parent is busy with the model), and "had room" above
means that semaphore was not zero. Frames are resized in the decode process, right after
decoding (see ``resize.py``), so full-size frames never cross the process boundary. A pool may
hold several resizes (feature sets of different presets fed from one decode): each decoded
frame is resized once per resize, and a ring slot holds one frame of each.

The child side imports only the decoders, the resize functions and numpy.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing import connection, shared_memory
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from videofeat.manifests.status import (CRASHED, DECODE_ERROR, EMPTY, TIMEOUT, UNAVAILABLE, UNREADABLE,
                                        describe_exit)

from videofeat.workers.decode.decoders import VideoDecodeError, VideoOpenError, open_video
from videofeat.workers.decode.resize import FrameResize
from videofeat.workers.signals import ignore_stop_signals

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PoolConfig:
    """How decoding runs (none of it changes a feature value)."""

    procs: int = 1
    stall_s: float = 120.0
    backend: str = "pyav"
    threads: int = 1
    ring: int = 48  # frame slots per process: ~1.5 spans of the seed presets

    def __post_init__(self) -> None:
        if self.procs < 1:
            raise ValueError(f"--decode-procs must be >= 1, got {self.procs}")
        if self.stall_s <= 0:
            raise ValueError(f"--decode-stall-s must be > 0, got {self.stall_s}")
        if self.ring < 2:
            raise ValueError(f"ring must hold at least 2 frames, got {self.ring}")


@dataclass(frozen=True)
class DecodeJob:
    """Decode frames ``[start_frame, end_frame)`` of one video (``end_frame=None``: to the end)."""

    key: Any
    uri: str
    start_frame: int = 0
    end_frame: Optional[int] = None
    crop: Optional[tuple[int, int, int, int]] = None


@dataclass
class DecodeEvent:
    """``frame``: ``frame`` is valid only until the next event; ``done`` / ``failed`` end a job.

    ``frames`` holds the frame once per resize of the pool, in the pool's order; ``frame`` is the first.
    """

    kind: str
    key: Any
    index: int = -1
    frame: Optional[np.ndarray] = None
    frames: tuple = ()
    pts: float = 0.0
    frames_decoded: int = 0
    status: Optional[str] = None
    error: Optional[str] = None
    failed_at_frame: Optional[int] = None
    info: Optional[dict] = None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies (a killed rank must not leave decoders behind)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the parent's close() still ends us
        pass


class _Resizes:
    """Several resizes of one decoded frame (picklable; runs in the decode process)."""

    def __init__(self, resizes: tuple[FrameResize, ...]):
        self.resizes = resizes

    def decoder_size(self, in_h: int, in_w: int) -> Optional[tuple[int, int]]:
        return self.resizes[0].decoder_size(in_h, in_w)  # fast resizing allows one resize only

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(resize(frame) for resize in self.resizes)


def _ring_offsets(ring: int, specs: tuple) -> list[int]:
    """Byte offset of each spec's ring, 64-byte aligned (a float32 ring may follow a uint8 one)."""
    offsets, offset = [], 0
    for shape, dtype in specs:
        offsets.append(offset)
        offset += -(-ring * int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64
    return offsets + [offset]


def _ring_views(buffer: Any, ring: int, specs: tuple) -> list[np.ndarray]:
    """One ``(ring, *shape)`` array per (shape, dtype) spec, laid out back to back in ``buffer``."""
    offsets = _ring_offsets(ring, specs)
    return [np.ndarray((ring, *shape), dtype=np.dtype(dtype), buffer=buffer, offset=offsets[i])
            for i, (shape, dtype) in enumerate(specs)]


def _ring_bytes(ring: int, specs: tuple) -> int:
    return _ring_offsets(ring, specs)[-1]


def _decode_main(tasks: Any, messages: Any, shm_name: str, ring: int, specs: tuple,
                 free: Any, resize: Any, backend: str, threads: int) -> None:
    _die_with_parent()
    # Stop signals are the parent's to handle: SLURM sends SIGUSR2/SIGTERM to every process of
    # a step, and a decode process that died of them would look like a crashed video.
    ignore_stop_signals()
    shm = shared_memory.SharedMemory(name=shm_name)
    rings = _ring_views(shm.buf, ring, specs)
    shapes = [tuple(shape) for shape, _ in specs]
    slot = 0
    while True:
        job = tasks.recv()
        if job is None:
            break
        count = 0
        try:
            from videofeat.manifests import fsutil

            fs, path = fsutil.filesystem(job.uri)
            if fs.isfile(path) and fs.size(path) == 0:
                messages.send(("failed", job.key, EMPTY, f"{job.uri} is an empty (zero-byte) file", 0, count))
                continue
            with open_video(job.uri, backend, crop=job.crop, threads=threads) as source:
                info = {"fps": str(source.fps) if source.fps else None, "width": source.width,
                        "height": source.height, "container_frames": source.num_frames, "rotation": source.rotation}
                messages.send(("opened", job.key, info))
                size = resize.decoder_size(*(job.crop[3:1:-1] if job.crop else (source.height, source.width)))
                for index, rgb, pts in source.stream(job.start_frame, job.end_frame, resize, size):
                    outs = rgb if isinstance(rgb, tuple) else (rgb,)
                    for out, shape in zip(outs, shapes):
                        if out.shape != shape:
                            raise ValueError(f"frame of shape {out.shape}, expected {shape}")
                    free.acquire()
                    for slots, out in zip(rings, outs):
                        slots[slot] = out
                    messages.send(("frame", job.key, index, slot, pts))
                    slot = (slot + 1) % ring
                    count += 1
            messages.send(("done", job.key, count))
        except VideoOpenError as exc:
            # Jobs come from a manifest whose probe read the file: one that cannot be read now
            # (moved, permissions, I/O) may be readable on the next attempt.
            status = UNAVAILABLE if exc.io_error else UNREADABLE
            messages.send(("failed", job.key, status, str(exc), None, count))
        except OSError as exc:  # the stat above: the file is gone or unreachable
            messages.send(("failed", job.key, UNAVAILABLE, f"cannot read {job.uri}: {exc}", None, count))
        except VideoDecodeError as exc:
            messages.send(("failed", job.key, DECODE_ERROR, str(exc)[:2000], exc.frame_index, count))
        except Exception as exc:  # any other decoder failure is about this video, not the pool
            messages.send(("failed", job.key, DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:2000],
                           job.start_frame + count, count))


class _Worker:
    """One decode process, its pipes, its frame ring and its free-slot semaphore."""

    def __init__(self, ctx: Any, config: PoolConfig, resize: Any, specs: tuple):
        self.ring = config.ring
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, _ring_bytes(config.ring, specs)))
        self.rings = _ring_views(self.shm.buf, config.ring, specs)
        self.free = ctx.Semaphore(config.ring)
        task_read, self.tasks = ctx.Pipe(duplex=False)
        self.messages, message_write = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_decode_main, name="videofeat-decode", daemon=True,
            args=(task_read, message_write, self.shm.name, config.ring,
                  tuple((tuple(shape), np.dtype(dtype).str) for shape, dtype in specs), self.free, resize,
                  config.backend, config.threads))
        self.process.start()
        # Drop our copies of the child's ends: a dead child then reads as EOF, not as a hang.
        task_read.close()
        message_write.close()
        self.job: Optional[DecodeJob] = None
        self.next_frame = 0
        self.frames = 0
        self.last_progress = time.monotonic()

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid

    def assign(self, job: DecodeJob) -> None:
        self.job, self.next_frame, self.frames = job, job.start_frame, 0
        self.last_progress = time.monotonic()
        self.tasks.send(job)

    def has_room(self) -> bool:
        return self.free.get_value() > 0

    def stop(self, kill: bool = False) -> None:
        if self.process.is_alive() and not kill:
            try:
                self.tasks.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        for conn in (self.tasks, self.messages):
            conn.close()
        self.rings = []
        self.shm.close()
        self.shm.unlink()


class DecodePool:
    """Long-lived decode processes; :meth:`run` streams the frames of many jobs, in order per job."""

    POLL_S = 0.5

    def __init__(self, config: PoolConfig, resize: FrameResize | tuple[FrameResize, ...],
                 frame_shape: Optional[tuple] = None, frame_dtype: Any = None):
        """``resize``: one resize (``frame_shape``/``frame_dtype`` as :func:`frame_spec` gives), or a
        tuple of distinct resizes, each applied once per decoded frame."""
        self.config = config
        if isinstance(resize, tuple):
            if any(r.fast for r in resize) and len(resize) > 1:
                raise ValueError("--resize fast gives one size per decode: it cannot feed several resizes")
            self.resizes = resize
            self.specs = tuple(frame_spec(r) for r in resize)
            self.resize: Any = resize[0] if len(resize) == 1 else _Resizes(resize)
        else:
            self.resizes = (resize,)
            self.specs = ((tuple(frame_shape), np.dtype(frame_dtype)),)
            self.resize = resize
        self.shape, self.dtype = self.specs[0]
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self.respawns = 0

    def __enter__(self) -> "DecodePool":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        while len(self._workers) < self.config.procs:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.config, self.resize, self.specs)

    def pids(self) -> list[int]:
        """Process ids of the decode processes (for operators, and for fault-injection tests)."""
        return [w.pid for w in self._workers if w.pid]

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop(kill=True)
        fresh = self._spawn()
        self._workers[self._workers.index(worker)] = fresh
        self.respawns += 1
        return fresh

    def run(self, jobs: Iterable[DecodeJob], should_stop: Callable[[], bool] = lambda: False) -> Iterator[DecodeEvent]:
        """Decode ``jobs``, up to ``procs`` at a time; yields frames, then ``done`` or ``failed``.

        Returns early (jobs unfinished) once ``should_stop()`` is true, even while no frame arrives.
        """
        self.start()
        pending = collections.deque(jobs)
        while not should_stop():
            for worker in self._workers:
                if worker.job is None and pending:
                    worker.assign(pending.popleft())
            busy = [w for w in self._workers if w.job is not None]
            if not busy:
                return
            connection.wait([w.messages for w in busy] + [w.process.sentinel for w in busy], timeout=self.POLL_S)
            for worker in busy:
                yield from self._drain(worker)
            for worker in [w for w in self._workers if w.job is not None]:
                event = self._check(worker)
                if event is not None:
                    yield event

    def _drain(self, worker: _Worker) -> Iterator[DecodeEvent]:
        while worker.job is not None and worker.messages.poll():
            try:
                message = worker.messages.recv()
            except (EOFError, OSError):
                return  # the process is gone; _check records it
            kind, key = message[0], message[1]
            worker.last_progress = time.monotonic()
            if kind == "opened":
                yield DecodeEvent("opened", key, info=message[2])
            elif kind == "frame":
                _, _, index, slot, pts = message
                worker.next_frame, worker.frames = index + 1, worker.frames + 1
                frames = tuple(r[slot] for r in worker.rings)
                try:
                    yield DecodeEvent("frame", key, index=index, frame=frames[0], frames=frames, pts=pts)
                finally:
                    worker.free.release()
            elif kind == "done":
                worker.job = None
                yield DecodeEvent("done", key, frames_decoded=message[2])
            else:
                _, _, status, error, failed_at, count = message
                worker.job = None
                yield DecodeEvent("failed", key, status=status, error=error, failed_at_frame=failed_at,
                                  frames_decoded=count)

    def _check(self, worker: _Worker) -> Optional[DecodeEvent]:
        """The watchdog: a dead or stalled process fails its job and is replaced."""
        job = worker.job
        if not worker.process.is_alive():
            how = describe_exit(worker.process.exitcode)
            log.warning("decode process %s died (%s) while decoding %s; respawning", worker.pid, how, job.uri)
            event = DecodeEvent("failed", job.key, status=CRASHED, frames_decoded=worker.frames,
                                error=f"decode process died by {how} at frame {worker.next_frame} of {job.uri}",
                                failed_at_frame=worker.next_frame)
            self._replace(worker)
            return event
        if not worker.has_room():
            worker.last_progress = time.monotonic()  # waiting for us, not stalled
            return None
        idle = time.monotonic() - worker.last_progress
        if idle > self.config.stall_s:
            log.warning("decode process %s delivered no frame for %.0f s on %s; killing it", worker.pid, idle,
                        job.uri)
            event = DecodeEvent("failed", job.key, status=TIMEOUT, frames_decoded=worker.frames,
                                error=f"no frame for {idle:.0f} s (--decode-stall-s {self.config.stall_s:g}) "
                                      f"at frame {worker.next_frame} of {job.uri}",
                                failed_at_frame=worker.next_frame)
            self._replace(worker)
            return event
        return None

    def close(self) -> None:
        for worker in self._workers:
            worker.stop(kill=worker.job is not None)  # a busy decoder has nothing left worth waiting for
        self._workers = []


def frame_spec(resize: FrameResize) -> tuple[tuple[int, int, int], np.dtype]:
    """Shape and dtype of the frames a decode process delivers for ``resize``."""
    dtype = np.float32 if (resize.method == "interpolate_bilinear" and not resize.fast) else np.uint8
    return (resize.size, resize.size, 3), np.dtype(dtype)


MAX_DEFAULT_DECODE_PROCS = 8


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (SLURM's and taskset's limits), not the node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ranks_sharing_cpus(environ: Optional[dict] = None) -> int:
    """How many ranks on this node draw from the same CPUs as this one.

    torchrun's local ranks share their agent's mask (``LOCAL_WORLD_SIZE``). SLURM tasks on one
    node share the whole node only when nothing binds them (the mask covers every CPU); a task
    bound to its own CPUs shares them with no other task.
    """
    env = os.environ if environ is None else environ
    ranks = int(env.get("LOCAL_WORLD_SIZE") or 1)
    tasks = (env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0]
    if usable_cpus() >= (os.cpu_count() or 1) and tasks.isdigit():
        ranks *= max(1, int(tasks))
    return max(1, ranks)


def default_decode_procs(environ: Optional[dict] = None) -> int:
    """Decode processes per rank: this rank's share of its CPUs, one left for the rank itself."""
    share = usable_cpus() // ranks_sharing_cpus(environ)
    return max(1, min(MAX_DEFAULT_DECODE_PROCS, share - 1))
