"""Training: mesh and shardings, optimizer, checkpoints, metrics and the loop."""
