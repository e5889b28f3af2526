"""The learning-rate schedules: the factor on the peak learning rate at each step.

- `continual_multiplier`: one linear warmup over the trainer's first global steps, then the
  peak for good. Datasets arrive without end; a schedule that decays per dataset spends each
  small dataset's steps warming up and cooling down instead of learning.
- `lr_multiplier`: one dataset's run on its own: linear warmup, then cosine decay to 10 %.
"""

from __future__ import annotations

import math

MIN_LR_RATIO = 0.1


def continual_multiplier(global_step: int, warmup_steps: int) -> float:
    """The factor for the trainer's optimizer step `global_step` (0-based) over all datasets."""
    return (global_step + 1) / (warmup_steps + 1) if warmup_steps and global_step < warmup_steps else 1.0


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
