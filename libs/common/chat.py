"""Rows and how they become training tokens: chat rows through the model's chat template with
loss on assistant turns only, text rows (completion_v1) as they are with loss on the whole text.

The assistant spans are found by rendering the conversation prefix by prefix with the
tokenizer's own chat template: the text added by turn i (rendered with the generation prompt
before it) is that turn's answer. This works with any template, including the stock Qwen3
one that has no `{% generation %}` markers (see NOTES.md). An earlier turn that the template
renders differently once later turns exist (Qwen3 drops its think block) is located by its
verbatim content right after the generation prompt. Anything else fails loudly instead of
silently training on the wrong tokens.

Which encoding a dataset gets is decided by its schema (`DatasetAccepted.schema`), never by
looking at its rows: `SCHEMA_KINDS` maps every schema the gatekeeper accepts to "chat" or
"text" (a test holds it equal to the gatekeeper's registry).

A text row (`encode_text`) gets what a chat row gets from the template code above and nothing
else: no BOS (chat rows are tokenized with add_special_tokens=False, the template alone decides
the special tokens, and Qwen's tokenizers have no BOS), and the tokenizer's EOS appended and
trained, as a chat answer's trained end of turn is (`<|im_end|>`, Qwen's EOS): the model learns
where a text ends, not only how it goes on. A text cut by max_length loses its EOS with the cut
(it did not end there). The first token of a text is not a label: nothing comes before it to
predict it from (the causal LM shifts labels by one), so `num_trained_tokens` counts only what
the loss actually sees.
"""

from __future__ import annotations

import msgspec

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str


class ChatRow(msgspec.Struct, frozen=True):
    """One chat_sft_v1 row as the trainer and evaluator read it (extra fields ignored)."""

    messages: list[ChatMessage]


class TextRow(msgspec.Struct, frozen=True):
    """One completion_v1 row as the trainer reads it: a text, loss on all of it."""

    text: str


# Every schema the gatekeeper accepts (services/gatekeeper/schemas.py) and how its rows train:
# "chat" through the chat template with loss on assistant tokens, "text" as is with loss on all.
SCHEMA_KINDS: dict[str, str] = {"chat_sft_v1": "chat", "syllo_v1": "chat", "completion_v1": "text"}


class TemplateError(ValueError):
    """The chat template does not render a conversation as a sequence of stable prefixes."""


class EncodedChat(msgspec.Struct, frozen=True):
    """One training example (a chat row or a text row): token ids and the labels the loss sees."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but trained tokens (assistant tokens of a chat)

    @property
    def num_trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def text_token_ids(tokenizer, text: str) -> list[int]:
    """A text's token ids as the model reads it: no special tokens added (a template wrote its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_token_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The prompt a model answers: the chat template over `messages` with the generation prompt added."""
    plain = [{"role": m.role, "content": m.content} for m in messages]
    return text_token_ids(tokenizer, _render(tokenizer, plain, add_generation_prompt=True))


def assistant_char_spans(tokenizer, messages: list[ChatMessage]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    plain = [{"role": m.role, "content": m.content} for m in messages]
    full = _render(tokenizer, plain, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = _render(tokenizer, plain[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, plain[: i + 1], add_generation_prompt=False)
        if through.startswith(before) and full.startswith(through):
            spans.append((len(before), len(through)))
        elif span := _earlier_turn_span(tokenizer, full, before, message.content):
            spans.append(span)
        else:
            raise TemplateError(f"chat template is not prefix-stable at turn {i}; cannot mask assistant tokens")
    return full, spans


def _earlier_turn_span(tokenizer, full: str, before: str, content: str) -> tuple[int, int] | None:
    """An earlier assistant turn that the template renders differently once later turns exist.

    Qwen3's template, for one, gives the last answer an empty think block that earlier answers
    lose. The turn still opens exactly as the generation prompt does and its content follows
    verbatim: train on that content and the end-of-turn token after it.
    """
    if not content or not full.startswith(before) or not full.startswith(content, len(before)):
        return None
    end = len(before) + len(content)
    eos = tokenizer.eos_token or ""
    if eos and full.startswith(eos, end):
        end += len(eos)
    return len(before), end


def encode_chat(tokenizer, messages: list[ChatMessage], max_length: int) -> EncodedChat:
    """Token ids and labels for one conversation, truncated to `max_length` tokens."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = []
    span_idx = 0
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        inside = span_idx < len(spans) and start >= spans[span_idx][0] and end > start
        labels.append(token_id if inside else IGNORE_INDEX)
    if labels:
        # Nothing comes before the first token to predict it from: the loss never sees its label.
        labels[0] = IGNORE_INDEX
    return EncodedChat(input_ids=list(enc["input_ids"]), labels=labels)


def text_end_ids(tokenizer) -> list[int]:
    """What a text row gets after its text: the tokenizer's EOS, when it has one."""
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos]


def encode_text(tokenizer, text: str, max_length: int) -> EncodedChat:
    """Token ids and labels for one text row: loss on every token after the first, EOS included,
    truncated to `max_length` tokens (see the module's docstring for why EOS and no BOS)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + text_end_ids(tokenizer)
    ids = ids[:max_length]
    return EncodedChat(input_ids=ids, labels=[IGNORE_INDEX, *ids[1:]] if ids else [])


def prompt_messages(messages: list[ChatMessage]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn: what a model is asked."""
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    return [{"role": m.role, "content": m.content} for m in messages[:last]]


def collate(examples: list[EncodedChat], pad_id: int, device: str = "cpu") -> dict:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE_INDEX on padding).

    The one batching rule for training and scoring, so val loss is measured on exactly the
    tokens and masks the trainer trains on.
    """
    import torch  # noqa: PLC0415 - keeps this module importable without torch (gatekeeper, CLI)

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def collate_packed(sequences: list[list[EncodedChat]], pad_id: int) -> dict:
    """Packed sequences as one batch: input_ids, position_ids, labels; no attention mask.

    Each sequence is its examples one after another, each example's position ids restarting at
    0; sequences are right-padded to the longest (labels IGNORE_INDEX), the padding's positions
    continuing its sequence's last. Called without an attention mask and with `use_cache=False`,
    transformers then masks attention block-diagonally by the position ids (sdpa, eager) or runs
    varlen flash-attention, so each example sees only itself; padding comes after every real
    token and a causal model never looks ahead, so it changes nothing. A sequence of one example
    is exactly a right-padded row. Without `use_cache=False` transformers 5 skips the isolation
    silently (docs/experiments/packing-cpu.md): the recipe always passes it.
    """
    import torch  # noqa: PLC0415

    lengths = [sum(len(e.input_ids) for e in sequence) for sequence in sequences]
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = 0
        for example in sequence:
            n = len(example.input_ids)
            input_ids[row, start:start + n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, start:start + n] = torch.tensor(example.labels, dtype=torch.long)
            position_ids[row, start:start + n] = torch.arange(n)
            start += n
        last = int(position_ids[row, start - 1]) if start else -1
        position_ids[row, start:] = torch.arange(last + 1, last + 1 + width - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
