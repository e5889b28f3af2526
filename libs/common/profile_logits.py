"""A profile's generation rules (`libs.common.profiles.GenerationRules`) as a transformers LogitsProcessor.

Build one per `generate` call with the width of its (left-padded) prompt batch, so it can tell
the generated tokens from the prompt:

    processors = profile_logits(profile.rules, tokenizer, prompt_length=enc["input_ids"].shape[1])
    model.generate(**enc, logits_processor=processors, ...)

It keeps no state between steps: every call decides from `input_ids` alone, so it is right for
any batch, for greedy decoding and sampling alike, and cannot leak one batch into the next.

- Think tags. A tag that is one token in the vocabulary (Qwen3's `<think>`) loses
  `think_penalty` at every step. A tag the tokenizer splits (the tiny model's `<`, `th`, `ink`,
  `>`) loses it on the token that would continue it once the generation ends with the tag's
  first tokens: its first piece alone (`<`) stays free, since it starts much else. The tag's
  tokens are those the tokenizer gives the tag on its own.
- After the stop. Once a stop sequence appears in a row's decoded generation, each following
  token but EOS loses `post_stop_penalty * post_stop_escalation ** n`, n the tokens generated
  since the stop (the first token after it: n = 0), capped at MAX_PENALTY so the logits stay
  finite (a gap of 1e4 is already absolute), and EOS gains `eos_reward`. A row that has ended
  (an EOS among its generated tokens; generate pads it from there) is left alone.

Text, not tokens, decides where a stop sequence is: an emoji is several byte tokens that merge
differently in context, and the generated text is what a reader sees.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from libs.common.models import eos_ids
from libs.common.profiles import GenerationRules

MAX_PENALTY = 1e4
# Escalation exponents beyond this are capped anyway: keep float powers finite.
_MAX_EXPONENT = 64


class ProfileLogits(LogitsProcessor):
    """`rules` applied to the tokens generated after the first `prompt_length` of each row."""

    def __init__(self, rules: GenerationRules, tokenizer, prompt_length: int) -> None:
        self.rules = rules
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.eos_ids = eos_ids(None, tokenizer)  # the tokenizer's: what ends a row here
        tags = [tuple(tokenizer.encode(tag, add_special_tokens=False)) for tag in rules.think_tags]
        self.tag_ids = [ids for ids in tags if ids] if rules.think_penalty else []
        self.stop_sequences = rules.stop_sequences if (rules.post_stop_penalty or rules.eos_reward) else ()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        scores = scores.clone()
        for row in range(generated.shape[0]):
            self.adjust(scores[row], generated[row].tolist())
        return scores

    def adjust(self, scores: torch.Tensor, generated: list[int]) -> None:
        """Apply the rules in place to one row's next-token `scores`, given the tokens it generated so far.

        The one place the rules live: `generate` (above, row by row) and the serving engine's
        sampler (services/inference/sampling.py) both call it.
        """
        for ids in self.tag_ids:
            self._penalise_tag(scores, generated, ids)
        if self.stop_sequences:
            after = self.tokens_after_stop(generated)
            if after is not None:
                self._after_stop(scores, after)

    # ------------------------------------------------------------------ think tags

    def _penalise_tag(self, scores: torch.Tensor, generated: list[int], ids: tuple[int, ...]) -> None:
        penalty = self.rules.think_penalty
        if len(ids) == 1:
            scores[ids[0]] -= penalty
            return
        for k in range(1, min(len(ids), len(generated) + 1)):
            if tuple(generated[-k:]) == ids[:k]:
                scores[ids[k]] -= penalty

    # ------------------------------------------------------------------ after the stop

    def tokens_after_stop(self, tokens: list[int]) -> int | None:
        """How many tokens a row generated after its first stop sequence; None: no stop yet, or ended."""
        if any(t in self.eos_ids for t in tokens) or not self._has_stop(tokens):
            return None
        # The shortest prefix holding a stop sequence: containment only grows with the prefix.
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if self._has_stop(tokens[:middle]):
                high = middle
            else:
                low = middle + 1
        return len(tokens) - low

    def _has_stop(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(stop in text for stop in self.stop_sequences)

    def _after_stop(self, scores: torch.Tensor, after: int) -> None:
        rules = self.rules
        penalty = min(rules.post_stop_penalty * rules.post_stop_escalation ** min(after, _MAX_EXPONENT), MAX_PENALTY)
        eos = scores[self.eos_ids].clone()
        scores -= penalty
        scores[self.eos_ids] = eos + rules.eos_reward


def profile_logits(rules: GenerationRules, tokenizer, prompt_length: int) -> LogitsProcessorList:
    """The processors for one `generate` call under `rules`: none when the rules change nothing."""
    if rules.neutral:
        return LogitsProcessorList()
    return LogitsProcessorList([ProfileLogits(rules, tokenizer, prompt_length)])
