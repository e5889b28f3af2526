"""Per-request token choice inside the batching engine (services/inference/sampling.py): pure torch, no model."""

from __future__ import annotations

import math

import pytest
import torch

from libs.common.profiles import GenerationRules
from services.inference.sampling import RowSampling, SamplingTable, TokenLogprob, choose, nucleus

INF = float("-inf")


def picked(out: torch.Tensor) -> list[int]:
    """The token each row of `choose`'s output allows (its one finite logit)."""
    assert bool((torch.isfinite(out).sum(dim=-1) <= 1).all())
    return out.argmax(dim=-1).tolist()


def test_plain_greedy_rows_leave_the_logits_to_the_engines_argmax():
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    assert choose(scores, [RowSampling(), None]) is scores


def test_greedy_and_sampled_rows_in_one_batch_each_get_their_own_choice():
    scores = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 9.0]])
    rows = [RowSampling(), RowSampling(temperature=1.0, seed=1), RowSampling(top_logprobs=0)]
    out = choose(scores, rows)
    assert torch.isinf(out).sum() == 3 * 4 - 3
    tokens = picked(out)
    assert tokens[0] == 1 and tokens[2] == 3
    assert rows[2].logprobs == [TokenLogprob(3, pytest.approx(torch.log_softmax(scores[2], 0)[3].item()), ())]


def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch():
    torch.manual_seed(0)
    steps = [torch.randn(4, 50) for _ in range(20)]

    def run(batch_position: int, neighbours: int) -> list[int]:
        mine = RowSampling(temperature=0.8, top_p=0.95, seed=1234)
        others = [RowSampling(temperature=1.0, seed=s) for s in range(neighbours)]
        tokens = []
        for logits in steps:
            rows = others[:batch_position] + [mine] + others[batch_position:]
            batch = torch.cat([logits[:1].repeat(len(rows), 1)])
            tokens.append(picked(choose(batch, rows))[batch_position])
        return tokens

    alone = run(0, 0)
    assert alone == run(2, 3) == run(1, 1)
    assert len(set(alone)) > 3  # it really samples
    other_seed = RowSampling(temperature=0.8, top_p=0.95, seed=99)
    assert [picked(choose(s[:1], [other_seed]))[0] for s in steps] != alone


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])
    row = RowSampling(temperature=1.0, seed=5)
    counts = [0, 0, 0]
    for _ in range(4000):
        counts[picked(choose(logits, [row]))[0]] += 1
    assert [c / 4000 for c in counts] == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    # A low temperature sharpens it toward the most likely token.
    cold = RowSampling(temperature=0.25, seed=5)
    firsts = sum(picked(choose(logits, [cold]))[0] == 0 for _ in range(1000))
    assert firsts / 1000 == pytest.approx(0.6**4 / (0.6**4 + 0.3**4 + 0.1**4), abs=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = torch.isfinite(nucleus(logits, torch.tensor([0.7, 0.5])))
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]
    # The most likely token always stays, even for a tiny top_p.
    assert torch.isfinite(nucleus(logits[:1], torch.tensor([0.01]))).tolist() == [[True, False, False, False]]
    row = RowSampling(temperature=1.0, top_p=0.7, seed=3)
    assert {picked(choose(logits[:1], [row]))[0] for _ in range(300)} == {0, 1}


def test_log_probabilities_are_the_models_own_with_the_top_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    row = RowSampling(temperature=2.0, seed=0, top_logprobs=2)
    token = picked(choose(logits, [row]))[0]
    expected = torch.log_softmax(logits[0], 0)  # before temperature: what the model itself says
    [entry] = row.logprobs
    assert entry.token == token and entry.logprob == pytest.approx(expected[token].item())
    assert [t for t, _ in entry.top] == [1, 2]
    assert [lp for _, lp in entry.top] == pytest.approx([expected[1].item(), expected[2].item()])


class _Tokenizer:
    """A stand-in tokenizer for the rules: "<" is 1, "th" 2, "ink" 3, ">" 4; EOS is 0."""

    eos_token_id = 0
    pieces = {1: "<", 2: "th", 3: "ink", 4: ">", 5: "a", 6: "!!"}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"<think>": [1, 2, 3, 4], "</think>": [1, 7, 2, 3, 4]}[text]

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces.get(t, "") for t in tokens)


def test_a_profiles_rules_steer_each_row_by_what_it_generated():
    from libs.common.profile_logits import ProfileLogits

    rules = ProfileLogits(GenerationRules(think_tags=("<think>",), think_penalty=50.0, stop_sequences=("!!",),
                                          post_stop_penalty=100.0, eos_reward=50.0), _Tokenizer(), prompt_length=0)
    # "th" would continue "<" into a think tag: penalised, so the row takes its next best token.
    scores = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 5.0, 0.0, 0.0]] * 3)
    tagged, plain, stopped = (RowSampling(rules=rules) for _ in range(3))
    tagged.generated, plain.generated, stopped.generated = [5, 1], [5, 5], [5, 6]
    assert picked(choose(scores, [tagged, plain, stopped])) == [5, 2, 0]  # after the stop "!!": EOS


def test_the_table_hands_out_distinct_slots_and_forgets_them():
    table = SamplingTable()
    rows = [RowSampling() for _ in range(3)]
    slots = [table.add(r) for r in rows]
    assert len(set(slots)) == 3 and [table.get(s) for s in slots] == rows
    table.remove(slots[1])
    assert table.get(slots[1]) is None and len(table) == 2
