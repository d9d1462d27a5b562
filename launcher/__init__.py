"""Entry points: the ``videofeat`` command, torchrun scripts and SLURM submission."""
