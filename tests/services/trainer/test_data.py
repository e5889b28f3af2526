"""Unit: reading rows, collation and masking, shuffle determinism, the step plan, the LR schedule."""

from __future__ import annotations

import msgspec
import pytest

from libs.common.chat import IGNORE_INDEX, SCHEMA_KINDS, ChatMessage, ChatRow, EncodedChat, TextRow, collate
from services.gatekeeper.schemas import SCHEMAS
from services.trainer.data import (
    DatasetError,
    Dropped,
    Encoded,
    TrainingPlan,
    encode_row,
    encode_rows,
    epoch_order,
    read_rows,
    replay_count,
    replay_picks,
    schema_kind,
    validation_split,
)
from services.trainer.packing import Batching
from services.trainer.recipe import NoTrainedTokens, trained_tokens
from services.trainer.schedule import MIN_LR_RATIO, continual_multiplier, lr_multiplier


def test_read_rows_ignores_extra_fields_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "extra": 1}
    path.write_bytes(msgspec.json.encode(row) + b"\n\n" + msgspec.json.encode(row) + b"\n")
    rows = read_rows(path)
    assert len(rows) == 2 and rows[0].messages[1].content == "yo"


def test_read_rows_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": []}\n{"nope": 1}\n')
    with pytest.raises(DatasetError, match="line 2: not a chat_sft_v1 row"):
        read_rows(path)


def test_every_schema_the_gatekeeper_accepts_is_one_the_trainer_trains_the_same_way():
    assert SCHEMA_KINDS == {name: schema.kind for name, schema in SCHEMAS.items()}


def test_read_rows_reads_the_named_schema(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "once upon a time"}\n{"text": "the end"}\n')
    assert read_rows(path, "completion_v1") == [TextRow("once upon a time"), TextRow("the end")]
    with pytest.raises(DatasetError, match="line 1: not a chat_sft_v1 row"):
        read_rows(path, "chat_sft_v1")  # the schema decides, the rows are not sniffed
    syllo = tmp_path / "s.jsonl"
    syllo.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                     '"puzzle": {"syllables": ["a"], "answers": ["a"]}}\n')
    assert read_rows(syllo, "syllo_v1")[0].messages[1].content == "a"
    assert schema_kind("syllo_v1") == "chat" and schema_kind("completion_v1") == "text"
    with pytest.raises(DatasetError, match="cannot train schema 'preference_v9'"):
        read_rows(path, "preference_v9")


def test_rows_with_nothing_to_train_are_dropped_with_a_reason_before_tokenizing():
    no_assistant = ChatRow([ChatMessage("user", "hi")])
    empty_answer = ChatRow([ChatMessage("user", "hi"), ChatMessage("assistant", " ")])
    # No tokenizer needed: these never reach the template.
    assert encode_row(no_assistant, None, 64) == "no assistant turn: nothing to train on"
    assert encode_row(empty_answer, None, 64) == "no assistant content: every assistant turn is empty"
    with pytest.raises(DatasetError, match="none of 2 rows can be trained on: 1 row .1.: no assistant turn"):
        encode_rows([no_assistant, empty_answer], None, 64)


def test_drop_summary_groups_reasons_most_common_first():
    encoded = Encoded([], [Dropped(2, "b"), Dropped(3, "a"), Dropped(5, "b"), *(Dropped(n, "c") for n in range(6, 13))])
    assert encoded.summary() == ["7 rows (6, 7, 8, 9, 10, ...): c", "2 rows (2, 5): b", "1 row (3): a"]
    assert encoded.summary(limit=1)[-1] == "3 more rows for 2 other reasons"
    assert encoded.counts() == {"c": 7, "b": 2, "a": 1}


