"""Scoring: the statistics (Wilson interval, calibration, per-level scores, per-item outcomes,
regression flags) on plain values, then a real (tiny) checkpoint end to end."""

from __future__ import annotations

import math

import msgspec
import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.chat import ChatMessage, prompt_messages
from libs.common.events import (
    CheckpointSaved,
    EvalScored,
    LevelScore,
    decode_outcomes,
    encode_outcomes,
    score_regressions,
)
from libs.common.models import load_model, load_tokenizer
from libs.common.skills import syllo
from services.evaluator.scoring import (
    expected_calibration_error,
    generation_prompts,
    judge,
    level_scores,
    score_checkpoint,
    summarise,
    wilson_interval,
)
from services.evaluator.suite import SuiteItem, build_suite

# ---------------------------------------------------------------------------- Wilson interval


@pytest.mark.parametrize(("correct", "total", "low", "high"), [
    (5, 10, 0.236593, 0.763407),
    (0, 10, 0.0, 0.277533),
    (10, 10, 0.722467, 1.0),
    (16, 16, 0.806392, 1.0),
    (81, 100, 0.722212, 0.874852),
])
def test_wilson_interval_matches_known_values(correct, total, low, high):
    got = wilson_interval(correct, total)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_is_inside_0_1_and_narrows_with_more_items():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    small, large = wilson_interval(8, 16), wilson_interval(500, 1000)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    for correct in range(17):
        low, high = wilson_interval(correct, 16)
        assert 0.0 <= low <= correct / 16 <= high <= 1.0


# ---------------------------------------------------------------------------- calibration


def test_ece_bins_six_equal_widths():
    # 0.9 -> bin 5, 0.1 -> bin 0, 0.5 -> bin 3.
    # bin 5: accuracy 0.5, confidence 0.9 (2 items); bin 0: 0 vs 0.1; bin 3: 1 vs 0.5.
    ece = expected_calibration_error([0.9, 0.9, 0.1, 0.5], [True, False, False, True])
    assert ece == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.1 + 1 / 4 * 0.5)


def test_ece_is_zero_when_confidence_matches_accuracy_per_bin():
    # Bin 4 ([2/3, 5/6)): confidence 0.75, three of four right.
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    # The same items with 0.95 confidence (bin 5): overconfident by 0.2.
    assert expected_calibration_error([0.95] * 4, [True, True, True, False]) == pytest.approx(0.2)


