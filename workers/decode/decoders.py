"""Video decoders behind one small interface: frames by exact index, streamed, cropped first.

``open_video(uri, backend, crop)`` returns a :class:`VideoSource`; ``source.stream(start, end,
transform)`` yields ``(frame_index, rgb, pts_seconds)`` for every frame in ``[start, end)``, in
order, exact to the frame: it seeks to the keyframe at or before ``start``, decodes forward and
drops the frames before ``start``. ``rgb`` is ``uint8 HxWx3`` after the crop and the optional
``transform`` (which may return a resized or float array).

``stream(..., rgba=True)`` asks for ``HxWx4`` frames instead (RGB and an opaque alpha, the same
RGB bytes): FFmpeg converts to 4-byte pixels as fast as to 3-byte ones (~1.5 ms a 1080p frame
either way, on one thread), and the resize kernels gather a 4-byte pixel as one ``uint32``
(0.27 against 0.57 ms a 1080p frame for a 3-byte item). It is a request, not a promise:
decord's frames stay ``HxWx3``, and so do PyAV's where the width is no multiple of 16, because
FFmpeg's RGBA converter leaves the last columns wrong at some of those widths (every width = 2
or 4 mod 16 tried, 18 to 1998; width 100: columns 96-99, on every frame). Consumers of ``rgba``
frames take both.

Every pixel conversion runs on one thread (``CONVERT_THREADS``): swscale's default picks a
thread count from the CPUs, cuts the frame into slices, and returned wrong rows at the slice
boundaries at random (rows 160 and 320 of a 480-row frame in 10 of 24 RGBA conversions). One
thread is also faster, since PyAV makes a new converter, and so a new thread pool, for every
decoded frame: ~1.5 against ~3.5-4.8 ms a 1080p frame to RGB (``benchmarks/frame_cost.py``
prints both). ``tests/test_decoders.py`` holds both formats to one-thread RGB across slice
boundaries.

Backends: ``pyav`` (default; bounded memory on long videos) and ``decord`` (the seed's ViT-L
decoder; its RSS grows with the length of the video, see the README). Both give bit-identical
full-size frames on H.264. This module imports only numpy and the decoder, so the decode
processes stay light.

Two error classes let callers tell a file that is not a video (:class:`VideoOpenError`, a
permanent fact about the file, unless ``io_error`` says the file could not be read at all) from
a decode failure part-way (:class:`VideoDecodeError`, which carries the index of the frame that
failed).

Frames come out as a player shows them: a display matrix (or the legacy ``rotate`` tag FFmpeg
turns into one) that rotates by a multiple of 90 degrees is applied before the crop, and
``width``/``height`` are the displayed size (crop boxes are in displayed pixels). A matrix that
mirrors the picture or turns it by another angle is refused with a :class:`VideoOpenError` that
says rotation is not applied.
"""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("pyav", "decord")
RGBA_WIDTH_MULTIPLE = 16  # see the module docstring: FFmpeg's RGBA is right at these widths
CONVERT_THREADS = 1  # swscale threads: see the module docstring (the default was wrong at random)
Crop = Optional[Sequence[int]]
Transform = Optional[Callable[[np.ndarray], np.ndarray]]
Frame = tuple[int, np.ndarray, float]


class VideoOpenError(RuntimeError):
    """The file cannot be opened as a video (missing, not a container, no video stream)."""

    def __init__(self, uri: str, reason: str, io_error: bool = False):
        super().__init__(f"cannot open {uri} as a video: {reason}")
        self.uri = uri
        self.reason = reason
        # True when the file could not be read (missing, permissions, I/O), not when it was read
        # and is not a video: the first may pass on the next attempt, the second never will.
        self.io_error = io_error


class VideoDecodeError(RuntimeError):
    """Decoding failed part-way; ``frame_index`` is the first frame that could not be produced."""

    def __init__(self, uri: str, frame_index: int, reason: str):
        super().__init__(f"{uri}: decode error at frame {frame_index}: {reason}")
        self.uri = uri
        self.frame_index = frame_index
        self.reason = reason


def _validate_crop(crop: Crop, uri: str) -> Optional[tuple[int, int, int, int]]:
    if crop is None:
        return None
    x, y, w, h = (int(v) for v in crop)
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"crop box {tuple(crop)} for {uri} must be (x, y, w, h) with x, y >= 0 and w, h > 0")
    return x, y, w, h


