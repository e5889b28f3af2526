"""Skills: problem generators and answer checkers that the curriculum and the evaluator share.

Every skill offers the same interface (`Skill`, skill.py): `name`, `max_level`,
`generate(level, n, seed, split="train"|"eval", exclude=keys)`, `problem_key(prompt)`,
`split_of(prompt)`, `extract_answer(text)`, `is_correct(expected, text)`. One rule
(skill.py: `split_from_facts`) decides every skill's split from the facts a problem involves. Scores are reported per level as
"<skill>/<level>".

    from libs.common.skills import get_skill
    skill = get_skill("syllo")
    rows = skill.generate(2, 20, seed=7, split="eval")
"""

from libs.common.skills import binary, syllo
from libs.common.skills.binary import BINARY
from libs.common.skills.skill import HOLD_OUT_BUCKETS, SPLITS, Expected, Facts, Skill, Split, held_out
from libs.common.skills.syllo import SYLLO

SKILLS: dict[str, Skill] = {skill.name: skill for skill in (BINARY, SYLLO)}


def get_skill(name: str) -> Skill:
    """The skill called `name`; ValueError naming the known skills when there is none."""
    try:
        return SKILLS[name]
    except KeyError:
        raise ValueError(f"unknown skill {name!r}: the skills are {', '.join(sorted(SKILLS))}") from None


__all__ = [
    "BINARY", "HOLD_OUT_BUCKETS", "SKILLS", "SPLITS", "SYLLO", "Expected", "Facts", "Skill", "Split",
    "binary", "get_skill", "held_out", "syllo",
]
