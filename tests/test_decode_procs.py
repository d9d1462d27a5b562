"""The default number of decode processes follows the CPUs a rank may use, not the node's count."""

import os
import subprocess
import sys

from videofeat.workers.decode.pool import MAX_DEFAULT_DECODE_PROCS, default_decode_procs, ranks_sharing_cpus


def _in_child(code: str, cpus: set[int], env: dict) -> str:
    """Run ``code`` in a child whose affinity mask is ``cpus`` (as SLURM or taskset would set it)."""
    script = f"import os; os.sched_setaffinity(0, {sorted(cpus)!r}); {code}"
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_torchrun_local_ranks_share_their_agents_cpus():
    assert ranks_sharing_cpus({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_sharing_cpus({}) == 1
    cpus = len(os.sched_getaffinity(0))
    assert default_decode_procs({}) == max(1, min(MAX_DEFAULT_DECODE_PROCS, cpus - 1))
    # Eight ranks on this node: each gets its share, never the whole node.
    assert default_decode_procs({"LOCAL_WORLD_SIZE": "8"}) == max(1, min(MAX_DEFAULT_DECODE_PROCS, cpus // 8 - 1))


def test_the_affinity_mask_not_the_node_sizes_the_pool():
    code = ("from videofeat.workers.decode.pool import default_decode_procs, usable_cpus; "
            "print(usable_cpus(), default_decode_procs())")
    assert _in_child(code, {0}, {}) == "1 1"
    # Unbound SLURM tasks on one node share it; a task bound to its own CPUs shares them with none.
    if (os.cpu_count() or 1) >= 2 and len(os.sched_getaffinity(0)) == os.cpu_count():
        whole = set(range(os.cpu_count()))
        unbound = _in_child("from videofeat.workers.decode.pool import ranks_sharing_cpus; print(ranks_sharing_cpus())",
                            whole, {"SLURM_NTASKS_PER_NODE": "2"})
        bound = _in_child("from videofeat.workers.decode.pool import ranks_sharing_cpus; print(ranks_sharing_cpus())",
                          {0}, {"SLURM_NTASKS_PER_NODE": "2"})
        assert (unbound, bound) == ("2", "1")
