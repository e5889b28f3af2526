"""The standard level: every row measured in tokens as the trainer will encode it.

Checks (all rows that passed the quick checks, measured by tokens.py in batches):
- template          (error) the base model's chat template cannot render the conversation,
                    or not as stable prefixes, so the trainer cannot find its answer tokens
- token_length      (error) overlength policy "reject": the row is longer than max_length;
                    policy "truncate": not one answer token lies within the first max_length
                    tokens (there would be nothing left to learn from)
- token_truncation  (warning) policy "truncate": the row is longer than max_length and the
                    trainer cuts it there
Every measured length goes into the report's length distribution. max_length and the
overlength policy are settings; keep max_length equal to the trainer's.
"""

from __future__ import annotations

from typing import Literal

from services.gatekeeper.checks import Batch, Check, Tally
from services.gatekeeper.lengths import LengthStats
from services.gatekeeper.schemas import RowSchema
from services.gatekeeper.tokens import TokenCounter

Overlength = Literal["truncate", "reject"]

TEMPLATE = Check(
    "template", "standard", "error", "row",
    "the model's chat template renders the conversation as stable prefixes (the trainer needs them)",
)
TOKEN_LENGTH = Check(
    "token_length", "standard", "error", "row",
    "overlength=reject: at most max_length tokens; overlength=truncate: an answer token within the first max_length",
)
TOKEN_TRUNCATION = Check(
    "token_truncation", "standard", "warning", "row", "overlength=truncate: longer rows are cut at max_length"
)
STANDARD_CHECKS = (TEMPLATE, TOKEN_LENGTH, TOKEN_TRUNCATION)


class TokenLengths:
    def __init__(self, schema: RowSchema, counter: TokenCounter, max_length: int, overlength: Overlength) -> None:
        self.schema = schema
        self.counter = counter
        self.max_length = max_length
        self.overlength = overlength
        self.stats = LengthStats(max_length)

    def __call__(self, batch: Batch) -> None:
        live = batch.live()
        if self.schema.kind == "chat":
            conversation = self.schema.conversation
            lengths = self.counter.measure_chats([conversation(batch.rows[i]) for i in live])
        else:
            text = self.schema.text
            lengths = self.counter.count_texts([text(batch.rows[i]) for i in live])
        measured = []
        for i, length in zip(live, lengths):
            if isinstance(length, str):
                batch.error(i, TEMPLATE, length)
                continue
            measured.append(length)
            if length > self.max_length:
                self._over(batch, i, length)
        self.stats.add(measured)

    def _over(self, batch: Batch, i: int, length: int) -> None:
        if self.overlength == "reject":
            batch.error(i, TOKEN_LENGTH, f"the row is {length} tokens, over max_length {self.max_length}")
            return
        if self.schema.kind == "chat":
            messages = self.schema.conversation(batch.rows[i])
            if self.counter.trained_within(messages, self.max_length) == 0:
                batch.error(i, TOKEN_LENGTH, (
                    f"no answer token within the first {self.max_length} tokens (the row is {length} tokens): "
                    "truncated, it teaches nothing"
                ))
                return
        batch.warn(i, TOKEN_TRUNCATION, f"the row is {length} tokens; the trainer cuts it to {self.max_length}")

    def finish(self, tally: Tally) -> None:
        pass
