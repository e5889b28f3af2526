"""Which checkpoints to keep whole, which to keep without their training state, which to delete.

Pure: given the checkpoints on disk and what protects them, `decide` returns the plan; the
trainer applies it (services/trainer/prune.py) after every checkpoint and every finished run.

Kept whole (they are resumed from, so their optimizer, scheduler and RNG state stay):
- the current weights (the last finished run's final checkpoint: the next run starts from its
  weights and, with the continual policy, its AdamW moments);
- the pending run's latest checkpoint (where an interrupted run resumes).
Kept, training state dropped (served or scored, never resumed):
- the champion and every earlier champion the deployer may roll back to (the champion record's
  history), and a staged deployment's checkpoint;
- the best `keep_best` by the evaluator's score (exact match on the newest suite version any
  checkpoint was scored on; scores of other suites do not compare), across runs: the evaluator
  scores only final checkpoints, so a per-run best would be the run's final again;
- each run's newest `keep_last`, for the newest `keep_runs` runs (0: every run): older runs
  keep only what is protected above, or the disk would grow by a checkpoint per dataset forever;
- a run's final checkpoint the evaluator has not scored yet: it is the run's candidate for
  promotion, and an evaluator that is down or behind (found by tests/faults: killed while the
  trainer went through more than `keep_runs` runs) must still find it.
Everything else is deleted.

A checkpoint of the previous layout (training state inside its directory, covered by its
announced hash) cannot lose its training state without failing verification: it is kept whole
or deleted whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StoredCheckpoint:
    run_id: str
    step: int  # the global step in its directory name
    uri: str
    # Its training state is on disk, and beside it (droppable without touching its hash).
    has_training_state: bool = True
    separable: bool = True
    # Its run's last checkpoint: the one the evaluator scores.
    final: bool = False


@dataclass(frozen=True)
class Protection:
    """What keeps checkpoints, by URI."""

    resume: frozenset[str] = frozenset()  # kept whole
    served: frozenset[str] = frozenset()  # champion, rollback targets, staged deployment
    scores: Mapping[str, float] = field(default_factory=dict)  # higher is better
    scored: frozenset[str] = frozenset()  # scored on any suite


@dataclass(frozen=True)
class Plan:
    keep: list[StoredCheckpoint]  # as they are
    drop_state: list[StoredCheckpoint]  # kept, their training state deleted
    delete: list[StoredCheckpoint]
    reasons: dict[str, str]  # uri -> why it is kept

    def summary(self) -> dict[str, int]:
        return {"kept": len(self.keep), "training_state_dropped": len(self.drop_state), "deleted": len(self.delete)}


def decide(checkpoints: Iterable[StoredCheckpoint], protection: Protection, *, keep_last: int, keep_best: int,
           keep_runs: int) -> Plan:
    checkpoints = list(checkpoints)
    reasons: dict[str, str] = {}

    def keep(uri: str, why: str) -> None:
        reasons.setdefault(uri, why)

    for c in checkpoints:
        if c.uri in protection.resume:
            keep(c.uri, "resumed from")
        if c.uri in protection.served:
            keep(c.uri, "champion or rollback target")
    runs: dict[str, list[StoredCheckpoint]] = {}
    for c in sorted(checkpoints, key=lambda c: c.step, reverse=True):
        runs.setdefault(c.run_id, []).append(c)
    # Newest run first: by its newest checkpoint's global step (global steps grow run after run).
    by_recency = sorted(runs.items(), key=lambda item: (item[1][0].step, item[0]), reverse=True)
    for _, newest_first in by_recency[:keep_runs or None]:
        for c in newest_first[:keep_last]:
            keep(c.uri, f"newest {keep_last} of its run")
    for c in checkpoints:
        if c.final and c.uri not in protection.scored and c.uri not in protection.scores:
            keep(c.uri, "awaiting its evaluation")
    scored = sorted((c for c in checkpoints if c.uri in protection.scores),
                    key=lambda c: (protection.scores[c.uri], c.step), reverse=True)
    for c in scored[:keep_best]:
        keep(c.uri, f"best {keep_best} by score")

    kept, slim, delete = [], [], []
    for c in checkpoints:
        if c.uri not in reasons:
            delete.append(c)
        elif c.uri not in protection.resume and c.has_training_state and c.separable:
            slim.append(c)
        else:
            kept.append(c)
    return Plan(keep=kept, drop_state=slim, delete=delete, reasons=reasons)


def orphaned_states(state_steps: Iterable[int], checkpoint_steps: Iterable[int], *, in_progress: bool) -> list[int]:
    """Training states whose checkpoint is gone (deleted, or never completed by a crash), by step.

    In a run in progress only those older than its newest checkpoint: a newer one may be the
    state of a checkpoint being written now (the state goes first).
    """
    steps = set(checkpoint_steps)
    newest = max(steps, default=-1) if in_progress else float("inf")
    return sorted(s for s in state_steps if s not in steps and s < newest)
