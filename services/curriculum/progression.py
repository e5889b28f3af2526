"""When a skill's level goes up: the curriculum's progression rule.

Each skill has a level (1..max). Every evaluation's accuracy at the skill's current level
("<skill>/<level>" in `EvalScored.by_level`) is recorded; when each of the last `window`
evaluations reached `threshold`, the level goes up by one and the record starts afresh. The
level never passes `max_level` and never goes down. An evaluation is counted once, keyed by
(checkpoint sha256, suite version), however often it is delivered.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from libs.common.records import LevelChange, SkillState

# Keys of counted evaluations are kept this long; redeliveries come much sooner.
SEEN_KEPT = 256
CHANGES_KEPT = 100


class Progression(msgspec.Struct, frozen=True):
    state: SkillState
    reason: str
    change: LevelChange | None = None
    already_counted: bool = False


def eval_key(checkpoint_sha256: str, suite_version: str) -> str:
    return f"{checkpoint_sha256}:{suite_version}"


def progress(
    state: SkillState, key: str, by_level: dict[str, float], *,
    threshold: float, window: int, max_level: int, now: datetime, event_id: str,
) -> Progression:
    """The skill's state after one evaluation, and the level change it causes, if any."""
    if key in state.seen:
        return Progression(state, "evaluation already counted", already_counted=True)
    seen = [*state.seen, key][-SEEN_KEPT:]
    level_key = f"{state.skill}/{state.level}"
    if level_key not in by_level:
        return Progression(msgspec.structs.replace(state, seen=seen), f"evaluation has no score for {level_key}")
    accuracy = by_level[level_key]
    recent = [*state.recent, accuracy][-window:]
    if state.level >= max_level:
        return Progression(
            msgspec.structs.replace(state, seen=seen, recent=recent),
            f"{level_key} accuracy {accuracy:.3f}; already at the top level {max_level}",
        )
    if len(recent) < window or min(recent) < threshold:
        return Progression(
            msgspec.structs.replace(state, seen=seen, recent=recent),
            f"{level_key} accuracy {accuracy:.3f}; the level rises after {window} evaluations in a row "
            f"at >= {threshold} (recent: {', '.join(f'{a:.3f}' for a in recent)})",
        )
    reason = (
        f"{level_key} accuracy >= {threshold} in the last {window} evaluations "
        f"({', '.join(f'{a:.3f}' for a in recent)}): level {state.level} -> {state.level + 1}"
    )
    change = LevelChange(
        time=now, previous_level=state.level, level=state.level + 1, accuracy=accuracy,
        reason=reason, eval_key=key, event_id=event_id,
    )
    new_state = msgspec.structs.replace(
        state, level=state.level + 1, recent=[], seen=seen, changes=[*state.changes, change][-CHANGES_KEPT:],
    )
    return Progression(new_state, reason, change)
