"""A tiny-model checkpoint in a temporary artifact store, as the trainer would announce it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.events import CheckpointSaved


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_model_dir: Path) -> CheckpointSaved:
    store = ArtifactStore(tmp_path / "data" / "artifacts")
    target = store.location("checkpoints", "run-1", "step-4")
    shutil.copytree(tiny_model_dir, target)
    artifact = store.describe_dir(target)
    return CheckpointSaved(
        run_id="run-1", step=4, global_step=4, dataset_id="d" * 64,
        uri=artifact.uri, sha256=artifact.sha256, final=True,
    )
