"""How examples become optimizer steps: packed (or padded) sequences, micro-batches under a token
budget, and steps of `grad_accumulation` micro-batches. Pure: lengths in, index lists out.

Packed (the default): each epoch's examples, in the epoch's order, go first-fit into sequences
of at most `pack_length` tokens (an example longer than that gets a sequence of its own); the
sequences then fill micro-batches while the micro-batch, padded to its longest sequence, stays
within `batch_tokens` (at least one sequence each). Inside a sequence every example's position
ids restart at 0, and the model is called without an attention mask and without a KV cache:
transformers then builds a block-diagonal causal mask from the position ids (sdpa, eager) or runs
varlen flash-attention, so no example sees another (tests/services/trainer/test_packing.py checks
that an example's logits inside a pack equal its logits alone).

Why first-fit into short sequences: measured on the tiny model, 2 CPU cores, 2,000 Binary rows
of levels 1-5 (docs/experiments/packing-cpu.md), first-fit into 256-token sequences, three a
step, trained 1.67-1.74x the real tokens/s of padded batches of 8 rows with a 1.4 % lower
held-out loss. Length-grouped batches and token-budget batches of whole rows were faster than
padding too, but each batch then holds nearly one Binary level, and held-out loss was 22-82 %
worse. One 512- or 768-token sequence a step packs perfectly but is slower per token on a CPU:
attention costs grow with the sequence.

First-fit looks at a bounded window of open sequences (`OPEN_SEQUENCES`), so packing stays
linear in the number of examples and a sequence holds examples from nearby in the epoch's order
(the order stays random; a sequence never gathers the short tail of the whole epoch).

Padded (`batching = "padded"`): every sequence is one example and a micro-batch is
`batch_size` of them, as a plain Trainer batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OPEN_SEQUENCES = 64


def pack_first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int,
                   open_limit: int = OPEN_SEQUENCES) -> list[list[int]]:
    """Example indices grouped into sequences of at most `capacity` tokens, first-fit in `order`.

    Each example goes into the first open sequence with room for it; when none has room a new
    sequence opens, and when more than `open_limit` are open the oldest is closed. Sequences come
    out in the order they were opened. An example longer than `capacity` is a sequence alone.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    done: list[tuple[int, list[int]]] = []  # (opening number, indices)
    open_: list[tuple[int, list[int], int]] = []  # (opening number, indices, tokens left)
    opened = 0
    for index in order:
        length = lengths[index]
        for slot, (number, members, left) in enumerate(open_):
            if length <= left:
                members.append(index)
                left -= length
                if left == 0:
                    done.append((number, members))
                    del open_[slot]
                else:
                    open_[slot] = (number, members, left)
                break
        else:
            if length >= capacity:
                done.append((opened, [index]))
            else:
                open_.append((opened, [index], capacity - length))
                if len(open_) > open_limit:
                    number, members, _ = open_.pop(0)
                    done.append((number, members))
            opened += 1
    done.extend((number, members) for number, members, _ in open_)
    return [members for _, members in sorted(done)]


def fill_micro_batches(sequence_lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive sequences grouped while (count x longest) stays within `batch_tokens`.

    Returns lists of positions into `sequence_lengths`; every group holds at least one.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for position, length in enumerate(sequence_lengths):
        widest = max(longest, length)
        if current and (len(current) + 1) * widest > batch_tokens:
            batches.append(current)
            current, widest = [], length
        current.append(position)
        longest = widest
    if current:
        batches.append(current)
    return batches


# A step: its micro-batches; a micro-batch: its sequences; a sequence: example indices.
Step = list[list[list[int]]]


@dataclass(frozen=True)
class Batching:
    """The hyperparameters that shape batches (`Hyperparameters` carries them)."""

    batching: str  # "packed" or "padded"
    batch_tokens: int
    pack_length: int
    batch_size: int
    grad_accumulation: int


def epoch_steps(lengths: Sequence[int], order: Sequence[int], batching: Batching) -> list[Step]:
    """One epoch's optimizer steps over the examples visited in `order`.

    The last step of an epoch may hold fewer micro-batches than `grad_accumulation`; it is not
    merged into the next epoch, so an epoch's steps depend on that epoch's order alone.
    """
    if batching.batching == "packed":
        sequences = pack_first_fit(lengths, order, batching.pack_length)
        sizes = [sum(lengths[i] for i in sequence) for sequence in sequences]
        micro = [[sequences[p] for p in group] for group in fill_micro_batches(sizes, batching.batch_tokens)]
    elif batching.batching == "padded":
        rows = [[index] for index in order]
        micro = [rows[start:start + batching.batch_size] for start in range(0, len(rows), batching.batch_size)]
    else:
        raise ValueError(f"unknown batching {batching.batching!r}: packed or padded")
    k = batching.grad_accumulation
    return [micro[start:start + k] for start in range(0, len(micro), k)]
