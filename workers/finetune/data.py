"""Labelled clips for fine-tuning, read straight from the untrimmed videos.

A :class:`Segment` is a labelled frame range ``[start_frame, end_frame)`` of one video. Segments
come from the labels table joined to the manifest (one view, one split: the seed trained one
model per view), or from the seed's ``<path> <label>`` list of pre-cut clips (a whole file per
line). :class:`ClipDataset` samples frame indices (``clip_sampling``), decodes exactly those
frames through the extraction decoder layer (seek to the keyframe before, decode forward), and
augments them (``augment``); everything random is a function of (seed, epoch, index, copy).

A segment that fails to decode is logged and, in training, replaced by another segment drawn
from the same deterministic generator; in evaluation it is marked invalid and not counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from videofeat.manifests.manifest import ManifestRow, read_manifest_rows
from videofeat.manifests.views import canonical_view

from videofeat.workers.finetune.augment import ClipTransform, resize_short_side
from videofeat.workers.finetune.clip_sampling import SamplingConfig, clip_indices, sample_rng

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 10


@dataclass(frozen=True)
class Segment:
    """One labelled span of a video; ``end_frame=None`` means to the end of the file."""

    uri: str
    label: int
    start_frame: int = 0
    end_frame: Optional[int] = None
    video_id: str = ""
    crop: Optional[tuple[int, int, int, int]] = None


def segments_from_tables(labels, manifest, view: str, split: str, num_classes: int) -> list[Segment]:
    """Segments of ``view`` in ``split`` (pyarrow tables with the labels / manifest columns).

    Times become frames with the manifest's exact fps (``round(t * fps)``), clamped to the
    video. Labels of videos the manifest lacks or marks unusable are reported, never dropped
    in silence.
    """
    view = canonical_view(view)
    videos: dict[str, ManifestRow] = {}
    for video_row in read_manifest_rows(manifest):
        if video_row.piece_index == 0:
            videos.setdefault(video_row.video_id, video_row)
    segments, missing, unusable, empty = [], set(), set(), 0
    for row in labels.to_pylist():
        if row["view"] != view or row["split"] != split:
            continue
        video = videos.get(row["video_id"])
        if video is None:
            missing.add(row["video_id"])
            continue
        if video.status != "ok" or not video.fps:
            unusable.add(f"{row['video_id']} ({video.status}: {video.error})")
            continue
        label = int(row["label_id"])
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} of {row['video_id']} at {row['start_s']} s is outside "
                             f"[0, {num_classes}); set --num-classes")
        fps, num_frames = video.fps, video.num_frames
        start = max(0, int(round(row["start_s"] * fps)))
        end = min(num_frames, int(round(row["end_s"] * fps)))
        if end <= start:
            empty += 1
            log.warning("%s: segment %.2f-%.2f s of label %d holds no frame; skipped",
                        row["video_id"], row["start_s"], row["end_s"], label)
            continue
        segments.append(Segment(video.uri, label, start, end, row["video_id"], video.crop))
    if missing:
        log.warning("%d labelled %s video(s) are not in the manifest, their labels are skipped: %s",
                    len(missing), view, ", ".join(sorted(missing)[:10]))
    if unusable:
        log.warning("%d labelled %s video(s) are not usable, their labels are skipped: %s",
                    len(unusable), view, "; ".join(sorted(unusable)[:10]))
    return sorted(segments, key=lambda s: (s.video_id, s.start_frame, s.label))


def load_segments(labels_path: str, manifest_path: str, view: str, split: str, num_classes: int) -> list[Segment]:
    from videofeat.manifests.labels import read_labels
    from videofeat.manifests.manifest import read_manifest

    segments = segments_from_tables(read_labels(labels_path), read_manifest(manifest_path), view, split,
                                    num_classes)
    if not segments:
        raise ValueError(f"no {split} segments of view {view!r} in {labels_path} (joined with "
                         f"{manifest_path}); check --view and the labels' split column")
    return segments


def read_clip_list(path: str, num_classes: int) -> list[Segment]:
    """The seed's list: one ``<path> <label>`` per line, no header; relative paths are taken
    relative to the list's folder."""
    base = os.path.dirname(os.path.abspath(path))
    segments = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{number}: expected '<path> <integer label>', got {line!r}")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise ValueError(f"{path}:{number}: label {label} is outside [0, {num_classes}); set --num-classes")
            clip = parts[0] if "://" in parts[0] or os.path.isabs(parts[0]) else os.path.join(base, parts[0])
            segments.append(Segment(clip, label, video_id=os.path.splitext(os.path.basename(clip))[0]))
    if not segments:
        raise ValueError(f"{path} lists no clips")
    return segments


