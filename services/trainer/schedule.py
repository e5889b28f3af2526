"""The learning-rate schedules: the factor on the peak learning rate at each step.

- `continual_multiplier`: one linear warmup over the trainer's first global steps (never again:
  AdamW's moments carry over, so a later dataset needs no warmup), and within every dataset's
  run a cosine decay from the peak to 10 % (warm restarts, as SGDR). The decay is restarted on
  purpose: only a run's final checkpoint is scored, and annealed weights are far better than
  weights at the peak rate. Measured on the tiny model, Binary level 1, 2,000 steps of 16 rows:
  held out, 89.6 % right after 1,500 steps with the decay against 75 % at a constant peak (and
  78 % after all 2,000), training loss 0.003 against 0.016.
- `lr_multiplier`: one dataset's run on its own: linear warmup, then cosine decay to 10 %.
"""

from __future__ import annotations

import math

MIN_LR_RATIO = 0.1


def continual_multiplier(global_step: int, warmup_steps: int, step: int = 0, total_steps: int = 1) -> float:
    """The factor for optimizer step `step` (0-based) of a run of `total_steps`, which is the
    trainer's step `global_step` (0-based) over all datasets."""
    warmup = (global_step + 1) / (warmup_steps + 1) if warmup_steps and global_step < warmup_steps else 1.0
    return warmup * lr_multiplier(step, 0, total_steps)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
