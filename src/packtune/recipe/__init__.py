"""The training recipe and its parts: engines, steps, checkpoints, metrics."""
