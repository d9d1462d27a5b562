"""SLURM submission: the ``videofeat slurm`` command, sbatch rendering, extraction arrays, submission records."""
