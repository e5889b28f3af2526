"""Skills: problem generators and answer checkers that the curriculum and the evaluator share.

A skill module offers `generate(level, n, seed, split=...)`, `extract_answer(text)`,
`is_correct(expected, text)` and `MAX_LEVEL`. Scores are reported per level as "<skill>/<level>".
"""

from libs.common.skills import binary

__all__ = ["binary"]
