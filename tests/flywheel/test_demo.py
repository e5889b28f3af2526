"""The demo's material: a sample of the training split, and questions from the held-out split."""

from __future__ import annotations

import json

from flywheel.demo import SAMPLE_DATASET, held_out_questions
from libs.common.skills import binary


def _sample() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_DATASET.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_sample_is_level_one_training_material_in_the_skills_own_notation():
    rows = _sample()
    # Every distinct problem of 20,000 the skill generates (seed 0), in order: the skill's own
    # answer format, and (nearly) all of level 1's 889 training problems, each once.
    distinct = {}
    for row in binary.generate(1, 20_000, seed=0):
        distinct.setdefault(row["messages"][0]["content"], {"messages": row["messages"]})
    assert rows == list(distinct.values()) and len(rows) > 850
    for row in rows:
        question, answer = (m["content"] for m in row["messages"])
        assert binary.split_of(question) == "train"
        assert binary.is_correct(binary.expected_from_answer(answer), answer)


def test_the_demo_asks_five_distinct_held_out_questions_that_no_sample_row_contains():
    questions = held_out_questions()
    prompts = {row["messages"][0]["content"] for row in questions}
    assert len(prompts) == 5 and all(binary.split_of(p) == "eval" for p in prompts)
    assert not prompts & {row["messages"][0]["content"] for row in _sample()}
    assert held_out_questions() == questions  # the same five every time
