"""When a run has diverged: a loss that is not a number, or one that explodes.

A diverged run is stopped at once and fails for good (`training.failed`, will_retry false):
retrying the same data from the same weights with the same seed diverges again. Its last
checkpoint is never marked final, so it is never scored as a candidate (the evaluator scores
final checkpoints only), and nothing downstream ever sees a non-finite number from it.

Exploding: after `warmup` steps, a loss above `factor` times the exponential moving average
of the run's losses so far, and above `floor`. A loss spike that large on a learning run is not
noise: at a moving average of 0.2 it takes a loss of 4 (with the default factor of 20). The
floor keeps a model that has all but memorised its data from tripping it: at a moving average
of 0.0007 (the demo's model after 1,800 steps) a single harder batch at 0.0144 is 20x, and still
a loss no diverging run has (1 nat a token: a guess among e choices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class Diverged(RuntimeError):
    """The run's loss is not finite or has exploded; the message says which and where."""


@dataclass
class DivergenceGuard:
    factor: float = 20.0
    floor: float = 1.0
    warmup: int = 20
    smoothing: float = 0.1
    _average: float | None = field(default=None, init=False)
    _seen: int = field(default=0, init=False)

    def check(self, step: int, loss: float, grad_norm: float | None = None) -> None:
        """Raise Diverged when `loss` (or the gradient norm) at `step` shows divergence."""
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at step {step}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise Diverged(f"gradient norm is {grad_norm} at step {step} (loss {loss:.4f})")
        if (self._average is not None and self._seen >= self.warmup
                and loss > max(self.factor * self._average, self.floor)):
            raise Diverged(
                f"loss exploded at step {step}: {loss:.4f} is more than {self.factor:g}x its moving average "
                f"{self._average:.4f}"
            )
        self._seen += 1
        self._average = loss if self._average is None else (1 - self.smoothing) * self._average + self.smoothing * loss
