"""Where a run trains: in this process, or on a Ray cluster (TrainerSettings.backend).

Both run the same `FullFinetuneRecipe`, report through the same `emit`, obey the same gate and
write the same checkpoints; the service does not know which ran.
"""

from __future__ import annotations

from libs.common.artifacts import ArtifactStore
from services.trainer.control import ControlGate
from services.trainer.recipe import Emit, FullFinetuneRecipe, TrainingJob, TrainingResult
from services.trainer.settings import TrainerSettings


def ray_address(settings: TrainerSettings) -> str | None:
    """The Ray cluster to train on, "" for a local one, or None to train in this process.

    `settings.ray_address` is FLYWHEEL_TRAINER_RAY_ADDRESS, else Ray's own RAY_ADDRESS (read by
    the settings loader, libs/common/settings.py).
    """
    if settings.backend == "ray" or (settings.backend == "auto" and settings.ray_address):
        return settings.ray_address
    return None


def train(settings: TrainerSettings, job: TrainingJob, store: ArtifactStore, gate: ControlGate,
          emit: Emit) -> TrainingResult:
    """The whole run, blocking (the service calls it from a worker thread)."""
    address = ray_address(settings)
    if address is not None:
        from services.trainer.ray_backend import RayBackend  # noqa: PLC0415 - ray loads only when used

        return RayBackend(settings, address).run(job, store, gate, emit)
    recipe = FullFinetuneRecipe(settings, job, store, gate, emit)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
