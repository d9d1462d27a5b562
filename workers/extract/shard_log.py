"""A shard's own log file, ``RUN_DIR/logs/<shard>.<attempt>.log``, mirrored while the shard runs."""

from __future__ import annotations

import logging
from typing import Optional

from videofeat.manifests import fsutil
from videofeat.manifests.ledger import RunDir


class ShardLog:
    """Mirror the log into ``RUN_DIR/logs/<shard>.<attempt>.log`` while a shard runs."""

    def __init__(self, run: RunDir, shard_id: int, attempt: int, rank: int):
        self.run, self.path = run, run.log_path(shard_id, attempt)
        self.local = fsutil.is_local(run.fs)
        run.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            self.handler: logging.Handler = _FileLog(self.path)
        else:
            import io

            self._buffer = io.StringIO()
            self.handler = logging.StreamHandler(self._buffer)
            run.fs.pipe_file(self.path, b"")  # the attempt is visible at once
        # The console's format (launcher/logs.py), so a shard log reads like the rank's output.
        console = next((h.formatter for h in logging.getLogger().handlers if h.formatter), None)
        self.handler.setFormatter(console or logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        if not self.local:
            self.run.fs.pipe_file(self.path, self._buffer.getvalue().encode())


class _FileLog(logging.FileHandler):
    """A shard's log file that, on a full disk, says so once on stderr instead of once per line."""

    failed = False

    def handleError(self, record: Optional[logging.LogRecord]) -> None:
        if not self.failed:
            self.failed = True
            import sys

            print(f"videofeat: cannot write the shard log {self.baseFilename}: {sys.exc_info()[1]}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last buffered lines did not fit either
            self.handleError(None)
