"""Slow: real training steps on the tiny model (no bus): the loss falls; resume is exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from libs.common.artifacts import ArtifactStore
from libs.common.chat import ChatMessage, ChatRow
from libs.common.models import load_tokenizer
from services.trainer.checkpoints import (
    TRAINING_STATE_FILE,
    list_checkpoints,
    read_info,
)
from services.trainer.control import ControlGate
from services.trainer.data import DatasetError, tokenize
from services.trainer.recipe import FullFinetuneRecipe, TrainingJob
from tests.services.trainer.samples import chat_rows, write_dataset

pytestmark = pytest.mark.slow


class StopBeforeStep(ControlGate):
    """A stop command that lands after `steps` steps."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.calls = steps, 0

    def proceed(self) -> bool:
        self.calls += 1
        return self.calls <= self.steps


def job_for(settings, rows, *, run_id: str = "ds-test") -> tuple[TrainingJob, ArtifactStore]:
    store = ArtifactStore(Path(settings.data_dir) / "artifacts")
    event = write_dataset(settings.data_dir, rows)
    job = TrainingJob(
        run_id=run_id, dataset_id=event.dataset_id, dataset_path=store.path_for(event.uri),
        init_weights="file:///base", init_path=Path(settings.base_model),
        run_dir=store.location("checkpoints", run_id), base_global_step=100,
    )
    return job, store


def run_recipe(settings, job, store, gate=None):
    emitted = []
    gate = gate or ControlGate()
    recipe = FullFinetuneRecipe(settings, job, store, gate, lambda *published: emitted.append(published))
    recipe.setup()
    try:
        return recipe.train(), emitted
    finally:
        recipe.cleanup()


def weights(checkpoint_uri: str, store: ArtifactStore) -> dict[str, torch.Tensor]:
    return load_file(store.path_for(checkpoint_uri) / "model.safetensors")


def test_training_reduces_the_loss_and_writes_hf_checkpoints(make_settings):
    # 2e-3: the run's cosine decay (to 10 % by step 24) leaves 1e-3 short of the 40 % drop asked.
    settings = make_settings(epochs=3, progress_every_steps=1, save_every_steps=10, learning_rate=2e-3)
    job, store = job_for(settings, chat_rows(32))
    result, emitted = run_recipe(settings, job, store)
    losses = [e.loss for s, e in emitted if s == "training.progress"]
    assert result.finished and result.step == 24 and result.global_step == 124
    assert len(losses) == 24
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    saved = [e for s, e in emitted if s == "checkpoint.saved"]
    assert [(e.step, e.global_step, e.final) for e in saved] == [(10, 110, False), (20, 120, False), (24, 124, True)]
    assert [step for step, _ in list_checkpoints(job.run_dir)] == [110, 120, 124]
    final = store.path_for(result.checkpoint.uri)
    assert saved[-1].sha256 == result.checkpoint.sha256 == store.describe_dir(final).sha256
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", TRAINING_STATE_FILE):
        assert (final / name).is_file(), name
    info = read_info(final)
    assert (info.run_id, info.step, info.global_step, info.final) == ("ds-test", 24, 124, True)
    assert info.dataset_id == job.dataset_id and info.init_weights == "file:///base"
    started = emitted[0][1]
    assert emitted[0][0] == "training.started" and (started.total_steps, started.start_step) == (24, 0)


@pytest.mark.parametrize("stop_after", [2, 3])  # mid-epoch, and exactly at the epoch boundary
def test_interrupted_and_resumed_run_ends_with_the_same_weights(make_settings, tmp_path, stop_after):
    rows = chat_rows(12, seed=3)  # 3 batches per epoch, 2 epochs: 6 steps
    straight_settings = make_settings(epochs=2, data_dir=tmp_path / "straight")
    straight, _ = run_recipe(straight_settings, *job_for(straight_settings, rows))

    settings = make_settings(epochs=2, data_dir=tmp_path / "resumed")
    job, store = job_for(settings, rows)
    stopped, emitted = run_recipe(settings, job, store, StopBeforeStep(stop_after))
    assert not stopped.finished and stopped.step == stop_after
    assert [(e.step, e.final) for s, e in emitted if s == "checkpoint.saved"] == [(stop_after, False)]
    resumed, emitted = run_recipe(settings, job, store)
    assert emitted[0][1].start_step == stop_after
    assert resumed.finished and resumed.step == straight.step == 6

    a = weights(straight.checkpoint.uri, ArtifactStore(tmp_path / "straight" / "artifacts"))
    b = weights(resumed.checkpoint.uri, store)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.loss == straight.loss


def test_a_run_resumed_at_its_final_checkpoint_only_reannounces_it(make_settings):
    settings = make_settings()
    job, store = job_for(settings, chat_rows(8))
    first, _ = run_recipe(settings, job, store)
    again, emitted = run_recipe(settings, job, store)
    assert again.finished and again.checkpoint == first.checkpoint
    saved = [e for s, e in emitted if s == "checkpoint.saved"]
    assert len(saved) == 1 and saved[0].final and not [s for s, _ in emitted if s == "training.progress"]


def test_continual_policy_carries_adamw_on_and_replays_earlier_rows(make_settings):
    settings = make_settings(epochs=1, replay_fraction=0.5)
    first_job, store = job_for(settings, chat_rows(16, seed=1), run_id="ds-first")
    first, _ = run_recipe(settings, first_job, store)
    assert first.finished and first.step == 4

    second_rows = chat_rows(8, seed=2)
    job, store = job_for(settings, second_rows, run_id="ds-second")
    job = dataclasses.replace(job, init_path=store.path_for(first.checkpoint.uri), base_global_step=first.global_step,
                              replay_paths=(first_job.dataset_path,))
    recipe = FullFinetuneRecipe(settings, job, store, ControlGate(), lambda *_: None)
    recipe.setup()
    try:
        # Half of the run is earlier rows: 8 new + 8 replayed.
        assert recipe._plan.num_examples == 16 and recipe._num_replayed == 8
        # AdamW goes on from the first run's 4 steps instead of starting from zero moments.
        steps = {int(s["step"]) for s in recipe._optimizer.state_dict()["state"].values()}
        assert steps == {4}
        assert recipe._scheduler.get_last_lr()[0] == pytest.approx(settings.hyperparameters.learning_rate)
    finally:
        recipe.cleanup()

    per_dataset = make_settings(epochs=1, policy="per_dataset")
    recipe = FullFinetuneRecipe(per_dataset, job, store, ControlGate(), lambda *_: None)
    recipe.setup()
    try:
        assert not recipe._optimizer.state_dict()["state"]  # a fresh AdamW
    finally:
        recipe.cleanup()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_fp32_weights_under_bf16_autocast(make_settings):
    settings = make_settings(device="cuda", epochs=3, progress_every_steps=1)
    job, store = job_for(settings, chat_rows(32))
    result, emitted = run_recipe(settings, job, store)
    losses = [e.loss for s, e in emitted if s == "training.progress"]
    assert result.finished and losses[-1] < losses[0]
    assert all(t.dtype == torch.float32 for t in weights(result.checkpoint.uri, store).values())


def test_rows_without_assistant_tokens_are_dropped(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    good = [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")]
    long_prompt = [ChatMessage("user", "word " * 200), ChatMessage("assistant", "hello")]
    assert len(tokenize([ChatRow(good), ChatRow(long_prompt)], tokenizer, max_length=32)) == 1
    with pytest.raises(DatasetError, match="none of 1 rows"):
        tokenize([ChatRow(long_prompt)], tokenizer, max_length=32)
