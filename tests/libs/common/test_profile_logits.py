"""A profile's generation rules as a LogitsProcessor: think-tag penalties, escalation after the stop, EOS reward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from libs.common.profile_logits import MAX_PENALTY, ProfileLogits, profile_logits
from libs.common.profiles import GenerationRules, get_profile


class ToyTokenizer:
    """Whole-word tokens and a few pieces: enough to spell tags and stops as one or several tokens."""

    vocab = ["<|im_end|>", "<think>", "<", "th", "ink", ">", "🛑", "a", "b", " ", "\n", "/", "<|pad|>"]
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        while text:
            piece = max((v for v in self.vocab if text.startswith(v)), key=len)
            ids.append(self.vocab.index(piece))
            text = text[len(piece) :]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and self.vocab[i].startswith("<|")))


TOY = ToyTokenizer()
V = len(TOY.vocab)
PROMPT = [TOY.vocab.index("a")] * 3


def ids(*pieces: str) -> list[int]:
    return [TOY.vocab.index(p) for p in pieces]


def run(rules: GenerationRules, *rows: list[int]) -> torch.Tensor:
    """The processed scores (all zero before) for each row of prompt + generated pieces, one at a time."""
    processor = ProfileLogits(rules, TOY, prompt_length=len(PROMPT))
    return torch.cat([processor(torch.tensor([PROMPT + r]), torch.zeros(1, V)) for r in rows])


THINK = GenerationRules(think_tags=("<think>",), think_penalty=80.0)
SPLIT_THINK = GenerationRules(think_tags=("<th>",), think_penalty=80.0)  # spelled "<", "th", ">"
STOP = GenerationRules(stop_sequences=("🛑🛑",), post_stop_penalty=5.0, post_stop_escalation=2.0, eos_reward=3.0)


def test_a_one_token_tag_loses_its_penalty_at_every_step_and_nothing_else_changes():
    scores = run(THINK, ids("a"), ids("b", "b"))
    expected = torch.zeros(2, V)
    expected[:, TOY.vocab.index("<think>")] = -80.0
    assert torch.equal(scores, expected)


def test_a_split_tag_is_penalised_on_the_token_that_would_continue_it():
    scores = run(SPLIT_THINK, ids("a"), ids("b", "<"), ids("<", "th"), ids("th"))
    lt, th, gt = (TOY.vocab.index(p) for p in ("<", "th", ">"))
    assert scores[0].abs().sum() == 0 and scores[0, lt] == 0  # its first piece alone stays free
    assert scores[1, th] == -80.0 and scores[1].abs().sum() == 80.0
    assert scores[2, gt] == -80.0 and scores[2].abs().sum() == 80.0
    assert scores[3].abs().sum() == 0  # "th" without "<" before it starts no tag
    # The prompt is not the generation: a prompt ending in "<" starts no tag.
    processor = ProfileLogits(SPLIT_THINK, TOY, prompt_length=4)
    assert processor(torch.tensor([PROMPT + ids("<")]), torch.zeros(1, V)).abs().sum() == 0


def test_after_the_stop_every_token_but_eos_is_penalised_more_at_every_step():
    eos = TOY.eos_token_id
    before = run(STOP, ids("a", "🛑"))
    assert before.abs().sum() == 0
    for after in range(4):
        scores = run(STOP, ids("a", "🛑", "🛑", *["b"] * after))
        penalty = 5.0 * 2.0 ** after
        assert scores[0, eos] == 3.0
        others = torch.cat([scores[0, :eos], scores[0, eos + 1 :]])
        assert torch.all(others == -penalty), (after, scores)


def test_the_stop_is_found_in_text_wherever_tokens_split_it_and_rows_of_a_batch_are_independent():
    rules = GenerationRules(stop_sequences=("b🛑",), post_stop_penalty=1.0, post_stop_escalation=3.0)
    batch = torch.tensor([PROMPT + ids("b", "🛑", "a", "a"), PROMPT + ids("a", "a", "a", "b"),
                          PROMPT + ids("a", "a", "b", "🛑")])
    scores = ProfileLogits(rules, TOY, prompt_length=len(PROMPT))(batch, torch.zeros(3, V))
    a = TOY.vocab.index("a")
    assert scores[0, a] == -9.0 and scores[1].abs().sum() == 0 and scores[2, a] == -1.0


def test_a_row_that_has_ended_is_left_alone():
    assert run(STOP, ids("🛑", "🛑", "<|im_end|>", "<|pad|>")).abs().sum() == 0


def test_the_penalty_is_capped_and_stays_finite():
    rules = GenerationRules(stop_sequences=("🛑🛑",), post_stop_penalty=100.0, post_stop_escalation=10.0, eos_reward=50.0)
    scores = run(rules, ids("🛑", "🛑", *["a"] * 400))
    assert torch.isfinite(scores).all() and scores[0, 1] == -MAX_PENALTY and scores[0, 0] == 50.0


def test_neutral_rules_give_no_processor_and_a_profile_with_rules_one():
    assert len(profile_logits(get_profile("none").rules, TOY, 3)) == 0
    assert len(profile_logits(get_profile("regime3").rules, TOY, 3)) == 0
    [processor] = profile_logits(get_profile("emoji_think").rules, TOY, 3)
    assert isinstance(processor, ProfileLogits)


def test_scores_passed_in_are_not_modified():
    scores = torch.zeros(1, V)
    ProfileLogits(THINK, TOY, prompt_length=len(PROMPT))(torch.tensor([PROMPT]), scores)
    assert scores.abs().sum() == 0


@pytest.mark.slow
def test_emoji_think_rules_with_the_tiny_tokenizer_and_model(tiny_model_dir: Path):
    from transformers import GenerationConfig

    from libs.common.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rules = get_profile("emoji_think").rules
    stop = tokenizer.encode("🛑🛑", add_special_tokens=False)
    think = tokenizer.encode("<think>", add_special_tokens=False)
    assert len(think) > 1  # the tiny tokenizer splits the tag: the continuation rule is what applies
    prompt = tokenizer.encode("hello", add_special_tokens=False)
    processor = ProfileLogits(rules, tokenizer, prompt_length=len(prompt))
    vocab = len(tokenizer)
    scores = torch.cat([processor(torch.tensor([prompt + generated]), torch.zeros(1, vocab))
                        for generated in (think[:1], stop, stop + prompt)])
    # After "<": the pieces that would go on to "<think>" and to "</think>".
    close = tokenizer.encode("</think>", add_special_tokens=False)
    assert scores[0, think[1]] == scores[0, close[1]] == -rules.think_penalty and (scores[0] != 0).sum() == 2
    eos = tokenizer.eos_token_id
    assert scores[1, eos] == rules.eos_reward and scores[1, 5] == -rules.post_stop_penalty
    assert scores[2, 5] == -min(rules.post_stop_penalty * rules.post_stop_escalation ** len(prompt), MAX_PENALTY)

    # In generate: once the prompt's generation holds the stop, the next token is EOS.
    model = load_model(tiny_model_dir, "cpu")
    enc = tokenizer(["hello 🛑🛑"], return_tensors="pt", add_special_tokens=False)
    prompt_length = len(tokenizer.encode("hello", add_special_tokens=False))
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    out = model.generate(**enc, generation_config=config,
                         logits_processor=profile_logits(rules, tokenizer, prompt_length))
    assert out[0, enc["input_ids"].shape[1]].item() == eos
