"""The learning-rate schedule of one dataset's run: linear warmup, then cosine decay to 10 %.

Each dataset is its own run with its own schedule: continual training across datasets
re-warms from the last weights instead of decaying towards zero forever.
"""

from __future__ import annotations

import math

MIN_LR_RATIO = 0.1


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
