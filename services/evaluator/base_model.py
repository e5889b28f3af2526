"""The base model as a checkpoint: the first champion, so every trained candidate must beat it.

While no champion has been deployed, the evaluator scores the base model (`ensure_base_model`:
FLYWHEEL_BASE_MODEL, or the embedded tiny model) once on the suite and publishes that as an
`eval.scored` with run_id "base", step 0; the deployer promotes the first score it gets when
there is no champion. For its score to name something every service can load and verify, the
base model is registered in the artifact store like a checkpoint: copied (once) to
`artifacts/models/base/<sha256>/`, where `sha256` is the store's directory hash of its files,
so its URI and sha256 pass `ArtifactStore.verify` (inference loads a champion that way).
The copy is content-addressed, so registering again, or from another replica, finds it there.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from libs.common.artifacts import Artifact, ArtifactError, ArtifactStore, sha256_dir

BASE_RUN_ID = "base"
BASE_STEP = 0


def register_base_model(store: ArtifactStore, source: Path) -> Artifact:
    """The base model at `source` as an artifact of `store` (copied there on first use)."""
    sha256 = sha256_dir(source)
    target = store.location("models", "base", sha256)
    if not target.exists():
        # Copied aside and renamed into place: a reader never sees half a model.
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".part-"))
        try:
            shutil.copytree(source, staging / "model")
            if sha256_dir(staging / "model") != sha256:
                raise ArtifactError(f"base model {source} changed while it was copied into the store")
            try:
                (staging / "model").rename(target)
            except OSError:
                if not target.exists():  # else another replica registered it first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        store.verify(store.uri_for(target), sha256)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return Artifact(uri=store.uri_for(target), sha256=sha256, size=size)
