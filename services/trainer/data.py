"""What the trainer feeds the model: which rows, tokenized how, in which order, batched how.

A dataset is a JSONL file of rows of one schema, the one its `dataset.accepted` names
(`DatasetAccepted.schema`; never guessed from the rows). Chat schemas (chat_sft_v1, syllo_v1)
become token ids with labels on assistant tokens only (`encode_chat`); completion_v1 rows
become their text's tokens plus EOS, with labels on all of them (`encode_text`). A line that is
not a row of its schema fails the whole dataset: the gatekeeper stored it normalised, so the
dataset is not what its schema says.

A row that cannot be trained on is dropped with its reason, never the whole dataset: its
template or tokenization fails, or it is left with no trained token (no assistant turn, only
empty answers, or every answer cut away by max_length truncation). The drops are counted,
logged and reported (`Encoded.summary`, on `training.started`). A dataset none of whose rows
is left fails (`DatasetError`, dead-lettered with the reasons): it never trains on zero loss.

Every epoch visits the rows in an order that depends only on (seed, dataset_id, epoch), so a
resumed run sees exactly the batches the interrupted one would have seen. Batches are padded to
their own longest row (right padding, labels -100, attention mask 0).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from libs.common.chat import SCHEMA_KINDS, ChatRow, EncodedChat, TemplateError, TextRow, encode_chat, encode_text
from services.trainer.packing import Batching, Step, epoch_steps

DEFAULT_SCHEMA = "chat_sft_v1"
Row = ChatRow | TextRow


class DatasetError(ValueError):
    """The dataset cannot be trained on, now or ever (malformed rows, nothing to learn)."""


_decoders = {"chat": msgspec.json.Decoder(ChatRow), "text": msgspec.json.Decoder(TextRow)}


def schema_kind(schema: str) -> str:
    """How rows of `schema` train: "chat" or "text"; a schema the trainer does not know fails."""
    try:
        return SCHEMA_KINDS[schema]
    except KeyError:
        raise DatasetError(f"the trainer cannot train schema {schema!r}; it trains: {', '.join(SCHEMA_KINDS)}") from None


def iter_rows(path: Path, schema: str = DEFAULT_SCHEMA) -> Iterator[Row]:
    """The rows of a dataset of `schema`, one line at a time (a large file is never held whole)."""
    decoder = _decoders[schema_kind(schema)]
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise DatasetError(f"{path.name} line {number}: not a {schema} row: {exc}") from exc


def read_rows(path: Path, schema: str = DEFAULT_SCHEMA) -> list[Row]:
    """The rows of a dataset of `schema`: ChatRow for chat schemas, TextRow for completion_v1."""
    return list(iter_rows(path, schema))


def replay_picks(pool_sizes: Sequence[int], count: int, seed: int, dataset_id: str) -> list[tuple[int, int]]:
    """`count` (pool, example) pairs drawn uniformly, with replacement, over the examples of the
    earlier datasets (`pool_sizes[k]` examples in dataset k).

    Fixed by (pool_sizes, count, seed, dataset_id), so a resumed run replays the same examples.
    """
    total = sum(pool_sizes)
    if not total or count <= 0:
        return []
    starts = list(itertools.accumulate(pool_sizes, initial=0))
    key = hashlib.sha256(f"{seed}:{dataset_id}:replay".encode()).digest()
    rng = random.Random(int.from_bytes(key[:8], "big"))
    picks = []
    for _ in range(count):
        flat = rng.randrange(total)
        pool = bisect.bisect_right(starts, flat) - 1
        picks.append((pool, flat - starts[pool]))
    return picks


def validation_split(num_examples: int, fraction: float, max_rows: int, min_examples: int, seed: int,
                     dataset_id: str) -> tuple[list[int], list[int]]:
    """(training, validation) example indices: a held-out slice of the dataset's own examples.

    `fraction` of them, at most `max_rows`, chosen by (seed, dataset_id) alone; none when the
    dataset has fewer than `min_examples` (every row of a small dataset is worth training on).
    """
    size = min(max_rows, int(num_examples * fraction)) if num_examples >= min_examples else 0
    if size <= 0:
        return list(range(num_examples)), []
    key = hashlib.sha256(f"{seed}:{dataset_id}:validation".encode()).digest()
    held = set(random.Random(int.from_bytes(key[:8], "big")).sample(range(num_examples), size))
    return [i for i in range(num_examples) if i not in held], sorted(held)


def replay_count(new_rows: int, fraction: float) -> int:
    """How many replayed rows make them `fraction` of a run of `new_rows` new rows."""
    return round(new_rows * fraction / (1 - fraction)) if fraction else 0


# ---------------------------------------------------------------------------- encoding, row by row


@dataclass(frozen=True)
class Dropped:
    row: int  # 1-based, in the order the rows were given
    reason: str


@dataclass(frozen=True)
class Encoded:
    """The rows that train, and those dropped with their reasons."""

    examples: list[EncodedChat]
    dropped: list[Dropped] = field(default_factory=list)

    def summary(self, limit: int = 10) -> list[str]:
        """One line per reason, the most common first: "2 rows (3, 7): <reason>"."""
        by_reason: dict[str, list[int]] = {}
        for drop in self.dropped:
            by_reason.setdefault(drop.reason, []).append(drop.row)
        ordered = sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[1][0]))
        lines = []
        for reason, rows in ordered[:limit]:
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            lines.append(f"{len(rows)} row{'s' if len(rows) > 1 else ''} ({shown}): {reason}")
        if len(ordered) > limit:
            rest = sum(len(rows) for _, rows in ordered[limit:])
            lines.append(f"{rest} more rows for {len(ordered) - limit} other reasons")
        return lines

    def counts(self) -> Counter:
        return Counter(drop.reason for drop in self.dropped)


def encode_row(row: Row, tokenizer, max_length: int) -> EncodedChat | str:
    """The row's training example, or why it cannot be trained on (never an empty mask)."""
    if isinstance(row, TextRow):
        try:
            example = encode_text(tokenizer, row.text, max_length)
        except Exception as exc:  # noqa: BLE001 - the tokenizer's complaint is the reason
            return f"tokenization failed: {type(exc).__name__}: {exc}"
        if not example.num_trained_tokens:
            return f"no token to learn within max_length={max_length} (the text is empty or only its first token fits)"
        return example
    answers = [m.content for m in row.messages if m.role == "assistant"]
    if not answers:
        return "no assistant turn: nothing to train on"
    if all(not answer.strip() for answer in answers):
        return "no assistant content: every assistant turn is empty"
    try:
        example = encode_chat(tokenizer, row.messages, max_length)
    except TemplateError as exc:
        return f"chat template: {exc}"
    except Exception as exc:  # noqa: BLE001 - the template's own complaint (raise_exception) is the reason
        return f"the chat template refused the conversation: {type(exc).__name__}: {exc}"
    if not example.num_trained_tokens:
        return f"no assistant token within max_length={max_length}: truncation cuts every answer away"
    return example


