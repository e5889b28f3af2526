"""When to write a synthetic dataset: after the training queue has stayed empty for a while.

The queue depth counts datasets waiting for or held by the gatekeeper and the trainer. A
synthetic dataset is due once the depth has been zero for `idle_seconds` without a break.
After one is written the timer starts over, and the dataset itself keeps the depth above
zero until it is trained (or rejected), so there is never more than one outstanding.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.api import ConsumerInfo


@dataclass
class IdleTimer:
    idle_seconds: float
    idle_since: float | None = None

    def observe(self, depth: int, now: float) -> bool:
        """Record the depth seen at `now` (monotonic seconds); True when a dataset is due."""
        if depth > 0:
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        return now - self.idle_since >= self.idle_seconds

    def restart(self) -> None:
        self.idle_since = None


def queue_depth(consumers: list[ConsumerInfo]) -> int:
    """Messages not yet delivered plus those delivered and not yet acknowledged."""
    return sum(info.num_pending + info.num_ack_pending for info in consumers)
