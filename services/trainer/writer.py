"""Checkpoint writes off the training thread: snapshot at the step, write while training goes on.

`snapshot(...)` copies what a checkpoint holds (weights, optimizer and scheduler state, RNG
states) to CPU memory at the step it belongs to, so training can change the live tensors at
once; the `CheckpointWriter` then writes, fsyncs, hashes and announces it on its own thread.
One write at a time: a second save waits for the first (memory for one snapshot, and
checkpoints are announced in step order). A crash mid-write leaves a staging directory that is
never announced and is removed on the next start (`checkpoints.remove_staging`).

Measured on the tiny model (2 CPU cores, tests/services/trainer/test_recipe.py): the copy holds
the training thread 3-5 ms where the write, fsync and hash take 50-250 ms (the recipe logs both:
`checkpoint snapshot taken` with `blocked_ms`, `checkpoint saved` with `write_s`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def cpu_copy(value):
    """A deep copy of tensors (in dicts, lists, tuples) in CPU memory, sharing as the source shared.

    Tied weights (embeddings and LM head) stay one tensor, as `save_pretrained` expects.
    """
    copies: dict[tuple, torch.Tensor] = {}

    def walk(item):
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.storage_offset(), tuple(item.shape), item.stride())
            if key not in copies:
                copies[key] = item.detach().to("cpu", copy=True)
            return copies[key]
        if isinstance(item, dict):
            return {name: walk(v) for name, v in item.items()}
        if isinstance(item, list):
            return [walk(v) for v in item]
        if isinstance(item, tuple):
            return tuple(walk(v) for v in item)
        return copy.deepcopy(item)

    return walk(value)


class CheckpointWriter:
    """Runs checkpoint writes one at a time on a thread of its own; errors surface on `wait`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], object]) -> None:
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self):
        """Block until the write in flight is done; re-raise its error; return its result."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