def test_ece_puts_a_certain_answer_in_the_last_bin_and_is_none_without_confidences():
    assert expected_calibration_error([1.0, 0.0], [True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([], []) is None
    assert expected_calibration_error([0.5, None], [True, False]) is None
    assert expected_calibration_error([0.5, math.nan], [True, False]) is None


# ---------------------------------------------------------------------------- per level, per item


def item(level: int, expected: str) -> SuiteItem:
    return SuiteItem(messages=[ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content=expected)],
                     skill="binary", level=level, scenario="todecimal", expected=expected)


def test_level_scores_count_items_and_weigh_loss_by_tokens():
    levels = level_scores(["binary/1", "binary/1", "binary/2"], [True, False, True], [2.0, 6.0, 9.0], [1, 3, 0])
    assert levels["binary/1"] == LevelScore(correct=1, total=2, accuracy=0.5, low=pytest.approx(0.0945, abs=1e-4),
                                            high=pytest.approx(0.9055, abs=1e-4), val_loss=2.0)
    assert levels["binary/2"].val_loss is None  # no answer tokens survived max_length


def test_summarise_reports_every_statistic_and_hides_no_nan():
    items = [item(1, "①"), item(1, "⓪"), item(2, "①①")]
    outputs = ["add ⓪ ① = ①", "add ⓪ ① = ①", "add ①⓪ ① = ①① ✓"]
    scores = summarise(items, outputs, [0.9, 0.8, None], [1.0, 1.0, math.nan], [1, 1, 2])
    assert [r.correct for r in scores.items] == [True, False, True]
    assert scores.exact_match == pytest.approx(2 / 3) and scores.by_level == {"binary/1": 0.5, "binary/2": 1.0}
    assert scores.levels["binary/1"].val_loss == 1.0 and scores.levels["binary/2"].val_loss is None
    assert scores.val_loss is None  # NaN is not a number JSON can carry
    assert scores.ece is None  # one confidence is missing
    assert decode_outcomes(scores.outcomes, 3) == [True, False, True]
    assert scores.exact_match_low < scores.exact_match < scores.exact_match_high


def syllo_item(seed: int = 3) -> SuiteItem:
    [row] = syllo.generate(1, 1, seed, split="eval")
    return msgspec.convert(row, SuiteItem)


def test_each_item_is_judged_by_its_own_skill():
    puzzle = syllo_item()
    assert isinstance(puzzle.expected, list)
    gold = puzzle.messages[-1].content
    # The same words in another layout (plain text, tiles named) are right; one word changed is wrong.
    plain = "\n".join(f"{i}. {w.replace('·', '')} ({' + '.join(w.split('·')).lower()})"
                      for i, w in enumerate(puzzle.expected, 1))
    wrong = gold.replace(puzzle.expected[0].replace("·", ""), "XYZZY")
    items = [puzzle, puzzle, puzzle, item(1, "①")]
    scores = summarise(items, [gold, plain, wrong, "add ⓪ ① = ①"], [0.5] * 4, [1.0] * 4, [1] * 4)
    assert [r.correct for r in scores.items] == [True, True, False, True]
    assert scores.by_level == {"binary/1": 1.0, "syllo/1": pytest.approx(2 / 3)}
    assert scores.items[0].expected == puzzle.expected  # a list, as the skill states it


def test_under_a_profile_the_skill_judges_the_answer_without_the_profiles_wrapping():
    items = [item(1, "①"), item(1, "①")]
    outputs = ["<<ANS_START>> add ⓪ ① = ① <<ANS_END>>", "<<ANS_START>> add ⓪ ① = ①⓪ <<ANS_END>>"]
    wrapped = summarise(items, outputs, [0.5, 0.5], [1.0, 1.0], [1, 1], profile="regime3")
    assert [r.correct for r in wrapped.items] == [True, False]
    assert [r.output for r in wrapped.items] == outputs  # kept as generated
    # Without the profile the markers are read as part of the answer.
    assert [r.correct for r in summarise(items, outputs, [0.5, 0.5], [1.0, 1.0], [1, 1]).items] == [False, False]
    thought = judge(items[:1], ["🤔🤔🤔\nadd ⓪ ① = ①\n🛑🛑"], [0.5], profile="emoji_think")
    assert thought[0].correct


def test_an_unanswered_item_counts_wrong_and_stays_out_of_calibration():
    items = [item(1, "①"), item(1, "①")]
    # The second prompt filled max_length: nothing generated, no confidence.
    scores = summarise(items, ["add ⓪ ① = ①", ""], [0.75, None], [1.0, 1.0], [1, 1], answered=[True, False])
    assert [(r.correct, r.answered) for r in scores.items] == [(True, True), (False, False)]
    assert scores.exact_match == 0.5
    assert scores.ece == pytest.approx(0.25)  # the answered item alone: right at confidence 0.75
    # Every item answered: a missing confidence still makes calibration undefined.
    assert summarise(items, ["add ⓪ ① = ①", ""], [0.75, None], [1.0, 1.0], [1, 1]).ece is None


def test_outcomes_encode_in_suite_order_compactly():
    correct = [True, False, False, True, True, True, True, True, False, True]
    text = encode_outcomes(correct)
    assert text == "9f40"  # 1001 1111, 01(000000)
    assert decode_outcomes(text, 10) == correct
    assert len(encode_outcomes([True] * 1000)) == 250
    for bad, count in (("9f40", 9), ("9f", 10), ("9f41", 10), ("xyz", 10)):
        with pytest.raises(ValueError):
            decode_outcomes(bad, count)


# ---------------------------------------------------------------------------- regression flags


def level(accuracy: float, total: int = 20) -> LevelScore:
    return LevelScore(correct=round(accuracy * total), total=total, accuracy=accuracy, low=0.0, high=1.0)


@pytest.mark.parametrize(("new", "flags"), [
    (0.75, ["binary/1 accuracy 0.750 vs 0.800: down 5.0 points"]),  # a whisker above 5 points in floats: a tie
    (0.70, ["binary/1 accuracy 0.700 vs 0.800: down 10.0 points (more than 5)"]),
    (0.80, []),
    (0.95, []),
])
def test_a_level_down_more_than_5_points_is_flagged(new, flags):
    found = score_regressions({"binary/1": level(new)}, 1.0, {"binary/1": level(0.8)}, 1.0)
    assert found == [f for f in flags if "more than" in f]


@pytest.mark.parametrize(("val_loss", "flagged"), [(1.16, True), (1.15, False), (0.5, False), (None, True)])
def test_val_loss_up_more_than_15_percent_or_not_finite_is_flagged(val_loss, flagged):
    found = score_regressions({}, val_loss, {}, 1.0)
    assert bool(found) is flagged
    if flagged:
        assert found[0] in ("val loss is not finite", "val loss 1.1600 vs 1.0000: up 16.0% (more than 15%)")


def test_levels_only_one_side_has_are_not_compared_and_no_baseline_loss_is_no_flag():
    assert score_regressions({"binary/3": level(0.0)}, 9.0, {"binary/1": level(1.0)}, None) == []


def test_eval_scored_with_non_finite_values_round_trips_as_null():
    event = EvalScored(run_id="r", step=1, checkpoint_uri="file:///c", checkpoint_sha256="c" * 64, suite="binary",
                       suite_version="v", exact_match=0.5, val_loss=math.nan, num_examples=2, ece=math.inf,
                       levels={"binary/1": LevelScore(correct=1, total=2, accuracy=0.5, low=0.1, high=0.9,
                                                      val_loss=-math.inf)},
                       outcomes=encode_outcomes([True, False]))
    data = msgspec.json.encode(event)
    assert b"NaN" not in data and b"Infinity" not in data
    decoded = msgspec.json.decode(data, type=EvalScored)
    assert decoded.val_loss is None and decoded.ece is None and decoded.levels["binary/1"].val_loss is None
    assert decoded.item_outcomes() == [True, False]


# ---------------------------------------------------------------------------- a real checkpoint


@pytest.mark.slow
def test_scores_a_tiny_checkpoint(checkpoint: CheckpointSaved, tmp_path):
    path = ArtifactStore(tmp_path / "data" / "artifacts").verify(checkpoint.uri, checkpoint.sha256)
    suite = build_suite({"binary": 2, "syllo": 1}, 4, seed=11)
    probes = build_suite({"binary": 1, "syllo": 0}, 3, seed=12).items
    batched = score_checkpoint(path, suite.items, device="cpu", batch_size=8, max_new_tokens=12, max_length=256,
                               probes=probes)
    single = score_checkpoint(path, suite.items, device="cpu", batch_size=1, max_new_tokens=12, max_length=256)
    assert math.isfinite(batched.val_loss) and batched.val_loss > 0
    assert 0.0 <= batched.exact_match <= 1.0
    assert set(batched.by_level) == set(batched.levels) == {"binary/1", "binary/2", "syllo/1"}
    assert batched.num_examples == len(batched.items) == 12
    assert sum(s.total for s in batched.levels.values()) == 12
    binary_items = [i for i in batched.items if i.level.startswith("binary/")]
    assert all(batched.levels[f"binary/{n}"].val_loss > 0 for n in (1, 2))
    # An item is generated exactly when its prompt leaves room within max_length (every Binary one).
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.apply_chat_template(prompt_messages(i.messages), tokenize=False, add_generation_prompt=True)
               for i in suite.items]
    fits = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) < 256 for p in prompts]
    assert [i.answered for i in batched.items] == fits and all(fits[:8])
    assert all(i.output == "" and not i.correct for i in batched.items if not i.answered)
    assert decode_outcomes(batched.outcomes, 12) == [i.correct for i in batched.items]
    assert all(0.0 < i.confidence <= 1.0 for i in batched.items if i.answered)
    assert 0.0 <= batched.ece <= 1.0
    # Probes are answered by the same model and enter no statistic.
    assert len(batched.probes) == 3 and all(p.answered and p.level == "binary/1" for p in batched.probes)
    assert single.probes == [] and single.exact_match == batched.exact_match
    # Left padding and per-token loss: the batch size must not change any result.
    assert [i.output for i in batched.items] == [i.output for i in single.items]
    assert batched.val_loss == pytest.approx(single.val_loss, rel=1e-4)
    assert [i.confidence for i in binary_items] == pytest.approx([i.confidence for i in single.items[:8]], rel=1e-3)