def read_frames(segment: Segment, indices: np.ndarray, decoder: str = "pyav") -> np.ndarray:
    """Decode exactly the frames ``indices`` (sorted, may repeat) -> (T, H, W, 3) uint8."""
    from videofeat.workers.decode.decoders import open_video

    wanted = sorted(set(int(i) for i in indices))
    found: dict[int, np.ndarray] = {}
    with open_video(segment.uri, backend=decoder, crop=segment.crop) as source:
        for index, rgb, _ in source.stream(wanted[0], wanted[-1] + 1):
            if index in wanted:
                found[index] = rgb
    if len(found) != len(wanted):
        lost = [i for i in wanted if i not in found]
        raise ValueError(f"{segment.uri}: frames {lost[:5]} of [{segment.start_frame}, {segment.end_frame}) "
                         "could not be decoded (the video is shorter than the manifest says)")
    return np.stack([found[int(i)] for i in indices])


def _end_frame(segment: Segment, decoder: str) -> int:
    if segment.end_frame is not None:
        return segment.end_frame
    from videofeat.workers.decode.decoders import open_video

    with open_video(segment.uri, backend=decoder, crop=segment.crop) as source:
        if source.num_frames:
            return int(source.num_frames)
        return sum(1 for _ in source.stream(0, None))  # container without a frame count


class ClipDataset(Dataset):
    """A map-style dataset of clips; call :meth:`set_epoch` before each epoch.

    An item is ``{"clips": (num_sample, C, T, S, S) float, "label", "index", "valid"}``: in
    training, ``num_sample`` independently augmented copies of one sampled clip (VideoMAE's
    repeated augmentation); in evaluation one centre clip.
    """

    def __init__(self, segments: Sequence[Segment], sampling: SamplingConfig, transform: ClipTransform, *,
                 train: bool, num_sample: int = 1, seed: int = 0, decoder: str = "pyav"):
        if not segments:
            raise ValueError("a clip dataset needs at least one segment")
        if num_sample < 1:
            raise ValueError(f"--num-sample must be >= 1, got {num_sample}")
        self.segments = list(segments)
        self.sampling = sampling
        self.transform = transform
        self.train = train
        self.num_sample = num_sample if train else 1
        self.seed = seed
        self.decoder = decoder
        self.epoch = 0
        self._ends: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.segments)

    def sample_indices(self, index: int) -> np.ndarray:
        """The frame indices item ``index`` reads this epoch (its first copy's, shared by all copies)."""
        segment = self.segments[index]
        if index not in self._ends:
            self._ends[index] = _end_frame(segment, self.decoder)
        rng = sample_rng(self.seed, self.epoch, index) if self.train else None
        return clip_indices(self.sampling, segment.start_frame, self._ends[index], rng)

    def load(self, index: int) -> Any:
        """The augmented copies of item ``index`` (raises if its video cannot be decoded)."""
        frames = read_frames(self.segments[index], self.sample_indices(index), self.decoder)
        frames = resize_short_side(frames, self.transform.config.short_side_size)
        clips = []
        for copy in range(self.num_sample):
            seed = int(sample_rng(self.seed, self.epoch, index, copy, stream=1).integers(2**31))
            clips.append(self.transform(frames, seed))
        return torch.stack(clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        original = index
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                clips = self.load(index)
                return {"clips": clips, "label": self.segments[index].label, "index": original, "valid": True}
            except Exception as exc:  # any bad video: a log line and a replacement, never a dead epoch
                segment = self.segments[index]
                log.warning("cannot read clip %d (%s [%s, %s)): %s", index, segment.uri, segment.start_frame,
                            segment.end_frame, exc)
                if not self.train:
                    size = self.transform.config.input_size
                    empty = torch.zeros(1, 3, self.sampling.num_frames, size, size)
                    return {"clips": empty, "label": segment.label, "index": original, "valid": False}
                rng = sample_rng(self.seed, self.epoch, original, attempt, stream=2)
                index = int(rng.integers(len(self.segments)))
        raise RuntimeError(f"{MAX_REPLACEMENTS + 1} clips in a row failed to decode, starting at item "
                           f"{original} ({self.segments[original].uri}); the data is unreadable")


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled with seed + epoch, padded to a multiple of the world size)
    that can start part-way into an epoch: ``set_epoch(epoch, skip=n)`` drops this rank's first
    ``n`` samples, which a run resumed mid-epoch has already trained on."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


def eval_indices(length: int, num_replicas: int, rank: int) -> list[int]:
    """Rank ``rank``'s share of an evaluation set: every sample exactly once over all ranks (no
    padding duplicates, unlike DistributedSampler), so reduced metrics equal a 1-rank run."""
    return list(range(rank, length, num_replicas))
