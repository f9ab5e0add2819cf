"""Training: config, loop, checkpoints, distributed set-up."""
