"""How one checkpoint scores on a suite: loss, accuracy with its interval, calibration, per item.

- val_loss: mean cross-entropy over the assistant tokens of the gold answers (the tokens the
  trainer trains on, masked by `libs.common.chat.encode_chat`), weighted per token; per level
  the same over that level's items. None when it is not finite (a diverged model).
- exact_match: greedy generation from the chat template's generation prompt, batched with
  left padding (so every row's next token sits at the same position), stopping at the
  end-of-turn token; an answer counts when the item's own skill's `is_correct` accepts it
  (Binary compares a string, SYLLO the list of words). An item whose prompt alone fills
  `max_length` tokens is not generated (`answered` False) and counts wrong: the trainer never
  trains an answer token there (a long SYLLO prompt in a small max_length), and generating it
  would only cost time.
- levels: per "<skill>/<level>" the items right, the accuracy and its 95% Wilson score
  interval (`wilson_interval`); `by_level` is the accuracy alone (what the curriculum reads).
- outcomes: every item's result in suite order (`libs.common.events.encode_outcomes`), so
  two checkpoints can be compared item by item.
- confidence of an answer: the geometric mean of the probabilities the model gave the tokens
  it generated greedily, up to and including the end-of-turn token (the product would punish
  long answers for their length). ece: the expected calibration error over 6 equal-width
  confidence bins (`expected_calibration_error`), over the answered items.
- probes: items answered like the suite's (the evaluator's hard-example probes) whose results
  enter no statistic: the model is loaded once for both.
- profile: a checkpoint trained on a data profile (`CheckpointSaved.profile`,
  libs.common.profiles) is asked as it was trained: the profile's system prompt goes into every
  item's conversation (for the loss and the generation alike), its generation rules steer
  generation (libs.common.profile_logits; the confidence stays the model's own, from the raw
  logits), and the skill judges the answer without the profile's wrapping (`Profile.answer`:
  the emoji lines, the answer markers). The gold answers are the suite's, unwrapped.

Blocking and CPU/GPU heavy: the service runs `score_checkpoint` in a worker thread.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import msgspec

from libs.common.chat import IGNORE_INDEX, collate, encode_chat, prompt_messages
from libs.common.events import LevelScore, encode_outcomes
from libs.common.models import load_model, load_tokenizer
from libs.common.profiles import DEFAULT_PROFILE, Profile, get_profile
from libs.common.skills import Expected, get_skill
from services.evaluator.suite import SuiteItem

# The normal quantile for a two-sided 95% interval.
Z_95 = 1.959963984540054
CALIBRATION_BINS = 6


class ItemResult(msgspec.Struct, frozen=True):
    level: str
    scenario: str
    expected: Expected
    output: str
    correct: bool
    # The geometric mean probability of the generated tokens; None: not finite, not answered (or scored before).
    confidence: float | None = None
    # False: the prompt alone fills max_length, so nothing was generated and the item counts wrong.
    answered: bool = True


class Scores(msgspec.Struct, frozen=True):
    val_loss: float | None
    exact_match: float
    exact_match_low: float
    exact_match_high: float
    by_level: dict[str, float]
    levels: dict[str, LevelScore]
    outcomes: str
    ece: float | None
    num_examples: int
    items: list[ItemResult]
    # The probes' results, in the order given; part of no statistic.
    probes: list[ItemResult] = []

    def figures(self) -> dict:
        """The fields `EvalScored` and `ChampionTested` both report, by their names there."""
        return {"exact_match": self.exact_match, "exact_match_low": self.exact_match_low,
                "exact_match_high": self.exact_match_high, "num_examples": self.num_examples,
                "val_loss": self.val_loss, "levels": self.levels, "outcomes": self.outcomes, "ece": self.ece}


# ---------------------------------------------------------------------------- statistics


def finite(value: float) -> float | None:
    """`value`, or None when it is NaN or infinite (JSON has no NaN: msgspec would write null)."""
    return value if math.isfinite(value) else None


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct / total` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or all
    correct: 16 of 16 right is [0.806, 1.0], not [1.0, 1.0]. No items: [0, 1].
    """
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def expected_calibration_error(
    confidences: Sequence[float | None], correct: Sequence[bool], bins: int = CALIBRATION_BINS,
) -> float | None:
    """Sum over equal-width confidence bins of (items in bin / items) * |accuracy - mean confidence|.

    Bin b holds confidences in [b/bins, (b+1)/bins), the last bin includes 1.0. None when there
    are no items or any confidence is missing or not finite: calibration is then undefined.
    """
    if not confidences or len(confidences) != len(correct):
        return None
    if any(c is None or not math.isfinite(c) for c in confidences):
        return None
    count = [0] * bins
    right = [0] * bins
    confidence_sum = [0.0] * bins
    for conf, ok in zip(confidences, correct, strict=True):
        b = min(int(conf * bins), bins - 1)
        count[b] += 1
        right[b] += ok
        confidence_sum[b] += conf
    n = len(confidences)
    return sum(abs(right[b] - confidence_sum[b]) / n for b in range(bins) if count[b])


