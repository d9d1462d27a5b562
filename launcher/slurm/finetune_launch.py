"""One fine-tuning job on SLURM: ``slurm/finetune.sbatch`` filled for ``srun torchrun``.

Used by ``videofeat slurm finetune`` and by the fine-tuning jobs of ``videofeat slurm pipeline``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from videofeat.launcher.slurm.submit import SbatchOptions

log = logging.getLogger("videofeat.slurm")


@dataclass(frozen=True)
class FinetuneLaunch:
    """One fine-tuning job: ``nodes x tasks_per_node`` torchrun agents of ``procs_per_task`` ranks."""

    output: str
    finetune_args: tuple[str, ...]
    options: "SbatchOptions"
    nodes: int = 1
    tasks_per_node: int = 1
    procs_per_task: int = 1
    shutdown_timeout: int = 60
    grace_s: int = 120
    max_requeues: int = 3
    log_dir: Optional[str] = None
    job_name: Optional[str] = None
    python: str = field(default_factory=lambda: sys.executable)
    chdir: str = field(default_factory=os.getcwd)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("--output is required: checkpoints and the PREEMPTED marker go there")
        for name in ("nodes", "tasks_per_node", "procs_per_task", "shutdown_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        if self.grace_s <= self.shutdown_timeout:
            log.warning("--grace %d s is not longer than --shutdown-timeout %d s: a checkpoint at the time limit "
                        "may be cut off", self.grace_s, self.shutdown_timeout)
        if self.log_dir is None:
            object.__setattr__(self, "log_dir", os.path.join(self.output, "slurm"))
        if self.job_name is None:
            object.__setattr__(self, "job_name", f"vf-ft-{os.path.basename(self.output.rstrip('/'))}")

    def render(self) -> str:
        from videofeat.launcher.slurm.submit import directive_block, quote, render

        options = self.options
        return render("finetune.sbatch", {
            "nodes": self.nodes, "tasks_per_node": self.tasks_per_node, "procs_per_task": self.procs_per_task,
            "output": quote(self.output), "job_name": self.job_name, "log_dir": self.log_dir, "grace": self.grace_s,
            "directives": directive_block([f"--chdir={self.chdir}", *options.directives()]),
            "srun_options": f"--cpus-per-task={options.cpus_per_task} " if options.cpus_per_task else "",
            "torchrun": f"{quote(self.python)} -m torch.distributed.run",
            "shutdown_timeout": self.shutdown_timeout, "max_requeues": self.max_requeues,
            "finetune_args": " ".join(quote(a) for a in self.finetune_args)})
