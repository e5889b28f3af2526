"""What the trainer feeds the model: which rows, tokenized how, in which order, batched how.

A dataset is a JSONL file of chat rows. Each row becomes token ids with labels on assistant
tokens only (`encode_chat`); rows left with no assistant token after truncation are dropped
(they would contribute nothing, and a batch of them has no defined loss). Every epoch visits
the rows in an order that depends only on (seed, dataset_id, epoch), so a resumed run sees
exactly the batches the interrupted one would have seen. Batches are padded to their own
longest row (right padding, labels -100, attention mask 0).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import msgspec

from libs.common.chat import ChatRow, EncodedChat, TemplateError, encode_chat


class DatasetError(ValueError):
    """The dataset cannot be trained on, now or ever (malformed rows, nothing to learn)."""


_row_decoder = msgspec.json.Decoder(ChatRow)


def read_rows(path: Path) -> list[ChatRow]:
    rows = []
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(_row_decoder.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise DatasetError(f"{path.name} line {number}: not a chat row: {exc}") from exc
    return rows


def replay_rows(earlier: list[Path], count: int, seed: int, dataset_id: str) -> list[ChatRow]:
    """`count` rows drawn uniformly (with replacement) from the rows of the `earlier` datasets.

    Fixed by (earlier, count, seed, dataset_id), so a resumed run replays the same rows.
    """
    pool = [row for path in earlier for row in read_rows(path)]
    if not pool or count <= 0:
        return []
    key = hashlib.sha256(f"{seed}:{dataset_id}:replay".encode()).digest()
    rng = random.Random(int.from_bytes(key[:8], "big"))
    return [pool[rng.randrange(len(pool))] for _ in range(count)]


def replay_count(new_rows: int, fraction: float) -> int:
    """How many replayed rows make them `fraction` of a run of `new_rows` new rows."""
    return round(new_rows * fraction / (1 - fraction)) if fraction else 0


def tokenize(rows: list[ChatRow], tokenizer, max_length: int) -> list[EncodedChat]:
    """Encoded rows that have at least one trained (assistant) token."""
    encoded = []
    for number, row in enumerate(rows, 1):
        try:
            example = encode_chat(tokenizer, row.messages, max_length)
        except TemplateError as exc:
            raise DatasetError(f"row {number}: {exc}") from exc
        if example.num_trained_tokens:
            encoded.append(example)
    if not encoded:
        raise DatasetError(f"none of {len(rows)} rows has an assistant token within max_length={max_length}")
    return encoded


# ---------------------------------------------------------------------------- order and position


def epoch_order(num_examples: int, seed: int, dataset_id: str, epoch: int) -> list[int]:
    """A permutation of the examples, fixed by (seed, dataset_id, epoch) and nothing else."""
    key = hashlib.sha256(f"{seed}:{dataset_id}:{epoch}".encode()).digest()
    order = list(range(num_examples))
    random.Random(int.from_bytes(key[:8], "big")).shuffle(order)
    return order


@dataclass(frozen=True)
class TrainingPlan:
    """How many steps a dataset takes, and where step n is in the data."""

    num_examples: int
    batch_size: int
    epochs: int
    max_steps: int = 0  # 0 = no cap

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def total_steps(self) -> int:
        full = self.batches_per_epoch * self.epochs
        return min(full, self.max_steps) if self.max_steps else full

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of the batch that step `step` + 1 trains on."""
        return divmod(step, self.batches_per_epoch)

    def batch(self, order: list[int], batch_index: int) -> list[int]:
        """The example indices of batch `batch_index` of an epoch visiting examples in `order`."""
        return order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