def level_scores(
    levels: Sequence[str], correct: Sequence[bool], loss_sums: Sequence[float], loss_tokens: Sequence[int],
) -> dict[str, LevelScore]:
    """Per level key: items right, accuracy, its Wilson interval and the token-weighted val loss."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for i, level in enumerate(levels):
        grouped[level].append(i)
    scores = {}
    for level, indices in sorted(grouped.items()):
        right = sum(bool(correct[i]) for i in indices)
        tokens = sum(loss_tokens[i] for i in indices)
        low, high = wilson_interval(right, len(indices))
        scores[level] = LevelScore(
            correct=right, total=len(indices), accuracy=right / len(indices), low=low, high=high,
            val_loss=finite(sum(loss_sums[i] for i in indices) / tokens) if tokens else None,
        )
    return scores


def judge(
    items: Sequence[SuiteItem], outputs: Sequence[str], confidences: Sequence[float | None],
    answered: Sequence[bool] | None = None, profile: str = DEFAULT_PROFILE,
) -> list[ItemResult]:
    """Each item's result: right when it was answered and its skill's `is_correct` accepts the output
    (the answer in it, without `profile`'s wrapping). The output is kept as generated."""
    answered = [True] * len(items) if answered is None else answered
    answer = get_profile(profile).answer
    return [
        ItemResult(item.level_key, item.scenario, item.expected, out,
                   ok and get_skill(item.skill).is_correct(item.expected, answer(out)), conf, ok)
        for item, out, conf, ok in zip(items, outputs, confidences, answered, strict=True)
    ]


def summarise(
    items: Sequence[SuiteItem], outputs: Sequence[str], confidences: Sequence[float | None],
    loss_sums: Sequence[float], loss_tokens: Sequence[int], answered: Sequence[bool] | None = None,
    profile: str = DEFAULT_PROFILE,
) -> Scores:
    """Every statistic of one scoring run from its per-item parts (pure: no model).

    `answered` (default: all) marks the items that were generated; the others count wrong and
    stay out of the calibration error.
    """
    total_tokens = sum(loss_tokens)
    if total_tokens == 0:
        raise ValueError("the suite has no assistant tokens to score (chat template or max_length problem)")
    results = judge(items, outputs, confidences, answered, profile)
    correct = [r.correct for r in results]
    right = sum(correct)
    low, high = wilson_interval(right, len(results))
    levels = level_scores([r.level for r in results], correct, loss_sums, loss_tokens)
    generated = [r for r in results if r.answered]
    return Scores(
        val_loss=finite(sum(loss_sums) / total_tokens),
        exact_match=right / len(results),
        exact_match_low=low,
        exact_match_high=high,
        by_level={level: score.accuracy for level, score in levels.items()},
        levels=levels,
        outcomes=encode_outcomes(correct),
        ece=expected_calibration_error([r.confidence for r in generated], [r.correct for r in generated]),
        num_examples=len(results),
        items=results,
    )


# ---------------------------------------------------------------------------- the model


def score_checkpoint(
    path: Path, items: list[SuiteItem], *, device: str, batch_size: int, max_new_tokens: int, max_length: int,
    probes: Sequence[SuiteItem] = (), profile: str = DEFAULT_PROFILE,
) -> Scores:
    """Load the model at `path`, score it on `items` and answer `probes` (results only), asked as
    `profile` asks (its system prompt and generation rules; ValueError when the name is unknown)."""
    import torch

    chosen = get_profile(profile)
    tokenizer = load_tokenizer(path)
    model = load_model(path, device)
    with torch.inference_mode():
        loss_sums, loss_tokens = _validation_losses(model, tokenizer, items, device, batch_size, max_length, chosen)
        outputs, confidences, answered = _generate(model, tokenizer, items, device, batch_size, max_new_tokens,
                                                   max_length, chosen)
        probe_answers = _generate(model, tokenizer, list(probes), device, batch_size, max_new_tokens, max_length,
                                  chosen)
    scores = summarise(items, outputs, confidences, loss_sums, loss_tokens, answered, profile)
    return msgspec.structs.replace(scores, probes=judge(probes, *probe_answers, profile=profile))


def generation_prompts(tokenizer, items: Sequence[SuiteItem], profile: Profile) -> list[str]:
    """Each item's prompt as its model is asked: the conversation before the gold answer, with the
    profile's system prompt, through the chat template up to the generation prompt."""
    return [
        tokenizer.apply_chat_template(prompt_messages(profile.prompted(item.messages)), tokenize=False,
                                      add_generation_prompt=True)
        for item in items
    ]


def _validation_losses(
    model, tokenizer, items: list[SuiteItem], device: str, batch_size: int, max_length: int, profile: Profile,
) -> tuple[list[float], list[int]]:
    """Per item: the summed cross-entropy over its gold answer tokens, and how many there are."""
    import torch.nn.functional as F

    encoded = [encode_chat(tokenizer, profile.prompted(item.messages), max_length) for item in items]
    sums: list[float] = []
    tokens: list[int] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        tensors = collate(batch, tokenizer.pad_token_id, device)
        labels = tensors["labels"]
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits.float()
        # Token t predicts token t+1; ignored positions contribute 0.
        shifted_labels = labels[:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        ).view(shifted_labels.shape)
        sums.extend(losses.double().sum(dim=1).tolist())
        tokens.extend((shifted_labels != IGNORE_INDEX).sum(dim=1).tolist())
    return sums, tokens


def _generate(
    model, tokenizer, items: list[SuiteItem], device: str, batch_size: int, max_new_tokens: int, max_length: int,
    profile: Profile,
) -> tuple[list[str], list[float | None], list[bool]]:
    """Greedy answers under the profile's generation rules, each answer's confidence (geometric mean
    probability of its tokens), and whether it was generated at all (not when the prompt alone
    fills `max_length`)."""
    import torch
    from transformers import GenerationConfig

    from libs.common.profile_logits import profile_logits

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        # The raw logits, before any processor: the model's own probabilities.
        output_logits=True,
    )
    prompts = generation_prompts(tokenizer, items, profile)
    answered = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) < max_length for p in prompts]
    prompts = [p for p, ok in zip(prompts, answered, strict=True) if ok]
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    confidences: list[float | None] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # The rules tell the prompt from the generation by the batch's (left-padded) prompt width.
        rules = profile_logits(profile.rules, tokenizer, prompt_length=enc["input_ids"].shape[1])
        generated = model.generate(**enc, generation_config=config, logits_processor=rules)
        new_tokens = generated.sequences[:, enc["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        # One step at a time: the logits of every step at once can be large (vocab x steps x batch).
        chosen = torch.stack([
            torch.log_softmax(step.float(), dim=-1).gather(1, new_tokens[:, t : t + 1]).squeeze(1)
            for t, step in enumerate(generated.logits)
        ], dim=1)
        # A row's answer ends with its first end-of-turn token; what follows is padding.
        is_end = new_tokens == tokenizer.eos_token_id
        answer = (is_end.long().cumsum(dim=1) - is_end.long()) == 0
        mean_logprob = torch.where(answer, chosen, 0.0).sum(dim=1) / answer.sum(dim=1)
        confidences.extend(finite(math.exp(v)) if math.isfinite(v) else None for v in mean_logprob.tolist())
    # The unanswered items get no output and no confidence, in their places.
    generated = iter(zip(outputs, confidences, strict=True))
    placed = [next(generated) if ok else ("", None) for ok in answered]
    return [out for out, _ in placed], [conf for _, conf in placed], answered
