"""Fixtures for the trainer tests: a data directory and fast settings for the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.settings import load_settings
from services.trainer.settings import TrainerSettings


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def make_settings(data_dir: Path, tiny_model_dir: Path):
    """Trainer settings for the tiny model, small and fast; keyword overrides win.

    Batches are padded rows (batch_size 4) unless a test asks for `batching="packed"`, the
    production default: most tests count steps in rows; the packed path has tests of its own
    (test_packing.py) and the resume and learning tests run both.
    """

    def build(**overrides) -> TrainerSettings:
        values = dict(
            data_dir=data_dir, base_model=str(tiny_model_dir), nats_url="nats://unused:4222",
            batching="padded", batch_size=4, max_length=128, warmup_steps=2, epochs=1, save_every_steps=50,
            progress_every_steps=2, device="cpu",
        )
        values.update(overrides)
        # Through the loader, as the service reads them: hyperparameters are named flat.
        return load_settings(TrainerSettings, "trainer", environ={}, **values)

    return build
