"""What shard integrity costs: SHA-256 of a committed shard, and reading it with page CRCs verified.

Writes one real shard with ShardWriter (``--videos`` x ``--windows`` windows of ``--dim``
float32 features and ``--classes`` probabilities), then times hashing it (done once at commit
and once per shard by ``reduce``) and reading it with and without page checksum verification.

    python benchmarks/shard_integrity.py [--videos 20] [--windows 1000] [--dim 1024] [--classes 58]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import fsspec
import numpy as np
import pyarrow.parquet as pq

from videofeat.manifests import fsutil
from videofeat.workers.shard_io import ShardWriter, shard_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=20)
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=58)
    args = parser.parse_args()
    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "00000.parquet")
        writer = ShardWriter(path, fs, shard_schema(args.dim, args.classes), {"fingerprint": "bench"})
        n = args.windows
        for v in range(args.videos):
            writer.write_video(video_id=f"v{v}", session_id="s", view="rear", window_index=list(range(n)),
                               start_frame=list(range(n)), end_frame=list(range(n)), start_s=[0.0] * n,
                               end_s=[0.0] * n, center_s=[0.0] * n,
                               feature=rng.standard_normal((n, args.dim), dtype=np.float32),
                               probs=rng.random((n, args.classes), dtype=np.float32))
        writer.close()
        size_mb = os.path.getsize(path) / 1e6
        cases = [("sha256 of the file", lambda: fsutil.file_digest(fs, path)),
                 ("read, CRCs verified", lambda: pq.ParquetFile(path, page_checksum_verification=True).read()),
                 ("read, unverified", lambda: pq.ParquetFile(path).read())]
        for name, fn in cases:
            fn()  # warm the page cache
            began = time.perf_counter()
            fn()
            seconds = time.perf_counter() - began
            print(f"{name:<22} {size_mb:.0f} MB in {seconds:.3f} s = {size_mb / seconds:.0f} MB/s")


if __name__ == "__main__":
    main()