def encode_rows(rows: Sequence[Row], tokenizer, max_length: int) -> Encoded:
    """Every row's example, the rows that cannot train dropped with a reason.

    Raises DatasetError, with the reasons, when no row is left: a run never trains on zero loss.
    """
    examples, dropped = [], []
    for number, row in enumerate(rows, 1):
        outcome = encode_row(row, tokenizer, max_length)
        if isinstance(outcome, str):
            dropped.append(Dropped(number, outcome if len(outcome) <= 300 else outcome[:297] + "..."))
        else:
            examples.append(outcome)
    encoded = Encoded(examples, dropped)
    if not examples:
        raise DatasetError(f"none of {len(rows)} rows can be trained on: {'; '.join(encoded.summary(3)) or 'no rows'}")
    return encoded


# ---------------------------------------------------------------------------- order and position


def epoch_order(num_examples: int, seed: int, dataset_id: str, epoch: int) -> list[int]:
    """A permutation of the examples, fixed by (seed, dataset_id, epoch) and nothing else."""
    key = hashlib.sha256(f"{seed}:{dataset_id}:{epoch}".encode()).digest()
    order = list(range(num_examples))
    random.Random(int.from_bytes(key[:8], "big")).shuffle(order)
    return order


class TrainingPlan:
    """Every optimizer step of a run: which examples, packed into which sequences and micro-batches.

    Epoch e visits the examples in `epoch_order(..., e)`; `services.trainer.packing.epoch_steps`
    turns that order into steps. Planned whole at setup, so the step count (and with it the
    learning rate schedule) is known before the first step, and step n of a resumed run is the
    step n of the interrupted one.
    """

    def __init__(self, lengths: Sequence[int], batching: Batching, epochs: int, max_steps: int, seed: int,
                 dataset_id: str, max_tokens: int = 0) -> None:
        self.num_examples = len(lengths)
        self.epochs = epochs
        self._epochs: list[list[Step]] = []
        # The run ends at whichever comes first: `epochs` epochs, `max_steps` steps (0: no cap), or
        # the step that brings the real (non-padding) tokens trained to `max_tokens` (0: no cap),
        # the tokens training.progress counts in its tokens/s.
        tokens: list[int] = []  # real tokens of every planned step, in order
        for epoch in range(epochs):
            steps = epoch_steps(lengths, epoch_order(self.num_examples, seed, dataset_id, epoch), batching)
            self._epochs.append(steps)
            tokens.extend(step_tokens(step, lengths) for step in steps)
            if (max_steps and len(tokens) >= max_steps) or (max_tokens and sum(tokens) >= max_tokens):
                break
        cumulative = list(itertools.accumulate(tokens))
        self.total_steps = len(tokens)
        if max_steps:
            self.total_steps = min(self.total_steps, max_steps)
        if max_tokens:
            self.total_steps = min(self.total_steps, bisect.bisect_left(cumulative, max_tokens) + 1)
        # The real tokens the run trains once it has finished.
        self.total_tokens = cumulative[self.total_steps - 1] if self.total_steps else 0

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step index within the epoch) of the step that step `step` + 1 trains on."""
        for epoch, steps in enumerate(self._epochs):
            if step < len(steps):
                return epoch, step
            step -= len(steps)
        return len(self._epochs), step

    def step(self, step: int) -> Step:
        """The micro-batches (lists of sequences of example indices) of step `step` + 1."""
        epoch, index = self.position(step)
        return self._epochs[epoch][index]

    def epoch_progress(self, step: int) -> float:
        """Epochs done after `step` steps, fractional (1.5: halfway through the second epoch)."""
        epoch, index = self.position(step)
        if epoch >= len(self._epochs):
            return float(len(self._epochs))
        return epoch + index / len(self._epochs[epoch])


def step_tokens(step: Step, lengths: Sequence[int]) -> int:
    """The real (non-padding) tokens of a step: the lengths of every example it holds."""
    return sum(lengths[i] for micro in step for sequence in micro for i in sequence)
