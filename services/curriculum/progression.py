"""When a skill's level goes up: the curriculum's progression rule, judged by the champion.

Each skill has a level (1..max). Only the champion's scores count: the checkpoint the deployer
promoted and serves, scored on the selection suite, as its record holds the scores
(`libs.common.records.Champion.levels`). Evaluations of other checkpoints never do: a level is a
claim about the model that is served.

A champion score is one (checkpoint sha256, suite version) pair: the champion rescored on a new
suite is a new score; the same pair seen again (a redelivery, a rollback to a champion already
counted) counts once. When the champion's accuracy at the skill's current level
("<skill>/<level>") reached `threshold` in each of the last `window` champion scores, the level
goes up by one and the count starts afresh; one score raises a level by one at most. The level
never passes `max_level` and never goes down: a weaker champion (a rollback) can only hold it.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from libs.common.events import LevelScore
from libs.common.records import Champion, LevelChange, SkillState

# Keys of counted champion scores are kept this long (the champion bucket keeps 64 records).
SCORES_KEPT = 256
CHANGES_KEPT = 100


class Progression(msgspec.Struct, frozen=True):
    state: SkillState
    reason: str
    change: LevelChange | None = None
    already_counted: bool = False


def eval_key(checkpoint_sha256: str, suite_version: str) -> str:
    return f"{checkpoint_sha256}:{suite_version}"


def describe(level_key: str, score: LevelScore) -> str:
    """"binary/1 38/48 = 0.79 [0.66, 0.88]": a level's score with its 95% interval."""
    return f"{level_key} {score.correct}/{score.total} = {score.accuracy:.2f} [{score.low:.2f}, {score.high:.2f}]"


def progress(
    state: SkillState, champion: Champion, *,
    threshold: float, window: int, max_level: int, now: datetime, event_id: str,
) -> Progression:
    """The skill's state after one champion score, and the level change it causes, if any."""
    key = eval_key(champion.checkpoint_sha256, champion.suite_version)
    if key in state.champion_scores:
        return Progression(state, f"champion score {key} already counted", already_counted=True)
    counted = [*state.champion_scores, key][-SCORES_KEPT:]
    who = f"champion {champion.checkpoint_sha256[:12]} (run {champion.run_id}, suite {champion.suite_version})"
    level_key = f"{state.skill}/{state.level}"
    score = champion.levels.get(level_key)
    if score is None:
        unscored = msgspec.structs.replace(state, champion_scores=counted)
        return Progression(unscored, f"{who} has no score for {level_key}")
    evidence = f"{who}: {describe(level_key, score)}"
    recent = [*state.recent, score.accuracy][-window:]
    kept = msgspec.structs.replace(state, champion_scores=counted, recent=recent)
    if state.level >= max_level:
        return Progression(kept, f"{evidence}; already at the top level {max_level}")
    if len(recent) < window or min(recent) < threshold:
        return Progression(
            kept, f"{evidence}; the level rises after {window} champion score(s) in a row at >= {threshold} "
                  f"(recent: {', '.join(f'{a:.2f}' for a in recent)})",
        )
    reason = (
        f"{evidence} >= {threshold}"
        + (f" (and the {window - 1} champion score(s) before: {', '.join(f'{a:.2f}' for a in recent[:-1])})"
           if window > 1 else "")
        + f": level {state.level} -> {state.level + 1}"
    )
    change = LevelChange(
        time=now, previous_level=state.level, level=state.level + 1, accuracy=score.accuracy, reason=reason,
        eval_key=key, event_id=event_id, checkpoint_sha256=champion.checkpoint_sha256, run_id=champion.run_id,
        suite_version=champion.suite_version, score=score, announced=False,
    )
    new_state = msgspec.structs.replace(
        kept, level=state.level + 1, recent=[], changes=[*state.changes, change][-CHANGES_KEPT:],
    )
    return Progression(new_state, reason, change)
