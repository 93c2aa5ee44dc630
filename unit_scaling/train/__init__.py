"""Training: mesh and shardings, optimizer, checkpoints, metrics and the loop."""

from unit_scaling._extras import require

require("train", "unit_scaling.train", "flax", "optax", "orbax", "ml_collections", "grain", "jmp")
