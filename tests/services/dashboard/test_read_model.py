"""The dashboard's read model: events folded into panels, joins made whatever order streams replay in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from libs.common.events import (
    ChampionTested,
    CheckpointSaved,
    CurriculumLevelChanged,
    DatasetAccepted,
    DatasetRejected,
    DatasetSubmitted,
    EvalScored,
    LevelScore,
    ModelDeployed,
    ModelServing,
    TrainingFinished,
    TrainingProgress,
    TrainingStarted,
)
from libs.common.history import Recorded
from libs.common.records import Champion, SkillState, TrainerControl
from services.dashboard.read_model import SECTIONS, ReadModel, thin

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SHA = "a" * 64


def rec(event, seq: int = 1, trace: str = "") -> Recorded:
    return Recorded(stream="S", seq=seq, subject="s", stored=event.time, trace_id=trace, event=event)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def submitted(sub="sub1", name="hello", t=0):
    return DatasetSubmitted(id=sub, time=at(t), name=name, rows=[{}], channel="inbox", submitted_by="ann")


def accepted(sub="sub1", dataset="d1", t=1):
    return DatasetAccepted(time=at(t), dataset_id=dataset, name="hello", uri="file:///x", sha256="0" * 64,
                           schema="chat_sft_v1", priority="high", num_rows=10, num_rows_dropped=2,
                           report_uri="file:///r.json", submission_id=sub)


def started(run="r1", dataset="d1", t=2, start_step=0, total=10):
    return TrainingStarted(time=at(t), run_id=run, dataset_id=dataset, init_weights="base", total_steps=total,
                           start_step=start_step, global_step=start_step)


def progress(step, run="r1", t=None, loss=1.0):
    return TrainingProgress(time=at(t if t is not None else 2 + step), run_id=run, dataset_id="d1", step=step,
                            total_steps=10, global_step=step, loss=loss, learning_rate=1e-3, tokens_per_second=500.0,
                            epoch=step / 10, eta_s=12.0, val_loss=loss + 0.1, train_val_gap=0.1)


def scored(sha=SHA, t=20, val_loss=0.5):
    level = LevelScore(correct=8, total=10, accuracy=0.8, low=0.49, high=0.94)
    return EvalScored(time=at(t), run_id="r1", step=10, checkpoint_uri="file:///c", checkpoint_sha256=sha,
                      suite="binary", suite_version="v1", exact_match=0.8, val_loss=val_loss, num_examples=10,
                      exact_match_low=0.49, exact_match_high=0.94, levels={"binary/1": level})


def test_a_dataset_goes_from_submitted_to_trained_with_its_validation_summary_and_trace():
    model = ReadModel()
    model.apply(rec(submitted(), trace="t" * 32))
    assert model.section("datasets")[0]["state"] == "submitted"
    model.apply(rec(accepted()))
    [row] = model.section("datasets")
    assert (row["state"], row["num_rows"], row["num_rows_dropped"], row["priority"]) == ("accepted", 10, 2, "high")
    assert row["trace_id"] == "t" * 32 and row["channel"] == "inbox" and row["submitted_by"] == "ann"
    model.apply(rec(started()))
    assert model.section("datasets")[0]["state"] == "training" and model.section("datasets")[0]["run_id"] == "r1"
    model.apply(rec(TrainingFinished(time=at(9), run_id="r1", dataset_id="d1", global_step=10, final_loss=0.1,
                                     checkpoint_uri="file:///c", duration_s=7.0)))
    assert model.section("datasets")[0]["state"] == "trained"
    assert model.section("runs")[0]["dataset_name"] == "hello" and model.section("training") is None


def test_a_rejected_dataset_keeps_its_reasons():
    model = ReadModel()
    model.apply(rec(submitted()))
    model.apply(rec(DatasetRejected(time=at(1), name="hello", reasons=["row 3: no assistant turn"],
                                    report_uri="file:///r", submission_id="sub1", num_errors=1)))
    [row] = model.section("datasets")
    assert row["state"] == "rejected" and row["reasons"] == ["row 3: no assistant turn"]


def test_training_shows_step_loss_rate_and_the_eta_the_trainer_reported():
    model = ReadModel()
    model.apply(rec(started(t=0)))
    assert model.section("training")["eta_s"] is None
    model.apply(rec(progress(4, t=8)))
    live = model.section("training")
    assert (live["step"], live["total_steps"], live["loss"], live["tokens_per_second"]) == (4, 10, 1.0, 500.0)
    assert (live["eta_s"], live["epoch"], live["val_loss"], live["train_val_gap"]) == (12.0, 0.4, 1.1, 0.1)
    model.apply_record(TrainerControl(mode="paused"), key="trainer")
    assert model.section("training")["state"] == "paused"


def test_val_loss_joins_its_checkpoint_even_when_the_score_is_replayed_first():
    model = ReadModel()
    model.apply(rec(scored()))  # EVALS replays before TRAINING
    assert model.section("loss")["val"] == []
    model.apply(rec(CheckpointSaved(time=at(10), run_id="r1", step=10, global_step=42, dataset_id="d1",
                                    uri="file:///c", sha256=SHA, final=True)))
    assert model.section("loss")["val"] == [{"x": 42, "y": 0.5, "run_id": "r1"}]
    [score] = model.section("scores")
    assert score["global_step"] == 42 and score["levels"]["binary/1"]["low"] == 0.49


def test_promotions_and_level_changes_are_marked_and_the_champion_has_its_trace_and_replicas():
    model = ReadModel()
    deployed = ModelDeployed(time=at(30), checkpoint_uri="file:///c", checkpoint_sha256=SHA, run_id="r1", step=10,
                             exact_match=0.8, val_loss=0.5, reason="sign test p=0.01")
    model.apply(rec(deployed, trace="d" * 32))
    model.apply(rec(ModelServing(deployment_id="x", replica="host-1", ok=True, checkpoint_sha256=SHA)))
    model.apply(rec(CurriculumLevelChanged(time=at(31), skill="binary", previous_level=1, level=2, accuracy=0.85,
                                           reason="3 evaluations at >= 0.8")))
    model.apply_record(Champion(checkpoint_uri="file:///c", checkpoint_sha256=SHA, run_id="r1", step=10,
                                exact_match=0.8, val_loss=0.5, suite_version="v1", deployed_at=at(30),
                                event_id=deployed.id, reason=deployed.reason), key="champion")
    model.apply_record(SkillState(skill="binary", level=2, recent=[0.9]), key="binary")

    assert [m["kind"] for m in model.section("markers")] == ["promotion", "level_change"]
    champion = model.section("champion")
    assert champion["trace_id"] == "d" * 32 and champion["served_by"] == ["host-1"]
    assert champion["reason"] == "sign test p=0.01"
    assert model.section("champions")[0]["reason"] == "sign test p=0.01"
    curriculum = model.section("curriculum")["binary"]
    assert curriculum["level"] == 2 and curriculum["changes"][0]["to"] == 2


def champion_tested(sha=SHA, t=40, version="skills-test-v2-1", right=5):
    level = LevelScore(correct=right, total=10, accuracy=right / 10, low=0.24, high=0.76)
    return ChampionTested(time=at(t), run_id="r1", step=10, checkpoint_uri="file:///c", checkpoint_sha256=sha,
                          suite="skills-test", suite_version=version, exact_match=right / 10, exact_match_low=0.24,
                          exact_match_high=0.76, num_examples=10, val_loss=0.7, levels={"binary/1": level},
                          outcomes="", eval_id="e", selection_suite_version="v1")


def test_the_champions_figures_are_its_sealed_test_and_pending_until_it_is_tested():
    model = ReadModel()
    model.apply(rec(scored(t=20)))  # the selection score that promoted it: 0.8
    deployed = ModelDeployed(time=at(30), checkpoint_uri="file:///c", checkpoint_sha256=SHA, run_id="r1", step=10,
                             exact_match=0.8, val_loss=0.5, reason="first champion")
    model.apply(rec(deployed))
    model.apply_record(Champion(checkpoint_uri="file:///c", checkpoint_sha256=SHA, run_id="r1", step=10,
                                exact_match=0.8, val_loss=0.5, suite_version="v1", deployed_at=at(30),
                                event_id=deployed.id, reason=deployed.reason), key="champion")
    champion = model.section("champion")
    assert champion["test"] is None and "exact_match" not in champion  # pending: no figure at all
    assert model.section("champions")[0]["test"] is None and "exact_match" not in model.section("champions")[0]

    seen = dict(model.versions)
    first = champion_tested()
    assert model.apply(rec(first, trace="e" * 32)) == {"champion", "champions"}
    assert set(model.changed_since(seen)) == {"champion", "champions"}
    test = model.section("champion")["test"]
    assert (test["exact_match"], test["low"], test["high"], test["num_examples"]) == (0.5, 0.24, 0.76, 10)
    assert test["suite_version"] == "skills-test-v2-1" and test["trace_id"] == "e" * 32
    assert test["levels"]["binary/1"] == {"accuracy": 0.5, "low": 0.24, "high": 0.76, "correct": 5, "total": 10}
    assert model.section("champions")[0]["test"] == test
    # The same test re-announced changes nothing; a new test version is the champion's figure from then on.
    assert model.apply(rec(first, seq=2)) == set()
    model.apply(rec(champion_tested(t=60, version="skills-test-v2-2", right=6)))
    assert model.section("champion")["test"]["suite_version"] == "skills-test-v2-2"
    # Another checkpoint's test is not this champion's.
    model.apply(rec(champion_tested(sha="b" * 64, t=70, right=9)))
    assert model.section("champion")["test"]["exact_match"] == 0.6


def test_only_changed_sections_are_sent_again():
    model = ReadModel()
    seen = {name: model.versions[name] for name in model.changed_since({})}
    assert set(seen) == set(SECTIONS)
    model.apply(rec(started()))
    assert set(model.changed_since(seen)) == {"runs", "training", "datasets"}
    assert model.set_queue({"gatekeeper": {"waiting": 1, "in_progress": 0}}) == {"queue"}
    assert model.set_queue({"gatekeeper": {"waiting": 1, "in_progress": 0}}) == set()
    health = {"url": "u", "ok": True, "status": "ready", "detail": ""}
    assert model.set_health("trainer", {**health, "checked": "1"}) == {"services"}
    assert model.set_health("trainer", {**health, "checked": "2"}) == set()  # only the time changed


def test_curves_are_thinned_to_the_limit_keeping_both_ends():
    points = list(range(10_001))
    thinned = thin(points, 2000)
    assert len(thinned) == 2000 and thinned[0] == 0 and thinned[-1] == 10_000
    model = ReadModel(max_points=50)
    for step in range(1, 200):
        model.apply(rec(progress(step)))
    assert len(model.section("loss")["train"]) == 50

