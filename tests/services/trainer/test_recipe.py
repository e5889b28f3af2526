"""Slow: real training steps on the tiny model (no bus): the loss falls; resume is exact."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from libs.common.artifacts import ArtifactStore, sha256_file
from libs.common.chat import IGNORE_INDEX, ChatMessage, ChatRow
from libs.common.models import load_tokenizer
from services.gatekeeper.schemas import SCHEMAS
from services.gatekeeper.verdict import announcement
from services.trainer.checkpoints import (
    TRAINING_STATE_FILE,
    find_training_state,
    list_checkpoints,
    read_info,
    training_state_path,
)
from services.trainer.control import ControlGate
from services.trainer.data import DatasetError, TrainingPlan, encode_rows
from services.trainer.recipe import FullFinetuneRecipe, TrainingJob
from tests.services.gatekeeper.samples import make_gatekeeper, submission
from tests.services.gatekeeper.test_tokens import LAST_TURN_DIFFERS, STRICT
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
    settings = make_settings(epochs=3, progress_every_steps=1, save_every_steps=10, learning_rate=2e-3,
                             validation_min_rows=1000)
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
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    # The resume-only state lies beside the checkpoint, out of its announced hash, named in flywheel.json.
    info = read_info(final)
    assert not (final / TRAINING_STATE_FILE).exists() and find_training_state(final) == training_state_path(final)
    assert info.training_state_sha256 == sha256_file(training_state_path(final))
    assert (info.run_id, info.step, info.global_step, info.final) == ("ds-test", 24, 124, True)
    assert info.dataset_id == job.dataset_id and info.init_weights == "file:///base"
    started = emitted[0][1]
    assert emitted[0][0] == "training.started" and (started.total_steps, started.start_step) == (24, 0)


def test_a_token_budget_ends_the_run_annealed_at_the_step_that_reaches_it(make_settings):
    rows = chat_rows(16, seed=4)
    settings = make_settings(epochs=50, max_tokens=1500, progress_every_steps=1, validation_min_rows=1000)
    job, store = job_for(settings, rows)
    result, emitted = run_recipe(settings, job, store)
    # The steps the budget implies, from the examples' real tokens (padded batches of 4 rows).
    h = settings.hyperparameters
    encoded = encode_rows(msgspec.convert(rows, list[ChatRow]), load_tokenizer(Path(settings.base_model)),
                          settings.max_length)
    lengths = [len(e.input_ids) for e in encoded.examples]
    plan = TrainingPlan(lengths, h.batching_plan(), h.epochs, h.max_steps, h.seed, job.dataset_id, max_tokens=1500)
    assert 2 < plan.total_tokens / sum(lengths) < 3  # well short of 50 epochs
    started = emitted[0][1]
    assert started.total_steps == plan.total_steps == result.step and result.finished
    # The cosine schedule was planned over those steps: the last step trained near the floor.
    progress = [e for s, e in emitted if s == "training.progress"]
    assert progress[-1].step == plan.total_steps
    assert progress[-1].learning_rate < 0.15 * h.learning_rate < progress[0].learning_rate
    assert [e.final for s, e in emitted if s == "checkpoint.saved"][-1]


BATCHINGS = {
    # 12 rows, 3 batches of 4 an epoch, 2 epochs: 6 steps.
    "padded": dict(batching="padded"),
    # ~60-token rows packed 2 to a 128-token sequence, 2 sequences a micro-batch, 2 micro-batches
    # a step (gradient accumulation): 2 steps an epoch.
    "packed": dict(batching="packed", pack_length=128, batch_tokens=256, grad_accumulation=2),
}


@pytest.mark.parametrize("batching", list(BATCHINGS))
@pytest.mark.parametrize("stop_after", [1, 2])  # mid-epoch, and exactly at an epoch boundary when packed
def test_interrupted_and_resumed_run_ends_with_the_same_weights(make_settings, tmp_path, stop_after, batching):
    rows = chat_rows(12, seed=3)
    straight_settings = make_settings(epochs=2, data_dir=tmp_path / "straight", progress_every_steps=1,
                                      **BATCHINGS[batching])
    straight, straight_emitted = run_recipe(straight_settings, *job_for(straight_settings, rows))

    settings = make_settings(epochs=2, data_dir=tmp_path / "resumed", progress_every_steps=1, **BATCHINGS[batching])
    job, store = job_for(settings, rows)
    stopped, emitted = run_recipe(settings, job, store, StopBeforeStep(stop_after))
    assert not stopped.finished and stopped.step == stop_after
    assert [(e.step, e.final) for s, e in emitted if s == "checkpoint.saved"] == [(stop_after, False)]
    resumed, emitted = run_recipe(settings, job, store)
    assert emitted[0][1].start_step == stop_after
    assert resumed.finished and resumed.step == straight.step > stop_after
    # Step by step, the resumed run's losses are the uninterrupted run's.
    straight_losses = {e.step: e.loss for s, e in straight_emitted if s == "training.progress"}
    resumed_losses = {e.step: e.loss for s, e in emitted if s == "training.progress"}
    assert resumed_losses == {step: loss for step, loss in straight_losses.items() if step > stop_after}

    a = weights(straight.checkpoint.uri, ArtifactStore(tmp_path / "straight" / "artifacts"))
    b = weights(resumed.checkpoint.uri, store)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.loss == straight.loss


def test_a_checkpoint_of_the_previous_layout_still_verifies_resumes_and_carries_adamw(make_settings, tmp_path):
    # Before the training state moved beside the checkpoint, training_state.pt lay inside it and
    # its announced hash covered it: such a checkpoint must verify, resume and hand its moments on.
    rows = chat_rows(12, seed=3)
    straight_settings = make_settings(epochs=2, data_dir=tmp_path / "straight")
    straight, _ = run_recipe(straight_settings, *job_for(straight_settings, rows))
    settings = make_settings(epochs=2, data_dir=tmp_path / "old")
    job, store = job_for(settings, rows)
    stopped, _ = run_recipe(settings, job, store, StopBeforeStep(2))
    checkpoint = store.path_for(stopped.checkpoint.uri)
    training_state_path(checkpoint).rename(checkpoint / TRAINING_STATE_FILE)  # the old layout
    old = store.describe_dir(checkpoint)
    assert store.verify(old.uri, old.sha256) == checkpoint and find_training_state(checkpoint) == checkpoint / TRAINING_STATE_FILE

    resumed, emitted = run_recipe(settings, job, store)
    assert emitted[0][1].start_step == 2 and resumed.finished
    a, b = weights(straight.checkpoint.uri, ArtifactStore(tmp_path / "straight" / "artifacts")), weights(resumed.checkpoint.uri, store)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert store.verify(old.uri, old.sha256)  # untouched by the resume

    # Its moments carry on into the next run (continual policy), read from inside it.
    next_job, _ = job_for(settings, chat_rows(8, seed=4), run_id="ds-next")
    next_job = dataclasses.replace(next_job, init_path=checkpoint)
    recipe = FullFinetuneRecipe(settings, next_job, store, ControlGate(), lambda *_: None)
    recipe.setup()
    try:
        assert {int(s["step"]) for s in recipe._optimizer.state_dict()["state"].values()} == {2}
    finally:
        recipe.cleanup()


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


# ---------------------------------------------------------------------------- every accepted schema trains


def rows_of(schema: str, n: int) -> list[dict]:
    """Rows of `schema` the gatekeeper accepts: the Binary conversations in its shape."""
    chats = chat_rows(n, seed=5)
    if schema == "chat_sft_v1":
        return [{"messages": row["messages"], "profile": "binary"} for row in chats]
    if schema == "syllo_v1":
        return [{"messages": row["messages"], "puzzle": {"syllables": ["ba", "na"], "answers": ["bana"]}}
                for row in chats]
    if schema == "completion_v1":
        return [{"text": f"{row['messages'][0]['content']}\n{row['messages'][1]['content']}"} for row in chats]
    raise AssertionError(f"no sample rows for schema {schema}: add them so every accepted schema is tested")


def accepted_job(settings, schema: str, rows: list[dict], *, run_id: str = "ds-schema"):
    """`rows` through the gatekeeper (into the trainer's artifact store) and the job its dataset.accepted makes."""
    gatekeeper = make_gatekeeper(Path(settings.data_dir))
    report = gatekeeper.submit_rows(submission(f"sub-{schema}", schema=schema), rows)
    assert report.status == "accepted", report.reasons
    _, event = announcement(report)
    store = gatekeeper.store
    job = TrainingJob(
        run_id=run_id, dataset_id=event.dataset_id, dataset_path=store.path_for(event.uri),
        init_weights="file:///base", init_path=Path(settings.base_model),
        run_dir=store.location("checkpoints", run_id), base_global_step=0, schema=event.schema,
    )
    return job, store


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_every_schema_the_gatekeeper_accepts_trains(make_settings, schema):
    # completion_v1 failed here before: "not a chat row: Object missing required field `messages`".
    settings = make_settings()
    job, store = accepted_job(settings, schema, rows_of(schema, 8))
    recipe = FullFinetuneRecipe(settings, job, store, ControlGate(), lambda *_: None)
    recipe.setup()
    try:
        examples = recipe.examples(list(range(recipe._plan.num_examples)))
        assert len(examples) == 8 and all(e.num_trained_tokens for e in examples)
        if SCHEMAS[schema].kind == "text":  # loss on the whole text (and its EOS), all but the first token
            assert all(e.labels == [IGNORE_INDEX, *e.input_ids[1:]] for e in examples)
            assert all(e.input_ids[-1] == recipe._tokenizer.eos_token_id for e in examples)
        else:  # loss on the assistant's answer only: the prompt is masked
            assert all(e.num_trained_tokens < len(e.input_ids) // 2 for e in examples)
        result = recipe.train()
    finally:
        recipe.cleanup()
    assert result.finished and result.step == 2 and math.isfinite(result.loss) and result.loss > 0


def test_a_completion_dataset_is_learned(make_settings):
    settings = make_settings(epochs=3, progress_every_steps=1, learning_rate=2e-3)
    job, store = accepted_job(settings, "completion_v1", rows_of("completion_v1", 24))
    result, emitted = run_recipe(settings, job, store)
    losses = [e.loss for s, e in emitted if s == "training.progress"]
    assert result.finished and len(losses) == 18
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


# ---------------------------------------------------------------------------- rows that cannot train


def test_rows_that_cannot_train_are_dropped_with_their_reasons_and_reported(make_settings):
    settings = make_settings(max_length=48)
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    rows = chat_rows(6) + [no_answer, long_prompt, long_prompt]
    result, emitted = run_recipe(settings, *job_for(settings, rows))
    started = emitted[0][1]
    assert result.finished and (started.num_examples, started.num_rows_dropped) == (6, 3)
    assert started.dropped_reasons == [
        "2 rows (8, 9): no assistant token within max_length=48: truncation cuts every answer away",
        "1 row (7): no assistant turn: nothing to train on",
    ]


def test_a_dataset_whose_every_row_is_dropped_fails_even_with_rows_to_replay(make_settings):
    settings = make_settings(max_length=48, replay_fraction=0.5)
    earlier, store = job_for(settings, chat_rows(8), run_id="ds-earlier")
    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    job, _ = job_for(settings, [long_prompt] * 3)
    job = dataclasses.replace(job, replay_paths=(earlier.dataset_path,))
    recipe = FullFinetuneRecipe(settings, job, store, ControlGate(), lambda *_: None)
    try:
        with pytest.raises(DatasetError, match=r"none of 3 rows can be trained on: 3 rows \(1, 2, 3\): no assistant "
                                                r"token within max_length=48"):
            recipe.setup()
    finally:
        recipe.cleanup()


def test_rows_without_assistant_tokens_are_dropped(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    good = [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")]
    long_prompt = [ChatMessage("user", "word " * 200), ChatMessage("assistant", "hello")]
    assert len(encode_rows([ChatRow(good), ChatRow(long_prompt)], tokenizer, max_length=32).examples) == 1
    with pytest.raises(DatasetError, match="none of 1 rows"):
        encode_rows([ChatRow(long_prompt)], tokenizer, max_length=32)


@pytest.mark.parametrize(("template", "reason"), [
    (STRICT, "the chat template refused the conversation: TemplateError: roles must alternate user/assistant"),
    (LAST_TURN_DIFFERS, "chat template: chat template is not prefix-stable at turn 1; cannot mask assistant tokens"),
])
def test_a_row_the_template_fails_is_dropped_not_the_dataset(tiny_model_dir, template, reason):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = template
    good = ChatRow([ChatMessage("user", "hi"), ChatMessage("assistant", "hello")])
    bad = ChatRow([ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("assistant", "c")])
    encoded = encode_rows([good, bad, good], tokenizer, max_length=64)
    assert len(encoded.examples) == 2 and encoded.summary() == [f"1 row (2): {reason}"]


# ---------------------------------------------------------------------------- profiles


def test_a_datasets_profile_transforms_its_rows_before_tokenizing_and_is_on_its_checkpoints(make_settings):
    settings = make_settings(max_length=512)  # emoji_think's system prompt alone is ~100 tokens
    job, store = job_for(settings, chat_rows(8))
    job = dataclasses.replace(job, profile="emoji_think")
    emitted = []
    recipe = FullFinetuneRecipe(settings, job, store, ControlGate(), lambda *published: emitted.append(published))
    recipe.setup()
    try:
        texts = [recipe._tokenizer.decode(e.input_ids) for e in recipe.examples(list(range(8)))]
        result = recipe.train()
    finally:
        recipe.cleanup()
    # emoji_think: a system prompt on every row, a thinking prefix on half of them (by index).
    assert all("system" in text for text in texts)
    assert sum(any(emoji in text for emoji in "🤔💭🧠💡🎯🔍🤨🧐⚡✨") for text in texts) == 4
    saved = [e for s, e in emitted if s == "checkpoint.saved"]
    assert saved[-1].profile == "emoji_think" and read_info(store.path_for(result.checkpoint.uri)).profile == "emoji_think"
