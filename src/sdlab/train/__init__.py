"""Training loops, data, EMA, run checkpoints. May import every layer below `api`."""
