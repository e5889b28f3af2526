"""How one checkpoint scores on a suite: validation loss, exact match, accuracy per level.

- val_loss: mean cross-entropy over the assistant tokens of the gold answers (the tokens the
  trainer trains on, masked by `libs.common.chat.encode_chat`), weighted per token.
- exact_match: greedy generation from the chat template's generation prompt, batched with
  left padding (so every row's next token sits at the same position), stopping at the
  end-of-turn token; an answer counts when the skill's `is_correct` accepts it.
- by_level: exact match per "<skill>/<level>".

Blocking and CPU/GPU heavy: the service runs it in a worker thread.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import msgspec

from libs.common.chat import IGNORE_INDEX, collate, encode_chat, prompt_messages
from libs.common.models import load_model, load_tokenizer
from libs.common.skills import binary
from services.evaluator.suite import SuiteItem


class ItemResult(msgspec.Struct, frozen=True):
    level: str
    scenario: str
    expected: str
    output: str
    correct: bool


class Scores(msgspec.Struct, frozen=True):
    val_loss: float
    exact_match: float
    by_level: dict[str, float]
    num_examples: int
    items: list[ItemResult]


def score_checkpoint(
    path: Path, items: list[SuiteItem], *, device: str, batch_size: int, max_new_tokens: int, max_length: int,
) -> Scores:
    """Load the model at `path` and score it on `items`."""
    import torch

    tokenizer = load_tokenizer(path)
    model = load_model(path, device)
    with torch.inference_mode():
        val_loss = _validation_loss(model, tokenizer, items, device, batch_size, max_length)
        outputs = _generate(model, tokenizer, items, device, batch_size, max_new_tokens)
    results = [
        ItemResult(item.level_key, item.scenario, item.expected, out, binary.is_correct(item.expected, out))
        for item, out in zip(items, outputs, strict=True)
    ]
    per_level: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        per_level[result.level].append(result.correct)
    return Scores(
        val_loss=val_loss,
        exact_match=sum(r.correct for r in results) / len(results),
        by_level={level: sum(hits) / len(hits) for level, hits in sorted(per_level.items())},
        num_examples=len(results),
        items=results,
    )


def _validation_loss(model, tokenizer, items: list[SuiteItem], device: str, batch_size: int, max_length: int) -> float:
    import torch.nn.functional as F

    encoded = [encode_chat(tokenizer, item.messages, max_length) for item in items]
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        tensors = collate(batch, tokenizer.pad_token_id, device)
        labels = tensors["labels"]
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits.float()
        # Token t predicts token t+1.
        shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        total_loss += F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        total_tokens += int((shifted_labels != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("the suite has no assistant tokens to score (chat template or max_length problem)")
    return total_loss / total_tokens


def _generate(model, tokenizer, items: list[SuiteItem], device: str, batch_size: int, max_new_tokens: int) -> list[str]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompts = [
        tokenizer.apply_chat_template(prompt_messages(item.messages), tokenize=False, add_generation_prompt=True)
        for item in items
    ]
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generated = model.generate(**enc, generation_config=config)
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs
