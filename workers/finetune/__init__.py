"""Fine-tuning: the DDP loop, checkpoints and resume, evaluation, clip data, sampling, augmentation, optimiser."""
