"""Slow: the recipe on a local Ray cluster, 2 CPU workers (Ray Train TorchTrainer, gloo), against
the same run in one process: the same loss curve step by step, and the same checkpoints."""

from __future__ import annotations

import pytest

from libs.common.settings import load_settings
from services.trainer.backend import ray_address
from services.trainer.control import ControlGate
from services.trainer.ray_backend import RayBackend
from services.trainer.settings import TrainerSettings
from tests.services.trainer.samples import chat_rows
from tests.services.trainer.test_recipe import job_for, run_recipe

pytestmark = pytest.mark.slow

# float32 gradients summed over two workers instead of one batch: the same sums in another order.
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_settings_choose_ray_by_backend_or_ray_address():
    def settings(**environ):
        return load_settings(TrainerSettings, "trainer", environ=environ)

    assert ray_address(settings()) is None
    assert ray_address(settings(RAY_ADDRESS="ray://head:10001")) == "ray://head:10001"
    assert ray_address(settings(FLYWHEEL_TRAINER_BACKEND="ray")) == ""  # a local Ray cluster
    assert ray_address(settings(FLYWHEEL_TRAINER_BACKEND="local", RAY_ADDRESS="ray://head:10001")) is None
    # Flywheel's own variable wins over Ray's.
    assert ray_address(settings(RAY_ADDRESS="a:1", FLYWHEEL_TRAINER_RAY_ADDRESS="b:2")) == "b:2"


def test_two_ray_workers_follow_one_process_loss_curve(make_settings, tmp_path, ray_cluster):
    rows = chat_rows(24, seed=4)
    overrides = dict(epochs=2, progress_every_steps=1, batching="packed", pack_length=128, batch_tokens=256,
                     save_every_steps=3)
    local_settings = make_settings(data_dir=tmp_path / "local", **overrides)
    local, local_events = run_recipe(local_settings, *job_for(local_settings, rows))

    settings = make_settings(data_dir=tmp_path / "ray", backend="ray", ray_workers=2, **overrides)
    job, store = job_for(settings, rows)
    events = []
    result = RayBackend(settings, "").run(job, store, ControlGate(), lambda subject, event: events.append((subject, event)))

    assert result.finished and result.step == local.step > 3
    local_curve = [(e.step, e.loss) for s, e in local_events if s == "training.progress"]
    ray_curve = [(e.step, e.loss) for s, e in events if s == "training.progress"]
    assert [step for step, _ in ray_curve] == [step for step, _ in local_curve]
    for (step, a), (_, b) in zip(local_curve, ray_curve, strict=True):
        assert b == pytest.approx(a, rel=LOSS_TOLERANCE), (step, a, b)
    saved = [(e.step, e.final) for s, e in events if s == "checkpoint.saved"]
    assert saved == [(e.step, e.final) for s, e in local_events if s == "checkpoint.saved"]
    assert [s for s, _ in events][0] == "training.started" and result.checkpoint.uri.startswith("file://")
