"""Unit: which checkpoints retention keeps whole, keeps without training state, or deletes."""

from __future__ import annotations

from services.trainer.retention import Protection, StoredCheckpoint, decide, orphaned_states


def ckpt(run: str, step: int, **fields) -> StoredCheckpoint:
    return StoredCheckpoint(run_id=run, step=step, uri=f"file:///c/{run}/step-{step:08d}", **fields)


def plan_of(checkpoints, protection=None, keep_last=2, keep_best=1, keep_runs=2):
    plan = decide(checkpoints, protection or Protection(), keep_last=keep_last, keep_best=keep_best, keep_runs=keep_runs)
    return ({c.uri.rsplit("/", 2)[1] + f"@{c.step}" for c in plan.keep},
            {c.uri.rsplit("/", 2)[1] + f"@{c.step}" for c in plan.drop_state},
            {c.uri.rsplit("/", 2)[1] + f"@{c.step}" for c in plan.delete})


def test_a_run_keeps_its_newest_checkpoints_by_step_number_and_only_what_is_resumed_stays_whole():
    run = [ckpt("a", s) for s in (9, 10, 100, 50)]
    keep, slim, delete = plan_of(run, Protection(resume=frozenset({run[2].uri})))
    assert keep == {"a@100"} and slim == {"a@50"} and delete == {"a@9", "a@10"}


def test_champion_rollback_targets_and_the_best_scored_survive_old_runs():
    old = [ckpt("old", s) for s in (10, 20)]
    older = [ckpt("older", s) for s in (1, 2)]
    new = [ckpt("new", 40), ckpt("newer", 50), ckpt("newest", 60)]
    protection = Protection(resume=frozenset({new[-1].uri}), served=frozenset({older[0].uri}),
                            scores={old[1].uri: 0.9, new[0].uri: 0.5, older[1].uri: 0.1})
    keep, slim, delete = plan_of(old + older + new, protection, keep_runs=2, keep_best=1)
    assert keep == {"newest@60"}
    assert slim == {"newer@50", "old@20", "older@1"}  # newest two runs; best score; champion history
    assert delete == {"old@10", "older@2", "new@40"}


def test_checkpoints_of_the_previous_layout_are_kept_whole_or_deleted_whole():
    inside = ckpt("a", 5, separable=False)
    dropped = ckpt("a", 6, has_training_state=False)
    keep, slim, delete = plan_of([ckpt("a", 1), inside, dropped], keep_last=2)
    assert keep == {"a@5", "a@6"} and not slim and delete == {"a@1"}


def test_keep_runs_zero_keeps_the_newest_of_every_run():
    runs = [ckpt(r, s) for r, s in (("a", 1), ("b", 2), ("c", 3))]
    keep, slim, delete = plan_of(runs, keep_last=1, keep_runs=0, keep_best=0)
    assert slim == {"a@1", "b@2", "c@3"} and not delete


def test_orphaned_training_states_of_a_run_in_progress_spare_one_being_written():
    assert orphaned_states([5, 10, 15], [10], in_progress=True) == [5]
    assert orphaned_states([5, 10, 15], [10], in_progress=False) == [5, 15]
    assert orphaned_states([5], [], in_progress=False) == [5]
    assert orphaned_states([5], [], in_progress=True) == []


def test_a_final_checkpoint_not_yet_scored_is_kept_past_the_newest_runs():
    # Found by tests/faults: the evaluator, killed while the trainer went through more runs than
    # keep_runs, found the final checkpoints it had still to score deleted.
    runs = [[ckpt(f"run-{r}", 10 * r + s, final=s == 2) for s in range(3)] for r in range(4)]
    checkpoints = [c for run in runs for c in run]
    scored_final = runs[1][2]
    protection = Protection(scores={scored_final.uri: 0.5}, scored=frozenset({scored_final.uri}))
    keep, slim, delete = plan_of(checkpoints, protection, keep_last=1, keep_best=0, keep_runs=1)
    # The newest run keeps its newest; every older run's unscored final stays for the evaluator;
    # the scored one (not among the best 0) goes.
    assert keep | slim == {"run-3@32", "run-0@2", "run-2@22"}
    assert "run-1@12" in delete


def test_checkpoints_are_named_as_the_store_names_them_so_a_shared_champion_is_recognised(tmp_path):
    # Without a shared disk the champion record and the scores name checkpoints nats-obj://...;
    # retention listing them as file:// URIs would have protected none of them.
    import msgspec

    from libs.common.artifacts import ArtifactStore
    from services.trainer.checkpoints import INFO_FILE, CheckpointInfo
    from services.trainer.prune import scan

    store = ArtifactStore(tmp_path / "artifacts", transport="nats")
    step = store.location("checkpoints", "run-a", "step-00000007")
    step.mkdir(parents=True)
    info = CheckpointInfo(run_id="run-a", step=7, global_step=7, total_steps=7, dataset_id="d", init_weights="w",
                          final=True, loss=0.1)
    (step / INFO_FILE).write_bytes(msgspec.json.encode(info))
    [found], _ = scan(store.location("checkpoints"), store.uri_for)
    assert found.uri == "nats-obj://artifacts/checkpoints/run-a/step-00000007" and found.final
