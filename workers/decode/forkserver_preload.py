"""Imported once by the decode processes' fork server, before it forks any of them.

When the resize kernel is torch's, decode processes fork from a server that imported torch once:
each then shares torch's pages copy-on-write (~17 MB private a process, measured by
``benchmarks/frame_cost.py``) instead of importing it afresh (~290 MB private and ~1.5 s each).
The server ignores the stop signals as the decode processes do: SLURM signals every process of
a step, and a server killed by SIGTERM would take every decode process with it, each looking
like a crash.
"""

from videofeat.workers.signals import ignore_stop_signals

ignore_stop_signals()  # first: the server was started with them blocked (see pool.py)

import torch  # noqa: E402,F401  (the point of this module: imported once, shared by every fork)

import videofeat.workers.decode.pool  # noqa: E402,F401  (what the forked processes run)
