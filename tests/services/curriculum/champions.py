"""Champion records as the deployer writes them, with per-level scores, for the curriculum's tests."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgspec

from libs.common.events import LevelScore
from libs.common.records import Champion

NOW = datetime(2025, 1, 1, tzinfo=UTC)
SUITE = "binary-v1-x"
ITEMS_PER_LEVEL = 48


def level_score(correct: int, total: int = ITEMS_PER_LEVEL) -> LevelScore:
    """`correct` of `total` with its 95% Wilson interval."""
    z, p = 1.96, correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return LevelScore(correct=correct, total=total, accuracy=p, low=low, high=high)


def champion(name: str, correct: dict[int, int], *, suite: str = SUITE, skill: str = "binary") -> Champion:
    """Checkpoint `name` (its sha256 is `name` repeated) as champion, `correct[level]` of 48 right at each level."""
    levels = {f"{skill}/{level}": level_score(c) for level, c in correct.items()}
    return Champion(
        checkpoint_uri=f"file:///ckpt/{name}", checkpoint_sha256=(name * 64)[:64], run_id=f"run-{name}", step=1,
        exact_match=sum(s.correct for s in levels.values()) / max(1, sum(s.total for s in levels.values())),
        val_loss=1.0, suite_version=suite, deployed_at=NOW, event_id=f"deploy-{name}-{suite}", levels=levels,
    )


def rolled_back_to(target: Champion, current: Champion) -> Champion:
    """The record a rollback from `current` to `target` writes (as the deployer's `rollback`)."""
    return msgspec.structs.replace(
        target, event_id=f"rollback-{target.run_id}", kind="rollback", previous_checkpoint_uri=current.checkpoint_uri,
        reason=f"rollback from {current.checkpoint_uri}", rolled_back_runs=[current.run_id],
    )
