"""The evaluator's generation budget holds every gold Binary answer of the suite's levels."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.models import load_tokenizer
from libs.common.skills import binary
from services.evaluator.settings import EvaluatorSettings


@pytest.mark.slow
def test_every_gold_answer_up_to_the_suites_top_level_fits_max_new_tokens(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    settings = EvaluatorSettings()
    longest = max(
        len(tokenizer(row["messages"][1]["content"], add_special_tokens=False)["input_ids"])
        for level in range(1, settings.suite_max_level + 1) for row in binary.generate(level, 300, seed=1)
    )
    assert longest + 1 <= settings.max_new_tokens  # and the end-of-turn token
