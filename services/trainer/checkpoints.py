"""Checkpoints: which run a dataset belongs to, where its checkpoints go, which one is latest.

Layout in the artifact store: `checkpoints/<run_id>/step-<global_step:08d>/` holding the model
and tokenizer in Hugging Face format (`save_pretrained`) and `flywheel.json` (what this checkpoint
is): what serving and scoring need, and all that its announced sha256 covers. Beside it,
`checkpoints/<run_id>/training-state/step-<global_step:08d>.pt` holds what only a resume needs
(optimizer, scheduler, RNG states and data position), written first and named with its sha256
in `flywheel.json`; retention drops it from checkpoints that will never be resumed without
touching the announced hash. Checkpoints of the previous layout hold `training_state.pt` inside
the directory (covered by their hash): they are read the same way and kept whole or not at all.

A checkpoint is built in a hidden staging directory and renamed into place, so a directory
named `step-N` with a `flywheel.json` is always complete. "Latest" is decided by the step number
parsed from the name, never by string order (step-9 < step-10).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch

from libs.common.artifacts import atomic_file, sha256_file

INFO_FILE = "flywheel.json"
# The previous layout's training state, inside the checkpoint directory.
TRAINING_STATE_FILE = "training_state.pt"
TRAINING_STATE_DIR = "training-state"
_STEP_DIR = re.compile(r"^step-(\d+)$")
STAGING_PREFIX = ".staging-"


class CheckpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """flywheel.json: what a checkpoint is, for anyone who finds it on disk."""

    run_id: str
    step: int
    global_step: int
    total_steps: int
    dataset_id: str
    init_weights: str
    final: bool
    loss: float
    # The profile of the dataset trained last (libs.common.profiles): whoever serves or scores
    # these weights applies its system prompt and generation-time rules.
    profile: str = "none"
    # sha256 of the checkpoint's training state file (`training_state_path`); "" in the
    # previous layout (training_state.pt inside) or when it was never written.
    training_state_sha256: str = ""


def run_id_for(dataset_id: str, init_weights: str, recipe_identity: str) -> str:
    """The run that trains `dataset_id` from `init_weights` with these hyperparameters.

    `recipe_identity` is `Hyperparameters.identity(...)`. Stable across redeliveries and
    restarts, so an interrupted run is found and resumed; a change of starting weights or of
    any setting that shapes training is a new run, never a resume that silently mixes two
    configurations.
    """
    identity = msgspec.json.encode({"init_weights": init_weights, "recipe": recipe_identity})
    return f"ds-{dataset_id[:12]}-{hashlib.sha256(identity).hexdigest()[:8]}"


def step_dir_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def parse_step(name: str) -> int | None:
    """The step number in a checkpoint directory name, or None when it is not one."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """A run's complete checkpoints as (step, path), in numeric step order."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        step = parse_step(child.name)
        if step is not None and (child / INFO_FILE).is_file():
            found.append((step, child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint directory is complete once its flywheel.json is in it (written last)."""
    return (checkpoint / INFO_FILE).is_file()


def read_info(checkpoint: Path) -> CheckpointInfo:
    return msgspec.json.decode((checkpoint / INFO_FILE).read_bytes(), type=CheckpointInfo)


class Sealed(msgspec.Struct, frozen=True):
    """A complete checkpoint directory's content hash (`sha256_dir`'s) and size in bytes."""

    sha256: str
    size: int


def write_checkpoint(target: Path, info: CheckpointInfo, fill: Callable[[Path], None]) -> Sealed | None:
    """Build a checkpoint with `fill(staging_dir)`, then rename it to `target`.

    Returns its hash and size, computed once while each file is read back to be fsynced (the
    same hash `libs.common.artifacts.sha256_dir` gives for the directory). Returns None (and
    writes nothing) when `target` is already complete: a checkpoint is keyed by (run, step), and
    saving the same step twice changes nothing.
    """
    if is_complete(target):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{STAGING_PREFIX}{target.name}-"))
    try:
        fill(staging)
        # flywheel.json last: it is what marks the directory complete.
        (staging / INFO_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(info)))
        sealed = _seal(staging)
        if target.exists():  # a stray incomplete directory (no flywheel.json): replace it
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sealed


def remove_staging(run_dir: Path) -> None:
    """Drop half-built checkpoints left by a crash (never complete, never announced)."""
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name.startswith(STAGING_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


def training_state_path(checkpoint: Path) -> Path:
    """Where the training state of the checkpoint at `checkpoint` goes (beside it, not in it)."""
    return checkpoint.parent / TRAINING_STATE_DIR / f"{checkpoint.name}.pt"


def find_training_state(checkpoint: Path) -> Path | None:
    """The checkpoint's training state file, in either layout; None when it has none (dropped)."""
    for path in (training_state_path(checkpoint), checkpoint / TRAINING_STATE_FILE):
        if path.is_file():
            return path
    return None


def save_training_state(checkpoint: Path, state: dict[str, Any]) -> str:
    """Write the training state of the checkpoint at `checkpoint` atomically; its sha256."""
    path = training_state_path(checkpoint)
    with atomic_file(path) as fh:
        torch.save(state, fh)
    return sha256_file(path)


def load_training_state(path: Path) -> dict[str, Any]:
    """A training state file (`find_training_state`)."""
    # weights_only: only tensors and plain containers, no pickled code from disk.
    return torch.load(path, map_location="cpu", weights_only=True)


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run that still has its training state: where it resumes."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if find_training_state(path) is not None:
            return path
    return None


def _seal(directory: Path) -> Sealed:
    """fsync every file (the checkpoint is on disk before anyone is told about it, or the dataset
    acked) and hash it in the same pass, as `sha256_dir` would: no second read of the weights."""
    digest, size = hashlib.sha256(), 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        file_digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                file_digest.update(chunk)
                size += len(chunk)
            os.fsync(fh.fileno())
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_digest.hexdigest()}\n".encode())
    return Sealed(digest.hexdigest(), size)
