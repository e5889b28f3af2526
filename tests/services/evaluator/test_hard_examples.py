"""Hard examples on plain values: fresh training-split probes, never a suite item; only the failed
ones become rows (with the gold answer); the submission is low priority with a derived id."""

from __future__ import annotations

import dataclasses

import pytest

from libs.common.artifacts import Artifact
from libs.common.skills import SKILLS, binary
from services.evaluator import hard_examples
from services.evaluator.hard_examples import (
    CHANNEL,
    failed_rows,
    learned_levels,
    hard_examples_submission,
    probe_items,
    submission_id,
)
from services.evaluator.scoring import judge
from services.evaluator.suite import build_suite

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture(scope="module")
def suite():
    return build_suite({"binary": 3, "syllo": 1}, 8, seed=7)


def test_probes_are_fresh_training_problems_at_every_level_the_suite_covers(suite):
    probes = probe_items(suite, 4, SHA_A)
    assert [p.level_key for p in probes] == ["binary/1"] * 4 + ["binary/2"] * 4 + ["binary/3"] * 4 + ["syllo/1"] * 4
    assert all(SKILLS[p.skill].split_of(p.messages[0].content) == "train" for p in probes)
    assert not {p.messages[0].content for p in probes} & {i.messages[0].content for i in suite.items}
    # Deterministic for one checkpoint, new for another; none at all when switched off.
    assert probe_items(suite, 4, SHA_A) == probes
    assert probe_items(suite, 4, SHA_B) != probes
    assert probe_items(suite, 0, SHA_A) == []


def test_a_probe_from_the_eval_split_is_refused(suite, monkeypatch: pytest.MonkeyPatch):
    # A broken generator that hands out eval problems as training ones.
    leaky = dataclasses.replace(binary.BINARY, generate=lambda level, n, seed, split="train":
                                binary.generate(level, n, seed, split="eval"))
    monkeypatch.setitem(hard_examples.SKILLS, "binary", leaky)
    with pytest.raises(ValueError, match="eval problem"):
        probe_items(suite, 4, SHA_A)


def test_only_answered_wrong_probes_become_rows_with_the_gold_answer(suite):
    probes = probe_items(suite, 2, SHA_A)[:4]
    gold = [p.messages[-1].content for p in probes]
    # Right, wrong, wrong but never answered (the prompt filled max_length), wrong.
    results = judge(probes, [gold[0], "nonsense", "", "add ⓪ ⓪ = ①"], [0.5, 0.5, None, 0.5],
                    [True, True, False, True])
    rows = failed_rows(probes, results, {p.level_key for p in probes})
    assert [r["messages"][0]["content"] for r in rows] == [probes[1].messages[0].content, probes[3].messages[0].content]
    assert [r["messages"][1] for r in rows] == [{"role": "assistant", "content": gold[1]},
                                                {"role": "assistant", "content": gold[3]}]
    assert set(rows[0]) == {"messages"}  # the curriculum's chat_sft_v1 rows
    with pytest.raises(ValueError):
        failed_rows(probes, results[:3], {p.level_key for p in probes})


def test_only_the_failures_at_levels_the_checkpoint_has_learned_are_hard_examples(suite):
    probes = [p for p in probe_items(suite, 2, SHA_A) if p.skill == "binary" and p.level in (1, 2)]
    results = judge(probes, ["nonsense"] * len(probes), [0.5] * len(probes), [True] * len(probes))
    learned = learned_levels({"binary/1": 0.9, "binary/2": 0.2, "syllo/1": 0.5}, 0.5)
    assert learned == {"binary/1", "syllo/1"}
    rows = failed_rows(probes, results, learned)
    assert [r["messages"][0]["content"] for r in rows] == [p.messages[0].content for p in probes if p.level == 1]
    assert rows and failed_rows(probes, results, set()) == []


def test_the_submission_is_low_priority_with_an_id_derived_from_what_was_probed(suite):
    levels = suite.levels()
    event_id = submission_id(SHA_A, levels, 16)
    assert event_id == submission_id(SHA_A, levels, 16)
    assert len({event_id, submission_id(SHA_B, levels, 16), submission_id(SHA_A, levels, 8),
                submission_id(SHA_A, {"binary": [1]}, 16)}) == 4
    artifact = Artifact(uri="file:///data/artifacts/hard-examples/x.jsonl", sha256="c" * 64, size=10)
    event = hard_examples_submission(event_id, SHA_A, 9, artifact)
    assert (event.id, event.priority, event.channel, event.submitted_by) == (event_id, "low", CHANNEL, "evaluator")
    assert (event.uri, event.sha256, event.rows, event.schema) == (artifact.uri, artifact.sha256, None, "chat_sft_v1")
