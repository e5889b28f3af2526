"""What a synthetic dataset is: practice rows of a skill at its current level, numbered and seeded.

Dataset number n (the skill's counter in KV) is generated with seed n, so its content is
reproducible and differs from every other dataset's; its event id is derived from (skill, n),
so a republished submission is dropped by JetStream's duplicate window.
"""

from __future__ import annotations

from libs.common.events import DatasetSubmitted, derived_id
from libs.common.skills import binary


def synthetic_dataset(skill: str, level: int, number: int, num_rows: int) -> DatasetSubmitted:
    if skill != binary.SKILL:
        raise ValueError(f"no generator for skill {skill!r}")
    rows = binary.generate(level, num_rows, seed=number)
    return DatasetSubmitted(
        id=derived_id("curriculum", "synthetic", skill, number),
        name=f"curriculum-{skill}-L{level}-{number}",
        priority="low",
        # chat_sft_v1 rows: only the conversation (the skill's bookkeeping fields would be dropped).
        rows=[{"messages": row["messages"]} for row in rows],
        submitted_by="curriculum",
        channel="curriculum",
    )