@pytest.mark.slow
def test_a_checkpoint_trained_on_a_profile_is_asked_with_its_prompt_and_generated_under_its_rules(
    checkpoint: CheckpointSaved, tmp_path, monkeypatch,
):
    import libs.common.profile_logits as profile_logits
    from libs.common.profiles import PROFILES, GenerationRules, Profile, get_profile

    path = ArtifactStore(tmp_path / "data" / "artifacts").verify(checkpoint.uri, checkpoint.sha256)
    items = build_suite({"binary": 1, "syllo": 0}, 3, seed=11).items
    tokenizer = load_tokenizer(path)
    emoji = get_profile("emoji_think")
    [prompt] = generation_prompts(tokenizer, items[:1], emoji)
    assert prompt.startswith(f"<|im_start|>system\n{emoji.system_prompt}<|im_end|>") and "For this task" not in prompt

    built = []
    real = profile_logits.profile_logits

    def spy(rules, tok, prompt_length):
        built.append((rules, prompt_length))
        return real(rules, tok, prompt_length)

    monkeypatch.setattr(profile_logits, "profile_logits", spy)
    plain = score_checkpoint(path, items, device="cpu", batch_size=8, max_new_tokens=6, max_length=256)
    asked = score_checkpoint(path, items, device="cpu", batch_size=8, max_new_tokens=6, max_length=256,
                             profile="emoji_think")
    assert [rules for rules, _ in built] == [get_profile("none").rules, emoji.rules]
    widths = [len(tokenizer(p, add_special_tokens=False)["input_ids"])
              for p in generation_prompts(tokenizer, items, emoji)]
    assert built[1][1] == max(widths)  # the left-padded batch's prompt width
    assert asked.val_loss != plain.val_loss  # the system prompt is part of what the loss sees

    # The rules reach generation: a profile that bans the token the model says first changes the answer.
    model = load_model(path, "cpu")
    [first_prompt] = generation_prompts(tokenizer, items[:1], get_profile("none"))
    enc = tokenizer([first_prompt], return_tensors="pt", add_special_tokens=False)
    first = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, -1].item()
    said = tokenizer.decode([first])
    assert tokenizer.encode(said, add_special_tokens=False) == [first]  # one token: banned at every step
    banned = type("Banned", (Profile,), {"name": "banned", "rules": GenerationRules(think_tags=(said,), think_penalty=1e4)})()
    monkeypatch.setitem(PROFILES, "banned", banned)
    kwargs = {"device": "cpu", "batch_size": 1, "max_new_tokens": 6, "max_length": 256}
    steered = score_checkpoint(path, items[:1], profile="banned", **kwargs)
    unsteered = score_checkpoint(path, items[:1], **kwargs)
    assert unsteered.items[0].output.startswith(said) and not steered.items[0].output.startswith(said)
    assert steered.val_loss == pytest.approx(unsteered.val_loss)  # no system prompt: the same loss
