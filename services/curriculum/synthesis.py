"""What a synthetic dataset is: practice rows of a skill at its current level, with review.

Dataset number n of a skill (its counter in KV) is generated with seed n, so its content is
reproducible and differs from every other dataset's; its event id is derived from (skill, n),
so a republished submission is dropped by JetStream's duplicate window. A share of the rows
(`review_fraction`) reviews the earlier levels, spread evenly over them, so mastering a level
never means forgetting the ones below; level 1 has nothing to review.
"""

from __future__ import annotations

from libs.common.events import DatasetSubmitted, derived_id
from libs.common.skills import get_skill


def level_mix(level: int, rows: int, review_fraction: float) -> dict[int, int]:
    """Rows per level: the current level gets the rest after the review share."""
    earlier = list(range(1, level))
    review = round(rows * review_fraction) if earlier else 0
    mix = {lvl: review // len(earlier) + (1 if i < review % len(earlier) else 0) for i, lvl in enumerate(earlier)}
    mix[level] = rows - review
    return {lvl: n for lvl, n in mix.items() if n}


def synthetic_dataset(skill: str, level: int, number: int, rows: int, review_fraction: float = 0.0) -> DatasetSubmitted:
    practice = get_skill(skill)
    generated: list[dict] = []
    for lvl, n in level_mix(level, rows, review_fraction).items():
        generated.extend(practice.generate(lvl, n, seed=number))
    return DatasetSubmitted(
        id=derived_id("curriculum", "synthetic", skill, number),
        name=f"curriculum-{skill}-L{level}-{number}",
        priority="low",
        # chat_sft_v1 rows: only the conversation (the skill's bookkeeping fields would be dropped).
        rows=[{"messages": row["messages"]} for row in generated],
        submitted_by="curriculum",
        channel="curriculum",
    )
