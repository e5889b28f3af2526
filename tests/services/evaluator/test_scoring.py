"""Scoring a real (tiny) checkpoint: finite loss, exact match in [0, 1], batching changes nothing."""

from __future__ import annotations

import math

import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.events import CheckpointSaved
from services.evaluator.scoring import score_checkpoint
from services.evaluator.suite import build_suite

pytestmark = pytest.mark.slow


def test_scores_a_tiny_checkpoint(checkpoint: CheckpointSaved, tmp_path):
    path = ArtifactStore(tmp_path / "data" / "artifacts").verify(checkpoint.uri, checkpoint.sha256)
    suite = build_suite(2, 4, seed=11)
    batched = score_checkpoint(path, suite.items, device="cpu", batch_size=8, max_new_tokens=12, max_length=256)
    single = score_checkpoint(path, suite.items, device="cpu", batch_size=1, max_new_tokens=12, max_length=256)
    assert math.isfinite(batched.val_loss) and batched.val_loss > 0
    assert 0.0 <= batched.exact_match <= 1.0
    assert set(batched.by_level) == {"binary/1", "binary/2"}
    assert batched.num_examples == len(batched.items) == 8
    # Left padding and per-token loss: the batch size must not change any result.
    assert [i.output for i in batched.items] == [i.output for i in single.items]
    assert batched.val_loss == pytest.approx(single.val_loss, rel=1e-4)
