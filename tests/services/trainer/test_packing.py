"""Packing: first-fit sequences, micro-batches under a token budget, and (slow, the tiny model)
that an example inside a packed batch is computed exactly as it is alone."""

from __future__ import annotations

import msgspec
import pytest

from libs.common.chat import IGNORE_INDEX, ChatRow, EncodedChat, collate, collate_packed, encode_chat
from services.trainer.packing import Batching, epoch_steps, fill_micro_batches, pack_first_fit
from tests.services.trainer.samples import chat_rows


def test_first_fit_puts_each_example_in_the_first_sequence_with_room():
    lengths = [60, 50, 30, 20, 10, 70]
    assert pack_first_fit(lengths, range(6), capacity=100) == [[0, 2, 4], [1, 3], [5]]


def test_an_example_longer_than_a_sequence_is_a_sequence_alone():
    assert pack_first_fit([300, 10, 10], [1, 0, 2], capacity=256) == [[1, 2], [0]]


def test_first_fit_looks_at_a_bounded_window_of_open_sequences():
    # Each 90 closes nothing; with a window of 2 the first sequence is closed before the 10 comes.
    lengths = [90, 90, 90, 10]
    assert pack_first_fit(lengths, range(4), capacity=100, open_limit=2) == [[0], [1, 3], [2]]
    assert pack_first_fit(lengths, range(4), capacity=100) == [[0, 3], [1], [2]]


def test_micro_batches_keep_count_times_longest_within_the_budget():
    groups = fill_micro_batches([256, 250, 240, 100, 512, 10], 768)
    assert groups == [[0, 1, 2], [3], [4], [5]]
    assert fill_micro_batches([1000], 768) == [[0]]  # never empty: an oversized sequence goes alone


def test_padded_batching_is_rows_in_order_and_accumulation_groups_micro_batches():
    batching = Batching("padded", batch_tokens=0, pack_length=0, batch_size=2, grad_accumulation=2)
    assert epoch_steps([5] * 5, [4, 3, 2, 1, 0], batching) == [[[[4], [3]], [[2], [1]]], [[[0]]]]


def test_collate_packed_restarts_positions_per_example_and_continues_them_over_padding():
    a = EncodedChat(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = EncodedChat(input_ids=[8, 9], labels=[IGNORE_INDEX, 9])
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], [IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]
    assert "attention_mask" not in batch  # a mask would turn off transformers' packed-sequence isolation


# ---------------------------------------------------------------------------- the model sees each example alone


@pytest.fixture
def model_and_examples(tiny_model_dir):
    import torch

    from libs.common.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, "cpu", for_training=True).eval()
    examples = [encode_chat(tokenizer, msgspec.convert(row, ChatRow).messages, 256) for row in chat_rows(7, seed=11)]
    return model, tokenizer, examples


@pytest.mark.slow
def test_an_examples_logits_inside_a_packed_batch_equal_its_logits_alone(model_and_examples):
    import torch

    model, tokenizer, examples = model_and_examples
    sequences = [examples[:4], examples[4:6], examples[6:]]  # three sequences of unequal length: padding too
    batch = collate_packed(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for row, sequence in enumerate(sequences):
            start = 0
            for example in sequence:
                n = len(example.input_ids)
                alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
                worst = max(worst, float((packed[row, start:start + n] - alone).abs().max()))
                start += n
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_a_packed_batchs_loss_is_the_token_mean_of_each_examples_loss_alone(model_and_examples):
    import torch

    model, tokenizer, examples = model_and_examples
    batch = collate_packed([examples[:4], examples[4:]], tokenizer.pad_token_id)
    with torch.no_grad():
        packed = float(model(**batch, use_cache=False).loss)
        total, tokens = 0.0, 0
        for example in examples:
            alone = collate([example], tokenizer.pad_token_id)
            count = int((alone["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**alone).loss) * count
            tokens += count
    assert packed == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.slow
def test_with_a_kv_cache_transformers_does_not_isolate_packed_examples(model_and_examples):
    """Why the recipe always passes use_cache=False: this pitfall, pinned so an upgrade that
    changes it is noticed (docs/experiments/packing-cpu.md)."""
    import torch

    model, tokenizer, examples = model_and_examples
    batch = collate_packed([examples[:2]], tokenizer.pad_token_id)
    second = slice(len(examples[0].input_ids), len(examples[0].input_ids) + len(examples[1].input_ids))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    assert float((isolated[second] - alone).abs().max()) < 1e-4
    assert float((cached[second] - alone).abs().max()) > 1e-3
