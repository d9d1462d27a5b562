"""Sharding: deterministic, balanced by frames, never mixing views, long videos split."""

from __future__ import annotations

import random

from videofeat.manifests.shards import ShardingConfig, assign_shards, whole_video_unit


def _skewed(seed: int, view: str = "rear") -> list:
    rng = random.Random(seed)
    sizes = [rng.choice([40, 300, 900]) for _ in range(60)] + [16_000, 15_000, 9_000]
    return [whole_video_unit(f"{view}_{i:03d}", view, n) for i, n in enumerate(sizes)]


def _loads(assigned):
    loads = {}
    for shard, unit in assigned:
        loads[shard] = loads.get(shard, 0) + unit.work
    return loads


def test_bound_without_and_with_splitting():
    for seed in range(5):
        units = _skewed(seed)
        largest = max(u.work for u in units)
        for n in (2, 4, 8, 16):
            loads = _loads(assign_shards(units, ShardingConfig(num_shards=n)))
            mean = sum(loads.values()) / len(loads)
            assert max(loads.values()) <= mean + (1 - 1 / n) * largest
            split = assign_shards(units, ShardingConfig(num_shards=n, split_long_videos=True))
            split_loads = _loads(split)
            assert len(split_loads) == n
            assert max(split_loads.values()) <= 1.25 * (sum(split_loads.values()) / n)


def test_split_pieces_cover_each_video_exactly():
    units = _skewed(1)
    assigned = assign_shards(units, ShardingConfig(num_shards=8, split_long_videos=True))
    pieces = {}
    for _, unit in assigned:
        pieces.setdefault(unit.video_id, []).append(unit)
    for video_id, parts in pieces.items():
        parts.sort(key=lambda u: u.piece_index)
        assert parts[0].piece_start_frame == 0 and parts[-1].piece_end_frame == parts[0].num_frames
        assert all(a.piece_end_frame == b.piece_start_frame for a, b in zip(parts, parts[1:]))
        assert all(p.num_pieces == len(parts) for p in parts)
        assert all(p.piece_start_frame % 16 == 0 for p in parts)
    assert any(len(p) > 1 for p in pieces.values())


def test_deterministic_and_views_never_mixed():
    units = _skewed(2, "rear") + _skewed(3, "dashboard")
    shuffled = units[:]
    random.Random(9).shuffle(shuffled)
    config = ShardingConfig(num_shards=4)
    first, second = assign_shards(units, config), assign_shards(shuffled, config)
    assert sorted((s, u.video_id) for s, u in first) == sorted((s, u.video_id) for s, u in second)
    views = {}
    for shard, unit in first:
        views.setdefault(shard, set()).add(unit.view)
    assert len(views) == 8 and all(len(v) == 1 for v in views.values())
    # --num-shards is capped at the number of units; --shard-frames sizes by frames.
    assert len(_loads(assign_shards(units[:3], ShardingConfig(num_shards=50)))) == 3
    by_frames = _loads(assign_shards(_skewed(2), ShardingConfig(shard_frames=10_000)))
    assert len(by_frames) == -(-sum(u.work for u in _skewed(2)) // 10_000)