def _open_input(uri: str) -> tuple[Any, Any]:
    """(what the decoder opens, a handle to close) for a local path or an fsspec URL."""
    from videofeat.manifests import fsutil

    fs, path = fsutil.filesystem(uri)
    if fsutil.is_local(fs):
        return path, None
    handle = fs.open(path, "rb")
    return handle, handle


class VideoSource:
    """An open video. Subclasses implement :meth:`_frames`; cropping and transforms live here."""

    backend = ""

    def __init__(self, uri: str, crop: Crop = None):
        self.uri = uri
        self.crop = _validate_crop(crop, uri)
        self.fps: Optional[Fraction] = None
        self.num_frames: Optional[int] = None  # as the container reports it; may be None or wrong
        self.width = 0   # as displayed: swapped for a 90/270-degree rotation
        self.height = 0
        self.rotation = 0  # degrees counter-clockwise applied to every frame

    def stream(self, start_frame: int = 0, end_frame: Optional[int] = None,
               transform: Transform = None, output_size: Optional[tuple[int, int]] = None,
               rgba: bool = False) -> Iterator[Frame]:
        """Frames ``[start_frame, end_frame)`` (``None``: to the end) as ``(index, rgb, pts_s)``.

        ``output_size=(w, h)`` asks the decoder's own scaler for that size after the crop (the
        opt-in ``--resize fast``); otherwise frames are full-size (cropped) RGB, then ``transform``.
        ``rgba``: full-size frames with 4 channels where the decoder can (see the module docstring).
        """
        if start_frame < 0 or (end_frame is not None and end_frame < start_frame):
            raise ValueError(f"bad frame range [{start_frame}, {end_frame}) for {self.uri}")
        if self.crop is not None:
            x, y, w, h = self.crop
            if x + w > self.width or y + h > self.height:
                raise ValueError(f"crop box {self.crop} lies outside the {self.width}x{self.height} "
                                 f"frames of {self.uri}; fix the manifest's crop_* columns")
        for index, rgb, pts in self._frames(start_frame, end_frame, output_size, rgba):
            if transform is not None:
                rgb = transform(rgb)
            yield index, rgb, pts

    def _crop(self, rgb: np.ndarray) -> np.ndarray:
        if self.crop is None:
            return rgb
        x, y, w, h = self.crop
        return rgb[y:y + h, x:x + w]

    def _frames(self, start: int, end: Optional[int], output_size, rgba: bool) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PyAVSource(VideoSource):
    """PyAV (FFmpeg) decoding; memory stays flat on long videos."""

    backend = "pyav"

    def __init__(self, uri: str, crop: Crop = None, threads: int = 1):
        super().__init__(uri, crop)
        import av

        self._av = av
        self._threads = threads
        source, self._handle = _open_input(uri)
        try:
            self._container = av.open(source, mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self.close()
            raise VideoOpenError(uri, str(exc), io_error=isinstance(exc, OSError)) from exc
        if not self._container.streams.video:
            self.close()
            raise VideoOpenError(uri, "no video stream")
        self._stream = self._container.streams.video[0]
        ctx = self._stream.codec_context
        self.width, self.height = ctx.width, ctx.height
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.fps = Fraction(rate) if rate else None
        self.num_frames = int(self._stream.frames) or None
        self._time_base = self._stream.time_base
        self._start_pts = self._stream.start_time or 0
        self._peek()

    def _peek(self) -> None:
        """Decode the first frame to learn the orientation; a stream from frame 0 reuses it."""
        self._configure()
        self._head: Optional[Iterator[Any]] = self._decoded()
        self._head_error: Optional[str] = None
        try:
            self._first = next(self._head, None)
        except _DecodeFailure as exc:
            self._first, self._head_error = None, str(exc)
        rotation, mirrored = (0, False)
        if self._first is not None:
            from videofeat.manifests.probe import frame_orientation

            rotation, mirrored = frame_orientation(self._first)
        try:
            self.rotation = _check_orientation(self.uri, rotation, mirrored)
        except VideoOpenError:
            self.close()
            raise
        if self.rotation in (90, 270):
            self.width, self.height = self.height, self.width

    def _configure(self) -> None:
        if self._stream.codec_context.is_open:
            return  # already decoding (the peek at the first frame opened it)
        self._stream.thread_count = self._threads
        self._stream.thread_type = "AUTO" if self._threads > 1 else "SLICE"

    def _pts_seconds(self, frame: Any, fallback_index: int) -> float:
        if frame.pts is None or not self._time_base:
            return fallback_index / float(self.fps) if self.fps else float("nan")
        return float((frame.pts - self._start_pts) * self._time_base)

    def _index_from_pts(self, frame: Any) -> Optional[int]:
        """The frame index implied by a CFR timestamp, or None when it is off the frame grid."""
        if frame.pts is None or not self.fps or not self._time_base:
            return None
        exact = (frame.pts - self._start_pts) * self._time_base * self.fps
        index = round(exact)
        return int(index) if abs(exact - index) < 0.1 else None

    def _decoded(self) -> Iterator[Any]:
        try:
            for frame in self._container.decode(self._stream):
                yield frame
        except self._av.error.FFmpegError as exc:
            raise _DecodeFailure(str(exc)) from exc

    def _seek(self, start: int) -> Optional[Iterator[tuple[int, Any]]]:
        """Seek to the keyframe at or before ``start``; None when frame indices cannot be trusted."""
        if not self.fps or not self._time_base:
            return None
        target = self._start_pts + int(Fraction(start) / self.fps / self._time_base)
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except self._av.error.FFmpegError:
            return None
        frames = self._decoded()
        first = next(frames, None)
        if first is None:
            return None
        first_index = self._index_from_pts(first)
        # Landing after the target (a broken index) or off the CFR grid (VFR): count from 0.
        if first_index is None or first_index > start:
            return None

        def numbered() -> Iterator[tuple[int, Any]]:
            yield first_index, first
            for offset, frame in enumerate(frames, start=1):
                yield first_index + offset, frame
        return numbered()

    def _reopen_at_zero(self) -> Iterator[tuple[int, Any]]:
        self._container.seek(self._start_pts, stream=self._stream, backward=True, any_frame=False)
        return enumerate(self._decoded())

    def _from_zero(self) -> Iterator[tuple[int, Any]]:
        """Frames from index 0: the peeked frame and the rest of its decode, once; then by seeking."""
        head, self._head = self._head, None
        if head is None:
            return self._reopen_at_zero()
        if self._head_error is not None:
            raise VideoDecodeError(self.uri, 0, self._head_error)
        return enumerate(itertools.chain([self._first] if self._first is not None else [], head))

    def _frames(self, start: int, end: Optional[int], output_size, rgba: bool) -> Iterator[Frame]:
        self._configure()
        numbered = None
        if start > 0:
            self._head = None  # seeking ends the peeked decode
            numbered = self._seek(start)
        if numbered is None:
            numbered = self._from_zero()
        graph = self._fast_graph(output_size) if output_size else None
        index = start
        try:
            for index, frame in numbered:
                if index < start:
                    continue
                if end is not None and index >= end:
                    break
                pts = self._pts_seconds(frame, index)
                if graph is not None:
                    graph.push(frame)
                    rgb = graph.pull().to_ndarray(format="rgb24", threads=CONVERT_THREADS)
                else:
                    pixels = "rgba" if rgba and frame.width % RGBA_WIDTH_MULTIPLE == 0 else "rgb24"
                    rgb = self._crop(_rotate(frame.to_ndarray(format=pixels, threads=CONVERT_THREADS), self.rotation))
                yield index, rgb, pts
                index += 1
        except _DecodeFailure as exc:
            raise VideoDecodeError(self.uri, index, str(exc)) from None

    def _fast_graph(self, output_size: tuple[int, int]) -> Any:
        """Crop and scale inside FFmpeg (swscale bilinear): fast, a few /255 off the exact path."""
        graph = self._av.filter.Graph()
        graph.threads = CONVERT_THREADS  # the scale filter's swscale, as above
        nodes = [graph.add_buffer(template=self._stream)]
        nodes += [graph.add(name, args) for name, args in _ROTATE_FILTERS[self.rotation]]
        if self.crop is not None:
            x, y, w, h = self.crop
            nodes.append(graph.add("crop", f"{w}:{h}:{x}:{y}"))
        width, height = output_size
        nodes.append(graph.add("scale", f"{width}:{height}:flags=bilinear"))
        nodes.append(graph.add("format", "rgb24"))
        nodes.append(graph.add("buffersink"))
        graph.link_nodes(*nodes).configure()
        return graph

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
            self._handle = None


class _DecodeFailure(Exception):
    pass


# FFmpeg filters that turn a frame counter-clockwise by the key, as ``ffmpeg -autorotate`` does.
_ROTATE_FILTERS = {0: (), 90: (("transpose", "cclock"),), 180: (("hflip", None), ("vflip", None)),
                   270: (("transpose", "clock"),)}


def _check_orientation(uri: str, rotation: int, mirrored: bool) -> int:
    from videofeat.manifests.probe import orientation_problem

    problem = orientation_problem(uri, rotation, mirrored)
    if problem:
        raise VideoOpenError(uri, problem)
    return rotation


def _rotate(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a decoded frame counter-clockwise by ``rotation`` degrees (a multiple of 90)."""
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90)) if rotation else rgb


def read_orientation(uri: str) -> tuple[int, bool]:
    """The display orientation of ``uri``'s first frame, read with PyAV (decord does not expose it)."""
    import av

    source, handle = _open_input(uri)
    try:
        with av.open(source, mode="r") as container:
            for frame in container.decode(video=0):
                from videofeat.manifests.probe import frame_orientation

                return frame_orientation(frame)
    except av.error.FFmpegError:
        pass  # the decoder that reads the frames reports what is wrong with the file
    finally:
        if handle is not None:
            handle.close()
    return 0, False


class DecordSource(VideoSource):
    """decord decoding (``--decoder decord``): the seed's ViT-L reader.

    decord builds a frame index of the whole file and caches decoded data as it goes, so its
    memory grows with the video's length; PyAV's does not.
    """

    backend = "decord"
    CHUNK = 8  # consecutive frames per get_batch: sequential decode without re-seeking

    def __init__(self, uri: str, crop: Crop = None, threads: int = 1):
        super().__init__(uri, crop)
        import decord

        self._decord = decord
        self._threads = threads
        self._reader_size: Optional[tuple[int, int]] = None
        source, self._handle = _open_input(uri)
        self._source = source
        rotation, mirrored = read_orientation(uri)
        if rotation or mirrored:
            # decord turns some rotations itself and mangles others (a 90-degree file came back
            # with 4 channels): refuse rather than guess which.
            _check_orientation(uri, rotation, mirrored)
            self.close()
            raise VideoOpenError(uri, f"its display matrix rotates it by {rotation} degrees and --decoder "
                                      "decord does not apply that reliably, so rotation is not applied; "
                                      "use --decoder pyav")
        self.rotation = 0
        self._vr = self._open((-1, -1))
        self.num_frames = len(self._vr)
        rate = self._vr.get_avg_fps()
        self.fps = Fraction(rate).limit_denominator(1001) if rate else None
        first = self._vr[0].shape if self.num_frames else (0, 0, 3)
        self.height, self.width = int(first[0]), int(first[1])
        self._vr.seek(0)

    def _open(self, size: tuple[int, int]) -> Any:
        try:
            return self._decord.VideoReader(self._source, ctx=self._decord.cpu(0), width=size[0],
                                            height=size[1], num_threads=self._threads)
        except Exception as exc:  # decord raises its own DECORDError, or RuntimeError
            raise VideoOpenError(self.uri, str(exc)) from exc

    def _frames(self, start: int, end: Optional[int], output_size, rgba: bool) -> Iterator[Frame]:
        vr = self._vr  # decord decodes to 3 channels only: ``rgba`` is a request, not a promise
        if output_size:
            if self.crop is not None:
                raise ValueError("--resize fast with --decoder decord cannot crop first; "
                                 "use --decoder pyav or --resize exact")
            if self._handle is not None:
                self._handle.seek(0)
            vr = self._open(tuple(output_size))
        stop = len(vr) if end is None else min(end, len(vr))
        for chunk_start in range(start, stop, self.CHUNK):
            indices = list(range(chunk_start, min(chunk_start + self.CHUNK, stop)))
            try:
                batch = vr.get_batch(indices).asnumpy()
                stamps = vr.get_frame_timestamp(indices)
            except Exception as exc:  # DECORDError carries no frame index of its own
                raise VideoDecodeError(self.uri, indices[0], str(exc)) from exc
            for offset, index in enumerate(indices):
                rgb = batch[offset] if output_size else self._crop(batch[offset])
                yield index, rgb, float(stamps[offset][0])

    def close(self) -> None:
        self._vr = None
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
            self._handle = None


def open_video(uri: str, backend: str = "pyav", crop: Crop = None, threads: int = 1) -> VideoSource:
    """Open ``uri`` (a local path or an fsspec URL) with ``backend``; ``crop`` = (x, y, w, h).

    Raises :class:`VideoOpenError` if the file is not a readable video.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--decoder must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads < 1:
        raise ValueError(f"--decode-threads must be >= 1, got {threads}")
    try:
        if backend == "pyav":
            return PyAVSource(uri, crop, threads)
        return DecordSource(uri, crop, threads)
    except OSError as exc:  # missing, a folder, permissions, an I/O error
        raise VideoOpenError(uri, str(exc), io_error=True) from exc