def test_a_batch_with_an_example_without_trained_tokens_is_refused():
    batch = collate([EncodedChat([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedChat([8, 9], [IGNORE_INDEX, 9])], pad_id=0)
    assert trained_tokens(batch["labels"]) == 3
    # A label on the first token only: the shifted loss never sees it.
    batch = collate([EncodedChat([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedChat([8, 9], [8, IGNORE_INDEX])], pad_id=0)
    with pytest.raises(NoTrainedTokens, match=r"examples \[1\] have no trained token"):
        trained_tokens(batch["labels"])
    assert issubclass(NoTrainedTokens, DatasetError)  # dead-lettered, never retried


def test_collate_pads_right_and_masks_padding():
    examples = [
        EncodedChat(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7]),
        EncodedChat(input_ids=[8], labels=[8]),
    ]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_pads_to_the_longest_row_of_this_batch_only():
    short = collate([EncodedChat(input_ids=[1, 2], labels=[1, 2])] * 3, pad_id=0)
    assert short["input_ids"].shape == (3, 2)


def test_epoch_order_depends_only_on_seed_dataset_and_epoch():
    first = epoch_order(50, seed=0, dataset_id="abc", epoch=0)
    assert first == epoch_order(50, seed=0, dataset_id="abc", epoch=0)
    assert sorted(first) == list(range(50))
    assert first != list(range(50))
    assert first != epoch_order(50, seed=1, dataset_id="abc", epoch=0)
    assert first != epoch_order(50, seed=0, dataset_id="abd", epoch=0)
    assert first != epoch_order(50, seed=0, dataset_id="abc", epoch=1)


def padded(batch_size: int, accumulate: int = 1) -> Batching:
    return Batching("padded", batch_tokens=1024, pack_length=256, batch_size=batch_size, grad_accumulation=accumulate)


def test_plan_counts_partial_batches_and_caps_steps():
    plan = TrainingPlan([5] * 10, padded(4), epochs=2, max_steps=0, seed=0, dataset_id="d")
    assert plan.total_steps == 6 and plan.num_examples == 10
    assert TrainingPlan([5] * 10, padded(4), 2, max_steps=4, seed=0, dataset_id="d").total_steps == 4
    assert TrainingPlan([5] * 10, padded(4), 2, max_steps=100, seed=0, dataset_id="d").total_steps == 6
    # Gradient accumulation: 3 micro-batches an epoch, 2 a step; an epoch's last step is not
    # filled from the next epoch.
    assert TrainingPlan([5] * 10, padded(4, accumulate=2), 2, 0, 0, "d").total_steps == 4


def test_a_token_budget_ends_the_plan_at_the_step_that_reaches_it():
    lengths = [5] * 10  # padded batches of 4 rows: steps of 20, 20 and 10 real tokens an epoch
    plan = TrainingPlan(lengths, padded(4), epochs=9, max_steps=0, seed=0, dataset_id="d", max_tokens=100)
    # 20 + 20 + 10 + 20 + 20 = 90 < 100: the sixth step (10 tokens) reaches it exactly.
    assert (plan.total_steps, plan.total_tokens) == (6, 100)
    # A budget between step boundaries ends at the step that crosses it, never before it.
    assert (TrainingPlan(lengths, padded(4), 9, 0, 0, "d", max_tokens=91).total_steps,
            TrainingPlan(lengths, padded(4), 9, 0, 0, "d", max_tokens=91).total_tokens) == (6, 100)
    assert TrainingPlan(lengths, padded(4), 9, 0, 0, "d", max_tokens=1).total_steps == 1
    # Whichever comes first: epochs, max_steps, max_tokens.
    assert TrainingPlan(lengths, padded(4), 1, 0, 0, "d", max_tokens=1000).total_steps == 3
    assert TrainingPlan(lengths, padded(4), 9, max_steps=4, seed=0, dataset_id="d", max_tokens=1000).total_steps == 4
    assert TrainingPlan(lengths, padded(4), 9, max_steps=4, seed=0, dataset_id="d", max_tokens=30).total_steps == 2
    # No cap: every epoch, and the plan still says how many tokens that is.
    assert (TrainingPlan(lengths, padded(4), 2, 0, 0, "d").total_tokens) == 100
    # The steps are the uncapped plan's, cut: the budget changes where the run ends, not its batches.
    uncapped = TrainingPlan(lengths, padded(4), 9, 0, 0, "d")
    assert [plan.step(s) for s in range(6)] == [uncapped.step(s) for s in range(6)]


def test_a_packed_plans_token_budget_counts_the_real_tokens_of_its_steps():
    lengths = [10 + (7 * i) % 50 for i in range(40)]
    batching = Batching("packed", batch_tokens=192, pack_length=64, batch_size=1, grad_accumulation=1)
    plan = TrainingPlan(lengths, batching, epochs=50, max_steps=0, seed=0, dataset_id="d", max_tokens=5000)
    per_step = [sum(lengths[i] for micro in plan.step(s) for seq in micro for i in seq)
                for s in range(plan.total_steps)]
    assert plan.total_tokens == sum(per_step) >= 5000 > sum(per_step[:-1])
    assert plan.epoch_progress(plan.total_steps) == pytest.approx(5000 / sum(lengths), abs=0.2)


def test_plan_positions_cover_every_example_once_per_epoch():
    plan = TrainingPlan([5] * 10, padded(4), epochs=2, max_steps=0, seed=0, dataset_id="d")
    assert [plan.position(step) for step in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    order = epoch_order(10, 0, "d", 0)
    seen = [i for step in range(3) for micro in plan.step(step) for sequence in micro for i in sequence]
    assert seen == order and len(plan.step(2)[0]) == 2
    assert [plan.epoch_progress(step) for step in (0, 3, 4, 6)] == pytest.approx([0.0, 1.0, 1 + 1 / 3, 2.0])


def test_a_packed_plan_visits_every_example_once_per_epoch_in_sequences_within_the_length():
    lengths = [10 + (7 * i) % 50 for i in range(40)]
    batching = Batching("packed", batch_tokens=192, pack_length=64, batch_size=1, grad_accumulation=1)
    plan = TrainingPlan(lengths, batching, epochs=2, max_steps=0, seed=0, dataset_id="d")
    for epoch in range(2):
        steps = [plan.step(s) for s in range(plan.total_steps) if plan.position(s)[0] == epoch]
        sequences = [seq for step in steps for micro in step for seq in micro]
        assert sorted(i for seq in sequences for i in seq) == list(range(40))
        assert all(sum(lengths[i] for i in seq) <= 64 for seq in sequences)
        for step in steps:  # a micro-batch, padded to its longest sequence, stays within the budget
            assert len(step[0]) * max(sum(lengths[i] for i in seq) for seq in step[0]) <= 192


def test_replay_picks_are_uniform_over_every_earlier_example_and_deterministic():
    picks = replay_picks([10, 30], 400, seed=0, dataset_id="d")
    assert picks == replay_picks([10, 30], 400, seed=0, dataset_id="d")
    assert picks != replay_picks([10, 30], 400, seed=0, dataset_id="other")
    assert all(0 <= index < (10, 30)[pool] for pool, index in picks)
    share = sum(1 for pool, _ in picks if pool == 0) / len(picks)
    assert 0.15 < share < 0.35  # 10 of 40 examples: a quarter
    assert replay_picks([], 5, 0, "d") == [] and replay_picks([10], 0, 0, "d") == []


def test_validation_split_holds_out_a_fixed_slice_and_none_of_a_small_dataset():
    train, held = validation_split(1000, 0.05, 64, 40, seed=0, dataset_id="d")
    assert len(held) == 50 and sorted(train + held) == list(range(1000)) and not set(train) & set(held)
    assert (train, held) == validation_split(1000, 0.05, 64, 40, seed=0, dataset_id="d")
    assert len(validation_split(10_000, 0.05, 64, 40, 0, "d")[1]) == 64
    assert validation_split(39, 0.5, 64, 40, 0, "d") == (list(range(39)), [])


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    warmup, total = 4, 20
    multipliers = [lr_multiplier(step, warmup, total) for step in range(total + 1)]
    assert multipliers[:warmup] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert multipliers[warmup] == pytest.approx(1.0)
    decay = multipliers[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert multipliers[-1] == pytest.approx(MIN_LR_RATIO)


def test_schedule_without_warmup_starts_at_peak():
    assert lr_multiplier(0, 0, 10) == pytest.approx(1.0)
    assert lr_multiplier(0, 0, 1) == pytest.approx(1.0)


def test_continual_schedule_warms_up_once_over_global_steps_and_decays_within_every_run():
    # The first run: warmup over the trainer's first global steps, under the run's own decay.
    first = [continual_multiplier(step, 4, step, 100) for step in range(6)]
    assert first == pytest.approx([m * lr_multiplier(s, 0, 100) for s, m in enumerate([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])])
    # A later run never re-warms: it starts at the peak and decays to the floor by its end.
    later = [continual_multiplier(10_000 + step, 4, step, 50) for step in range(51)]
    assert later[0] == 1.0 and later[-1] == pytest.approx(MIN_LR_RATIO)
    assert all(a >= b for a, b in zip(later, later[1:], strict=False))
    assert continual_multiplier(0, 0) == 1.0


def test_replay_count_makes_the_replayed_rows_that_share_of_the_run():
    assert replay_count(200, 0.0) == 0
    assert replay_count(200, 0.3) == 86  # 86 / 286 = 30 %
    assert replay_count(200, 0.5) == 200
