"""The run machinery: building and fitting a Trainer, strategies, SLURM, checkpoint saving, devices."""
