"""When to write synthetic datasets: while the training queue runs low.

The queue depth counts datasets waiting for or held by the gatekeeper and the trainer (the one
being trained included). Practice is due while the depth is below `min_queued`: with the
default of 2 the trainer always has the next dataset waiting when it finishes one, and never
more than one, so practice follows the current level closely.
"""

from __future__ import annotations

from nats.js.api import ConsumerInfo


def queue_depth(consumers: list[ConsumerInfo]) -> int:
    """Messages not yet delivered plus those delivered and not yet acknowledged."""
    return sum(info.num_pending + info.num_ack_pending for info in consumers)


def datasets_due(depth: int, min_queued: int) -> int:
    """How many datasets to write now for a queue `depth` deep."""
    return max(0, min_queued - depth)
