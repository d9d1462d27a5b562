"""Packing videos into shards: frozen, deterministic, balanced by frame count.

A shard is the unit of work, of commit and of rerun. Membership depends only on the manifest
(never on the number of GPUs), views are packed separately (a shard never mixes views), and the
packing is largest-first onto the least-loaded shard, ties broken by ``video_id``: the same
manifest gives the same shards on any machine.

Long videos may be split into pieces by window START frame (a piece holds the windows whose
start frame lies in ``[f0, f1)``), so one 9-minute video need not hold back a whole shard.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence

DEFAULT_SHARD_FRAMES = 54_000  # 30 minutes of 30 fps video
PIECE_ALIGN = 16  # piece boundaries on multiples of the seed presets' hop


@dataclass(frozen=True)
class WorkUnit:
    video_id: str
    view: str
    num_frames: int
    piece_index: int = 0
    num_pieces: int = 1
    piece_start_frame: int = 0
    piece_end_frame: int = 0

    @property
    def work(self) -> int:
        return self.piece_end_frame - self.piece_start_frame


@dataclass(frozen=True)
class ShardingConfig:
    num_shards: Optional[int] = None  # per view
    shard_frames: int = DEFAULT_SHARD_FRAMES
    split_long_videos: bool = False

    def __post_init__(self) -> None:
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"--num-shards must be >= 1, got {self.num_shards}")
        if self.shard_frames < 1:
            raise ValueError(f"--shard-frames must be >= 1, got {self.shard_frames}")


def whole_video_unit(video_id: str, view: str, num_frames: int) -> WorkUnit:
    return WorkUnit(video_id, view, num_frames, 0, 1, 0, num_frames)


def split_video(video_id: str, view: str, num_frames: int, max_piece_frames: int) -> list[WorkUnit]:
    """Cut a video into pieces of at most ``max_piece_frames`` start frames, aligned to 16."""
    piece = max(PIECE_ALIGN, (max_piece_frames // PIECE_ALIGN) * PIECE_ALIGN)
    count = max(1, math.ceil(num_frames / piece))
    if count == 1:
        return [whole_video_unit(video_id, view, num_frames)]
    bounds = [min(i * piece, num_frames) for i in range(count)] + [num_frames]
    return [WorkUnit(video_id, view, num_frames, i, count, bounds[i], bounds[i + 1]) for i in range(count)]


def _shard_count(total_work: int, num_units: int, config: ShardingConfig) -> int:
    wanted = config.num_shards if config.num_shards is not None else math.ceil(total_work / config.shard_frames)
    return max(1, min(wanted, num_units))


def pack_view(units: Sequence[WorkUnit], config: ShardingConfig) -> list[list[WorkUnit]]:
    """Pack one view's videos into shards (a list of units per shard)."""
    if not units:
        return []
    total = sum(u.work for u in units)
    count = _shard_count(total, len(units), config)
    if config.split_long_videos:
        # Anything over a quarter of the mean shard's work is cut, which bounds the heaviest
        # shard by mean + 3/4 * mean/4 < 1.19 x mean.
        limit = max(PIECE_ALIGN, total // count // 4)
        pieces: list[WorkUnit] = []
        for unit in units:
            pieces += split_video(unit.video_id, unit.view, unit.num_frames, limit) if unit.work > limit else [unit]
        units = pieces
        count = _shard_count(total, len(units), config)
    order = sorted(units, key=lambda u: (-u.work, u.video_id, u.piece_index))
    heap = [(0, index) for index in range(count)]
    shards: list[list[WorkUnit]] = [[] for _ in range(count)]
    for unit in order:
        load, index = heapq.heappop(heap)
        shards[index].append(unit)
        heapq.heappush(heap, (load + unit.work, index))
    # Within a shard, work in (video_id, piece) order: the order a reader expects.
    return [sorted(s, key=lambda u: (u.video_id, u.piece_index)) for s in shards]


def assign_shards(units: Sequence[WorkUnit], config: ShardingConfig) -> list[tuple[int, WorkUnit]]:
    """(shard_id, unit) for every unit; views in sorted order, shard ids consecutive from 0."""
    by_view: dict[str, list[WorkUnit]] = {}
    for unit in units:
        by_view.setdefault(unit.view, []).append(unit)
    assigned: list[tuple[int, WorkUnit]] = []
    next_id = 0
    for view in sorted(by_view):
        for shard in pack_view(by_view[view], config):
            assigned += [(next_id, unit) for unit in shard]
            next_id += 1
    return assigned
