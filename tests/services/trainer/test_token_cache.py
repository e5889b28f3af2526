"""The tokenization cache: built once per (dataset, schema, profile, max_length, tokenizer), then
memory-mapped; a different key tokenizes again; a crash mid-build leaves nothing that is read."""

from __future__ import annotations

from functools import partial

import pytest

from libs.common.models import load_tokenizer
from services.trainer import token_cache
from services.trainer.checkpoints import remove_staging
from services.trainer.data import encode_row, iter_rows
from tests.services.trainer.samples import chat_rows, write_dataset

pytestmark = pytest.mark.slow


def test_examples_are_tokenized_once_and_then_read_from_the_cache(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    event = write_dataset(tmp_path, chat_rows(5) + [no_answer])
    path = tmp_path / "artifacts" / "datasets" / f"{event.dataset_id}.jsonl"
    fingerprint = token_cache.tokenizer_fingerprint(tokenizer)
    key = token_cache.cache_key(event.dataset_id, "chat_sft_v1", "none", 128, fingerprint)
    encodes = []

    def encode(row):
        encodes.append(row)
        return encode_row(row, tokenizer, 128)

    first, built = token_cache.load_or_build(tmp_path / "cache", key, lambda: iter_rows(path), encode)
    assert built and len(first) == 5 and len(encodes) == 6
    assert first.meta.dropped == [(6, "no assistant turn: nothing to train on")]
    again, built = token_cache.load_or_build(tmp_path / "cache", key, lambda: iter_rows(path), encode)
    assert not built and len(encodes) == 6  # not tokenized again
    expected = [encode_row(row, tokenizer, 128) for row in iter_rows(path)][:5]
    assert again.examples([0, 1, 2, 3, 4]) == expected
    assert again.lengths().tolist() == [len(e.input_ids) for e in expected]


def test_the_key_changes_with_everything_that_changes_the_tokens(tiny_model_dir):
    fingerprint = token_cache.tokenizer_fingerprint(load_tokenizer(tiny_model_dir))
    base = token_cache.cache_key("d", "chat_sft_v1", "none", 512, fingerprint)
    assert base == token_cache.cache_key("d", "chat_sft_v1", "none", 512, fingerprint)
    assert len({base, token_cache.cache_key("e", "chat_sft_v1", "none", 512, fingerprint),
                token_cache.cache_key("d", "syllo_v1", "none", 512, fingerprint),
                token_cache.cache_key("d", "chat_sft_v1", "emoji_think", 512, fingerprint),
                token_cache.cache_key("d", "chat_sft_v1", "none", 256, fingerprint),
                token_cache.cache_key("d", "chat_sft_v1", "none", 512, "other-tokenizer")}) == 6


def test_a_build_that_crashes_leaves_no_cache_and_its_staging_is_removed(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)

    def rows():
        yield from iter_rows_of(chat_rows(3))
        raise RuntimeError("killed mid-build")

    def iter_rows_of(raw):
        import msgspec

        from libs.common.chat import ChatRow
        return (msgspec.convert(row, ChatRow) for row in raw)

    with pytest.raises(RuntimeError):
        token_cache.load_or_build(tmp_path / "cache", "k", rows, partial(encode_row, tokenizer=tokenizer, max_length=64))
    assert not (tmp_path / "cache" / "k").exists()
    remove_staging(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    cached, built = token_cache.load_or_build(tmp_path / "cache", "k", lambda: iter_rows_of(chat_rows(3)),
                                              partial(encode_row, tokenizer=tokenizer, max_length=64))
    assert built and len(cached) == 3
