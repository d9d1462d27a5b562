"""Peak memory of the reducer with 10 and with 40 shards: it should not grow with the shard count.

Builds two real run directories (shards written with ShardWriter and committed through the
ledger, each shard >= 5 MB of float32 features), then reduces each in a fresh process and
prints pyarrow's peak pool allocation, the peak RSS and their ratio between the two runs.

    python benchmarks/reduce_memory.py [--videos-per-shard 4] [--windows 480] [--dim 768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from videofeat.manifests.ledger import RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.shard_io import ShardWriter, shard_schema

SPAN, HOP, FPS, CLASSES = 32, 16, 30.0, 16


def build_run(root: str, shards: int, videos_per_shard: int, windows: int, dim: int) -> tuple[str, int]:
    """A complete run directory; returns its path and the size of its smallest shard in bytes."""
    frames = (windows - 1) * HOP + SPAN
    rows, rng = [], np.random.default_rng(shards)
    run = RunDir(os.path.join(root, "run"))
    manifest = os.path.join(root, "manifest.parquet")
    run.initialize({"bench": shards}, {"preset": {"span": SPAN, "hop": HOP, "num_frames": 16, "step": 2}},
                   extra={"manifest": manifest, "views": ["rear"], "feature_dim": dim, "num_classes": CLASSES,
                          "sampling": {"span": SPAN, "hop": HOP, "num_frames": 16, "step": 2}})
    fingerprint = run.fingerprint()
    smallest = None
    idx = np.arange(windows)
    for shard_id in range(shards):
        tmp = run.temp_shard_path(shard_id)
        writer = ShardWriter(tmp, run.fs, shard_schema(dim, CLASSES), {"fingerprint": fingerprint})
        records = []
        for k in range(videos_per_shard):
            session = f"user_id_{shard_id}_NoAudio_{k}"
            video_id = f"Rear_view_{session}"
            writer.write_video(video_id=video_id, session_id=session, view="rear", window_index=idx,
                               start_frame=idx * HOP, end_frame=idx * HOP + SPAN, start_s=idx * HOP / FPS,
                               end_s=(idx * HOP + SPAN) / FPS, center_s=(idx * HOP + SPAN / 2) / FPS,
                               feature=rng.standard_normal((windows, dim), dtype=np.float32),
                               probs=rng.random((windows, CLASSES), dtype=np.float32))
            records.append({"video_id": video_id, "status": "ok", "error": None, "frames_decoded": frames,
                            "windows": windows, "failed_at_frame": None, "seconds": 1.0,
                            "piece_start_frame": 0, "piece_end_frame": frames})
            rows.append({"video_id": video_id, "session_id": session, "view": "rear", "status": "ok",
                         "num_frames": frames, "fps": FPS, "duration_s": frames / FPS, "shard_id": shard_id,
                         "piece_index": 0, "num_pieces": 1, "piece_start_frame": 0, "piece_end_frame": frames})
        writer.close()
        size = os.path.getsize(tmp)
        smallest = size if smallest is None else min(smallest, size)
        run.commit_shard(shard_id, tmp, {"shard_id": shard_id, "fingerprint": fingerprint, "seconds": 1.0,
                                         "windows": windows * videos_per_shard, "videos": records})
    write_manifest(rows, manifest)
    return run.url, int(smallest or 0)


_CHILD = """
import json, resource, sys, time
from videofeat.workers.reduce.merge import ReduceConfig, reduce_run
began = time.monotonic()
summary = reduce_run(ReduceConfig(sys.argv[1], marker_wait_s=0))
print(json.dumps({"pool_peak": pa.default_memory_pool().max_memory(),
                  "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.monotonic() - began, "windows": summary["views"]["rear"]["windows"]}))
"""


def measure(run_url: str) -> dict:
    """Reduce in a fresh interpreter, so peaks belong to this run alone."""
    done = subprocess.run([sys.executable, "-c", _CHILD, run_url], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="10,40", help="shard counts to compare (default 10,40)")
    parser.add_argument("--videos-per-shard", type=int, default=4)
    parser.add_argument("--windows", type=int, default=480, help="windows per video")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension")
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="videofeat-bench-") as tmp:
        for count in counts:
            began = time.monotonic()
            url, smallest = build_run(os.path.join(tmp, f"s{count}"), count, args.videos_per_shard,
                                      args.windows, args.dim)
            built = time.monotonic() - began
            results[count] = dict(measure(url), smallest_shard=smallest, build_seconds=built)
    print(f"{'shards':>6} {'min shard MB':>12} {'windows':>8} {'pool peak MB':>12} {'RSS peak MB':>11} "
          f"{'reduce s':>8}")
    for count, r in results.items():
        print(f"{count:>6} {r['smallest_shard'] / 1e6:>12.1f} {r['windows']:>8} {r['pool_peak'] / 1e6:>12.1f} "
              f"{r['rss_peak'] / 1e6:>11.1f} {r['seconds']:>8.2f}")
    first, last = results[counts[0]], results[counts[-1]]
    print(f"ratio {counts[-1]}/{counts[0]} shards: pyarrow pool peak {last['pool_peak'] / first['pool_peak']:.2f}, "
          f"RSS peak {last['rss_peak'] / first['rss_peak']:.2f} (data grew {counts[-1] / counts[0]:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
