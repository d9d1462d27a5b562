"""A pool of long-lived decode processes with a watchdog in the parent.

Decode processes start from a fresh interpreter, never forked from the parent (which may hold
CUDA state and threads): spawned, or, when the resize kernel is torch's, forked from a fork
server that imported torch once (``forkserver_preload.py``).

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
decoding (see ``resize.py``), so full-size frames cross the process boundary only when
``--resize-on device`` asks for them (:class:`~videofeat.workers.decode.resize.FullFrame`).

A slot holds the largest frame the transform can give (``frame_spec``); each ``frame`` message
names the frame's shape, so a slot sized for the largest crop box also carries smaller ones.

A pool may hold several resizes (feature sets of different presets fed from one decode): each
decoded frame is resized once per resize, each resize has its own ring in the shared memory,
and a ``frame`` message's slot holds one frame of each.

The child side imports only the decoders, the resize functions and numpy (and torch, when the
resize kernel is torch's: see ``resize.py``).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import connection, shared_memory
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from videofeat.manifests.status import (CRASHED, DECODE_ERROR, EMPTY, TIMEOUT, UNAVAILABLE, UNREADABLE,
                                        describe_exit)

from videofeat.workers.decode.decoders import VideoDecodeError, VideoOpenError, open_video
from videofeat.workers.decode.resize import FrameResize, FullFrame
from videofeat.workers.signals import ignore_stop_signals, stop_signals_blocked

Transform = Union[FrameResize, FullFrame]

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
    cpu_s: Optional[float] = None  # ``done``: CPU seconds the decode process spent on this job


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies (a killed rank must not leave decoders behind)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the parent's close() still ends us
        pass


def _slot_view(slots: np.ndarray, slot: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Frame ``shape`` in ring slot ``slot`` (a flat byte row), without a copy."""
    return slots[slot, :int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


class _Resizes:
    """The resizes of one pool, each applied once per decoded frame (picklable; runs in the decode
    process). Each writes straight into its ring's slot: a resized frame is copied once."""

    def __init__(self, resizes: tuple[Transform, ...]):
        self.resizes = resizes
        self.uses_torch = any(getattr(r, "uses_torch", False) for r in resizes)
        # RGBA only when every resize takes it: the frame is converted once for all of them.
        self.rgba = all(getattr(r, "takes_rgba", False) for r in resizes)

    def prepare(self) -> None:
        for resize in self.resizes:
            resize.prepare()

    def decoder_size(self, in_h: int, in_w: int) -> Optional[tuple[int, int]]:
        return self.resizes[0].decoder_size(in_h, in_w)  # fast resizing allows one resize only

    def out_shapes(self, frame_shape: tuple) -> list[tuple[int, int, int]]:
        return [resize.out_shape_for(frame_shape) for resize in self.resizes]

    def write(self, frame: np.ndarray, outs: list[np.ndarray]) -> None:
        for resize, out in zip(self.resizes, outs):
            resize(frame, out)


def _slot_bytes(specs: tuple) -> list[int]:
    """Bytes of one slot of each spec's ring, 64-byte aligned (a float32 ring may follow a uint8 one)."""
    return [-(-max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize) // 64) * 64 for shape, dtype in specs]


def _rings(buffer: Any, ring: int, specs: tuple) -> list[np.ndarray]:
    """One ``(ring, slot_bytes)`` byte array per (shape, dtype) spec, back to back in ``buffer``."""
    out, offset = [], 0
    for size in _slot_bytes(specs):
        out.append(np.ndarray((ring, size), dtype=np.uint8, buffer=buffer, offset=offset))
        offset += ring * size
    return out


def _exit_with_the_rank() -> None:
    """Exit as soon as the rank that reads our ring is gone, whatever the decode is blocked in.

    A decode process forked from the fork server is the server's child, not the rank's, so
    PR_SET_PDEATHSIG does not fire when a rank is SIGKILLed; and it holds the server's liveness
    pipe, so the server does not exit either. Blocked on a full ring, or opening a file that
    never answers (a FIFO, a hung mount), the pair used to outlive the rank for good (found
    after the suite's SIGKILLed torchrun ranks). The rank's sentinel (``parent_process()``, the
    pipe it started us through, under both start methods) reads as closed once it has died; a
    daemon thread waits on it, so no blocking call has to poll.
    """
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        connection.wait([parent.sentinel])
        os._exit(0)  # nobody reads this ring any more

    threading.Thread(target=watch, name="videofeat-rank-watch", daemon=True).start()


def _decode_main(tasks: Any, messages: Any, shm_name: str, ring: int, specs: tuple,
                 free: Any, resize: Any, backend: str, threads: int) -> None:
    _die_with_parent()
    _exit_with_the_rank()
    # Stop signals are the parent's to handle: SLURM sends SIGUSR2/SIGTERM to every process of
    # a step, and a decode process that died of them would look like a crashed video.
    ignore_stop_signals()
    resize.prepare()  # before the first job: an import here is not a stalled frame
    shm = shared_memory.SharedMemory(name=shm_name)
    specs = tuple((tuple(shape), np.dtype(dtype)) for shape, dtype in specs)
    rings = _rings(shm.buf, ring, specs)
    slot = 0
    while True:
        job = tasks.recv()
        if job is None:
            break
        count, cpu_start = 0, time.process_time()
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
                for index, frame, pts in source.stream(job.start_frame, job.end_frame, None, size, resize.rgba):
                    shapes = resize.out_shapes(frame.shape)
                    for shape, (largest, _) in zip(shapes, specs):
                        if frame.ndim != 3 or any(a > b for a, b in zip(shape, largest)):
                            raise ValueError(f"{job.uri}: frame of shape {frame.shape}, expected at most "
                                             f"{largest}; the manifest's width, height or crop columns are "
                                             "wrong for it: probe it again with `videofeat manifest`")
                    free.acquire()
                    try:
                        resize.write(frame, [_slot_view(slots, slot, shape, dtype)
                                             for slots, shape, (_, dtype) in zip(rings, shapes, specs)])
                    except BaseException:
                        free.release()  # the slot was never handed over
                        raise
                    # One resize: its shape; several: the tuple of their shapes.
                    shape_field = shapes[0] if len(shapes) == 1 else tuple(shapes)
                    messages.send(("frame", job.key, index, slot, pts, shape_field))
                    slot = (slot + 1) % ring
                    count += 1
            # CPU time, not wall time: waiting for a free slot (the parent busy with the model) costs none.
            messages.send(("done", job.key, count, round(time.process_time() - cpu_start, 4)))
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
        self.dtypes = [np.dtype(dtype) for _, dtype in specs]
        # Every child this starts (the decode process; the fork server and multiprocessing's
        # resource tracker, when the first shared memory or process needs them) starts with the
        # stop signals blocked, until it ignores them: see ``signals.stop_signals_blocked``.
        with stop_signals_blocked():
            self.shm = shared_memory.SharedMemory(create=True, size=config.ring * sum(_slot_bytes(specs)))
            self.rings = _rings(self.shm.buf, config.ring, specs)
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

    def __init__(self, config: PoolConfig, resize: Union[Transform, tuple[FrameResize, ...]],
                 frame_shape: Optional[tuple] = None, frame_dtype: Any = None):
        """``resize``: one transform (``frame_shape``/``frame_dtype`` as :func:`frame_spec` gives), or a
        tuple of distinct resizes, each applied once per decoded frame."""
        self.config = config
        if isinstance(resize, tuple):
            if len(resize) > 1 and any(r.fast for r in resize):
                raise ValueError("--resize fast gives one size per decode: it cannot feed several resizes")
            self.resizes = resize
            self.specs = tuple(frame_spec(r) for r in resize)
        else:
            self.resizes = (resize,)
            self.specs = ((tuple(frame_shape), np.dtype(frame_dtype)),)
        self.resize = _Resizes(self.resizes)
        self.shape, self.dtype = self.specs[0]
        self._ctx = self._context(self.resize)
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

    @staticmethod
    def _context(resize: Transform) -> Any:
        """spawn, or a fork server that imported torch once when the kernel is torch's.

        Both start decode processes from a fresh interpreter, never from this process (which may
        hold CUDA state and threads). See ``forkserver_preload.py`` for what the server saves.
        """
        if not getattr(resize, "uses_torch", False):
            return mp.get_context("spawn")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["videofeat.workers.decode.forkserver_preload"])
        return ctx

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
        # A decoder still busy here was left mid-video by a run its consumer abandoned (a shard that
        # raised): its remaining frames belong to no one, and would reach this run under stale keys.
        for worker in [w for w in self._workers if w.job is not None]:
            self._replace(worker)
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
                _, _, index, slot, pts, shape = message
                worker.next_frame, worker.frames = index + 1, worker.frames + 1
                try:
                    shapes = (shape,) if len(worker.rings) == 1 else shape
                    frames = tuple(_slot_view(r, slot, s, d) for r, s, d in zip(worker.rings, shapes, worker.dtypes))
                    yield DecodeEvent("frame", key, index=index, frame=frames[0], frames=frames, pts=pts)
                finally:
                    worker.free.release()
            elif kind == "done":
                worker.job = None
                yield DecodeEvent("done", key, frames_decoded=message[2], cpu_s=message[3])
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


def frame_spec(resize: Transform) -> tuple[tuple[int, int, int], np.dtype]:
    """Shape (the largest, for :class:`FullFrame`) and dtype of the frames ``resize`` delivers."""
    return tuple(resize.out_shape), np.dtype(resize.out_dtype)


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
