"""The base model registered in the artifact store: copied once, content-addressed, verifiable."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.artifacts import ArtifactError, ArtifactStore, sha256_dir
from services.evaluator.base_model import register_base_model


@pytest.fixture
def base(tmp_path: Path) -> Path:
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_the_base_model_is_copied_into_the_store_once_and_verifies(base: Path, tmp_path: Path):
    store = ArtifactStore(tmp_path / "artifacts")
    artifact = register_base_model(store, base)
    assert artifact.sha256 == sha256_dir(base) and artifact.size == len('{"model_type": "qwen3"}') + len(b"weights")
    path = store.verify(artifact.uri, artifact.sha256)
    assert path == store.root / "models" / "base" / artifact.sha256
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert register_base_model(store, base) == artifact
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # found, not copied again
    assert [p.name for p in path.parent.iterdir()] == [artifact.sha256]  # no staging left behind


def test_a_changed_copy_in_the_store_is_refused(base: Path, tmp_path: Path):
    store = ArtifactStore(tmp_path / "artifacts")
    artifact = register_base_model(store, base)
    (store.path_for(artifact.uri) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match"):
        register_base_model(store, base)
