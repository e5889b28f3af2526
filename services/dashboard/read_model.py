"""The dashboard's read model: the loop's state, folded from the streams and KV records.

Pure logic, no I/O: the service feeds it every stored event (`apply`, replayed from each
stream's first message on start, then live), the KV records it watches (`apply_record`), and
what it asks NATS and the services from time to time (`set_queue`, `set_dead_letters`,
`set_health`). `section(name)` renders one panel's data as plain JSON-ready values.

Streams are replayed concurrently, one follower each, so events of different streams arrive in
any order (a score before the checkpoint it scores): joins across streams are made when a
section is rendered, never when an event is applied. Every change bumps `version` and the
changed sections' versions, so a browser is sent only what changed since it last looked.

A champion's figures are its sealed test's (`eval.tested`): the champion section carries its
newest test (None while it is pending) and each past champion its own; the candidates' selection
scores (`eval.scored`: what the deployer and curriculum decide on) feed the "scores" and "loss"
curves only, never a champion's accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from libs.common import topology
from libs.common.events import (
    ChampionTested,
    CheckpointSaved,
    CurriculumLevelChanged,
    DatasetAccepted,
    DatasetRejected,
    DatasetSubmitted,
    EvalScored,
    ModelDeployed,
    ModelDeployFailed,
    ModelRolledBack,
    ModelServing,
    ModelStaged,
    TrainingFailed,
    TrainingFinished,
    TrainingProgress,
    TrainingStarted,
)
from libs.common.history import Recorded
from libs.common.records import Champion, DeployDecisions, Deployment, SkillState, TrainerControl

SECTIONS = (
    "meta", "queue", "training", "runs", "loss", "scores", "markers", "champion", "champions",
    "decisions", "deployment", "curriculum", "datasets", "dead_letters", "services",
)
QUEUE_CONSUMERS = tuple(spec.durable for spec in topology.QUEUE)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def thin(points: list[Any], limit: int) -> list[Any]:
    """At most `limit` points spread evenly over `points`, the first and the newest kept."""
    if len(points) <= limit:
        return points
    if limit < 2:
        return points[-limit:] if limit else []
    stride = (len(points) - 1) / (limit - 1)
    return [points[round(i * stride)] for i in range(limit)]


@dataclass
class _Run:
    run_id: str
    dataset_id: str
    started: datetime
    total_steps: int
    start_step: int
    global_step: int
    trace_id: str
    state: str = "running"
    finished: datetime | None = None
    final_loss: float | None = None
    checkpoint_uri: str = ""
    error: str = ""
    # The newest progress of the current attempt (a resumed run starts a new attempt).
    progress: TrainingProgress | None = None


@dataclass
class _Dataset:
    submission_id: str
    time: datetime
    name: str = ""
    channel: str = ""
    priority: str = ""
    submitted_by: str = ""
    state: str = "submitted"
    num_rows: int | None = None
    num_rows_dropped: int | None = None
    reasons: list[str] = field(default_factory=list)
    report_uri: str = ""
    dataset_id: str = ""
    trace_id: str = ""


@dataclass
class ReadModel:
    """The state the dashboard shows; `trace_url` is a template holding `{trace_id}`."""

    trace_url: str = "/traces/{trace_id}"
    max_points: int = 600
    max_rows: int = 200
    version: int = 0
    caught_up: bool = False
    versions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SECTIONS, 0))
    # Folded from the streams.
    datasets: dict[str, _Dataset] = field(default_factory=dict)
    runs: dict[str, _Run] = field(default_factory=dict)
    train_points: list[dict] = field(default_factory=list)
    checkpoints: dict[str, CheckpointSaved] = field(default_factory=dict)  # by sha256
    scores: list[tuple[EvalScored, str]] = field(default_factory=list)  # (score, trace id)
    # Champions' sealed test scores by checkpoint sha256, oldest first: (test, trace id).
    tested: dict[str, list[tuple[ChampionTested, str]]] = field(default_factory=dict)
    markers: list[dict] = field(default_factory=list)
    deployed: list[tuple[ModelDeployed, str]] = field(default_factory=list)  # (event, trace id)
    serving: dict[str, set[str]] = field(default_factory=dict)  # sha256 -> replicas that serve it
    level_changes: dict[str, list[CurriculumLevelChanged]] = field(default_factory=dict)
    # From KV records and polls.
    champion: Champion | None = None
    decisions: DeployDecisions | None = None
    deployment: Deployment | None = None
    trainer_control: TrainerControl | None = None
    skills: dict[str, SkillState] = field(default_factory=dict)
    queue: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_letters: list[dict] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The dataset id a run trains on -> the newest submission that produced it.
    _by_dataset_id: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ changes

    def _changed(self, *sections: str) -> set[str]:
        self.version += 1
        for name in sections:
            self.versions[name] = self.version
        return set(sections)

    def changed_since(self, seen: dict[str, int]) -> list[str]:
        """The sections whose version is newer than the one in `seen`."""
        return [s for s in SECTIONS if self.versions[s] > seen.get(s, -1)]

    def mark_caught_up(self) -> set[str]:
        self.caught_up = True
        return self._changed("meta")

    # ------------------------------------------------------------------ the streams

    def apply(self, record: Recorded) -> set[str]:
        """Fold one stored event in; returns the sections it changed (none for anything else)."""
        event, trace = record.event, record.trace_id
        match event:
            case DatasetSubmitted():
                ds = self._dataset(event.id, event.time)
                ds.name, ds.channel, ds.priority, ds.submitted_by = event.name, event.channel, event.priority, event.submitted_by
                ds.trace_id = ds.trace_id or trace
                return self._changed("datasets")
            case DatasetAccepted():
                ds = self._dataset(event.submission_id, event.time)
                ds.name, ds.priority, ds.state = ds.name or event.name, event.priority, _later(ds.state, "accepted")
                ds.num_rows, ds.num_rows_dropped, ds.report_uri = event.num_rows, event.num_rows_dropped, event.report_uri
                ds.dataset_id, ds.trace_id = event.dataset_id, ds.trace_id or trace
                ds.channel, ds.submitted_by = event.channel or ds.channel, event.submitted_by or ds.submitted_by
                self._by_dataset_id[event.dataset_id] = event.submission_id
                return self._changed("datasets", "runs", "training")
            case DatasetRejected():
                ds = self._dataset(event.submission_id, event.time)
                ds.name, ds.state, ds.reasons = ds.name or event.name, "rejected", list(event.reasons)
                ds.report_uri, ds.dataset_id, ds.trace_id = event.report_uri, event.dataset_id, ds.trace_id or trace
                ds.channel, ds.submitted_by = event.channel or ds.channel, event.submitted_by or ds.submitted_by
                return self._changed("datasets")
            case TrainingStarted():
                run = self.runs.get(event.run_id)
                if run is None:
                    run = self.runs[event.run_id] = _Run(
                        run_id=event.run_id, dataset_id=event.dataset_id, started=event.time,
                        total_steps=event.total_steps, start_step=event.start_step,
                        global_step=event.global_step, trace_id=trace)
                # A resume starts a new attempt: its pace (the ETA) counts from here.
                run.started, run.start_step, run.state, run.progress = event.time, event.start_step, "running", None
                run.total_steps, run.global_step = event.total_steps, event.global_step
                return self._changed("runs", "training", "datasets")
            case TrainingProgress():
                run = self.runs.get(event.run_id)
                if run is not None:
                    run.progress, run.global_step = event, event.global_step
                self.train_points.append({"x": event.global_step, "y": event.loss, "run_id": event.run_id})
                if len(self.train_points) > 20 * self.max_points:
                    self.train_points = thin(self.train_points, 10 * self.max_points)
                # Not "runs": its table changes when a run starts or ends; the live step is "training"'s.
                return self._changed("training", "loss")
            case TrainingFinished():
                if (run := self.runs.get(event.run_id)) is not None:
                    run.state, run.finished, run.final_loss = "finished", event.time, event.final_loss
                    run.checkpoint_uri, run.global_step = event.checkpoint_uri, event.global_step
                return self._changed("runs", "training", "datasets")
            case TrainingFailed():
                if (run := self.runs.get(event.run_id)) is not None:
                    run.state = "retrying" if event.will_retry else "failed"
                    run.error, run.finished = event.error, None if event.will_retry else event.time
                return self._changed("runs", "training", "datasets")
            case CheckpointSaved():
                self.checkpoints[event.sha256] = event
                return self._changed("loss", "scores")
            case EvalScored():
                self.scores.append((event, trace))
                return self._changed("scores", "loss")
            case ChampionTested():
                tests = self.tested.setdefault(event.checkpoint_sha256, [])
                if any(t.id == event.id for t, _ in tests):
                    return set()  # re-announced after JetStream's duplicate window
                tests.append((event, trace))
                return self._changed("champion", "champions")
            case ModelDeployed():
                self.deployed.append((event, trace))
                self._mark(event.time, "promotion", f"{event.run_id} step {event.step} served")
                return self._changed("champions", "champion", "markers")
            case ModelRolledBack():
                self._mark(event.time, "rollback", f"rolled back to {event.checkpoint_sha256[:8]}")
                return self._changed("markers")
            case ModelDeployFailed():
                self._mark(event.time, "deploy_failed", f"{event.kind} not served: {event.reason}"[:120])
                return self._changed("markers")
            case ModelServing() if event.ok:
                self.serving.setdefault(event.checkpoint_sha256, set()).add(event.replica)
                return self._changed("champion")
            case CurriculumLevelChanged():
                self.level_changes.setdefault(event.skill, []).append(event)
                self._mark(event.time, "level_change", f"{event.skill} {event.previous_level} → {event.level}")
                return self._changed("curriculum", "markers")
            case ModelStaged():
                return set()
        return set()

    def _dataset(self, submission_id: str, time: datetime) -> _Dataset:
        if submission_id not in self.datasets:
            self.datasets[submission_id] = _Dataset(submission_id=submission_id, time=time)
            if len(self.datasets) > 5 * self.max_rows:  # drop the oldest
                for key in sorted(self.datasets, key=lambda k: self.datasets[k].time)[: len(self.datasets) - self.max_rows]:
                    del self.datasets[key]
        return self.datasets[submission_id]

    def _mark(self, time: datetime, kind: str, label: str) -> None:
        self.markers.append({"time": _iso(time), "kind": kind, "label": label})

    # ------------------------------------------------------------------ KV records and polls

    def apply_record(self, record: msgspec.Struct | None, *, key: str) -> set[str]:
        """A KV record's newest value: `champion`, `decisions`, `deployment`, `trainer` or a skill's state."""
        match key:
            case "champion":
                self.champion = record
                return self._changed("champion")
            case "decisions":
                self.decisions = record
                return self._changed("decisions")
            case "deployment":
                self.deployment = record
                return self._changed("deployment")
            case "trainer":
                self.trainer_control = record
                return self._changed("training")
        if isinstance(record, SkillState):
            self.skills[record.skill] = record
            return self._changed("curriculum")
        return set()

    def set_queue(self, queue: dict[str, dict[str, int]]) -> set[str]:
        if queue == self.queue:
            return set()
        self.queue = queue
        return self._changed("queue")

    def set_dead_letters(self, letters: Iterable[dict]) -> set[str]:
        letters = list(letters)
        if letters == self.dead_letters:
            return set()
        self.dead_letters = letters
        return self._changed("dead_letters")

    def set_health(self, name: str, health: dict[str, Any]) -> set[str]:
        same = {k: v for k, v in self.services.get(name, {}).items() if k != "checked"}
        self.services[name] = health
        if same == {k: v for k, v in health.items() if k != "checked"}:
            return set()
        return self._changed("services")

    # ------------------------------------------------------------------ rendering

    def snapshot(self, sections: Iterable[str] = SECTIONS) -> dict[str, Any]:
        return {name: self.section(name) for name in sections}

    def section(self, name: str) -> Any:
        return getattr(self, f"_render_{name}")()

    def _render_meta(self) -> dict:
        return {"version": self.version, "caught_up": self.caught_up, "trace_url": self.trace_url}

    def _render_queue(self) -> dict:
        return {name: self.queue.get(name, {"waiting": 0, "in_progress": 0}) for name in QUEUE_CONSUMERS}

    def _dataset_name(self, dataset_id: str) -> str:
        submission = self._by_dataset_id.get(dataset_id)
        return self.datasets[submission].name if submission in self.datasets else ""

    def _render_training(self) -> dict | None:
        running = [r for r in self.runs.values() if r.state in ("running", "retrying")]
        if not running:
            return None
        run = max(running, key=lambda r: r.started)
        p = run.progress
        mode = self.trainer_control.mode if self.trainer_control else "running"
        return {
            "run_id": run.run_id, "dataset_id": run.dataset_id, "dataset_name": self._dataset_name(run.dataset_id),
            "state": {"paused": "paused", "stopped": "stopping"}.get(mode, run.state),
            "step": p.step if p else run.start_step, "total_steps": run.total_steps,
            "global_step": run.global_step, "loss": p.loss if p else None,
            "learning_rate": p.learning_rate if p else None, "tokens_per_second": p.tokens_per_second if p else None,
            "eta_s": p.eta_s if p else None, "epoch": p.epoch if p else None,
            "grad_norm": p.grad_norm if p else None, "val_loss": p.val_loss if p else None,
            "train_val_gap": p.train_val_gap if p else None,
            "started": _iso(run.started), "trace_id": run.trace_id,
        }

    def _render_runs(self) -> list[dict]:
        runs = sorted(self.runs.values(), key=lambda r: r.started)[-self.max_rows:]
        return [{
            "run_id": r.run_id, "dataset_id": r.dataset_id, "dataset_name": self._dataset_name(r.dataset_id),
            "started": _iso(r.started), "finished": _iso(r.finished), "state": r.state,
            "total_steps": r.total_steps, "global_step": r.global_step, "final_loss": r.final_loss,
            "checkpoint_uri": r.checkpoint_uri, "error": r.error, "trace_id": r.trace_id,
        } for r in runs]

    def _render_loss(self) -> dict:
        val = []
        for score, _ in self.scores:
            saved = self.checkpoints.get(score.checkpoint_sha256)
            if saved is not None and score.val_loss is not None:
                val.append({"x": saved.global_step, "y": score.val_loss, "run_id": score.run_id})
        return {"train": thin(self.train_points, self.max_points), "val": thin(sorted(val, key=lambda p: p["x"]), self.max_points)}

    def _render_scores(self) -> list[dict]:
        rendered = []
        for score, trace in sorted(self.scores, key=lambda s: s[0].time)[-self.max_points:]:
            saved = self.checkpoints.get(score.checkpoint_sha256)
            rendered.append({
                "time": _iso(score.time), "run_id": score.run_id, "step": score.step,
                "global_step": saved.global_step if saved else None, "checkpoint_sha256": score.checkpoint_sha256,
                "suite_version": score.suite_version, "exact_match": score.exact_match,
                "low": score.exact_match_low, "high": score.exact_match_high, "val_loss": score.val_loss,
                "levels": {k: {"accuracy": v.accuracy, "low": v.low, "high": v.high, "correct": v.correct, "total": v.total}
                           for k, v in score.levels.items()},
                "trace_id": trace,
            })
        return rendered

    def _render_markers(self) -> list[dict]:
        return sorted(self.markers, key=lambda m: m["time"])[-self.max_rows:]

    def _sealed_test(self, sha256: str) -> dict | None:
        """The checkpoint's newest sealed test score (None: not tested, or not yet)."""
        tests = self.tested.get(sha256)
        if not tests:
            return None
        t, trace = max(tests, key=lambda pair: pair[0].time)
        return {
            "suite": t.suite, "suite_version": t.suite_version, "exact_match": t.exact_match,
            "low": t.exact_match_low, "high": t.exact_match_high, "num_examples": t.num_examples,
            "val_loss": t.val_loss, "time": _iso(t.time), "trace_id": trace,
            "levels": {k: {"accuracy": v.accuracy, "low": v.low, "high": v.high, "correct": v.correct, "total": v.total}
                       for k, v in sorted(t.levels.items())},
        }

    def _deployed_row(self, event: ModelDeployed, trace: str) -> dict:
        return {
            "checkpoint_uri": event.checkpoint_uri, "checkpoint_sha256": event.checkpoint_sha256,
            "run_id": event.run_id, "step": event.step, "test": self._sealed_test(event.checkpoint_sha256),
            "reason": event.reason, "time": _iso(event.time), "trace_id": trace,
            "previous_checkpoint_uri": event.previous_checkpoint_uri,
        }

    def _render_champion(self) -> dict | None:
        c = self.champion
        if c is None:
            return None
        trace = next((t for e, t in reversed(self.deployed) if e.checkpoint_sha256 == c.checkpoint_sha256), "")
        return {
            "checkpoint_uri": c.checkpoint_uri, "checkpoint_sha256": c.checkpoint_sha256, "run_id": c.run_id,
            "step": c.step, "reason": c.reason, "time": _iso(c.deployed_at), "trace_id": trace, "kind": c.kind,
            "test": self._sealed_test(c.checkpoint_sha256),
            "served_by": sorted(self.serving.get(c.checkpoint_sha256, ())),
        }

    def _render_champions(self) -> list[dict]:
        newest_first = sorted(self.deployed, key=lambda d: d[0].time, reverse=True)
        return [self._deployed_row(e, t) for e, t in newest_first[: self.max_rows]]

    def _render_decisions(self) -> list[dict]:
        kept = self.decisions.decisions if self.decisions else []
        return [{
            "time": _iso(d.time), "outcome": d.outcome, "reason": d.reason, "run_id": d.run_id,
            "checkpoint_sha256": d.checkpoint_sha256, "checkpoint_uri": d.checkpoint_uri,
            "suite_version": d.suite_version, "requested_by": d.requested_by,
        } for d in reversed(kept[-self.max_rows:])]

    def _render_deployment(self) -> dict | None:
        d = self.deployment
        if d is None:
            return None
        return {"id": d.id, "kind": d.kind, "state": d.state, "staged_at": _iso(d.staged_at),
                "checkpoint_sha256": d.checkpoint_sha256, "run_id": d.candidate.run_id, "step": d.candidate.step,
                "reason": d.reason or d.candidate.reason, "served_by": d.served_by}

    def _render_curriculum(self) -> dict:
        skills = {}
        for name in sorted(self.skills.keys() | self.level_changes.keys()):
            state = self.skills.get(name)
            changes = self.level_changes.get(name, [])
            skills[name] = {
                "level": state.level if state else (changes[-1].level if changes else 1),
                "recent": list(state.recent) if state else [],
                "datasets_submitted": state.datasets_submitted if state else 0,
                "changes": [{"time": _iso(c.time), "from": c.previous_level, "to": c.level, "accuracy": c.accuracy,
                             "reason": c.reason} for c in changes],
            }
        return skills

    def _render_datasets(self) -> list[dict]:
        trained = {}  # submission -> (state, run id) from the newest run of its dataset
        for run in sorted(self.runs.values(), key=lambda r: r.started):
            if (submission := self._by_dataset_id.get(run.dataset_id)) is not None:
                state = {"running": "training", "retrying": "training", "finished": "trained"}.get(run.state, run.state)
                trained[submission] = (state, run.run_id)
        rows = []
        for ds in sorted(self.datasets.values(), key=lambda d: d.time, reverse=True)[: self.max_rows]:
            state, run_id = trained.get(ds.submission_id, (ds.state, ""))
            rows.append({
                "submission_id": ds.submission_id, "name": ds.name, "channel": ds.channel, "priority": ds.priority,
                "submitted_by": ds.submitted_by, "state": state if ds.state == "accepted" else ds.state,
                "time": _iso(ds.time), "num_rows": ds.num_rows, "num_rows_dropped": ds.num_rows_dropped,
                "reasons": ds.reasons, "report_uri": ds.report_uri, "dataset_id": ds.dataset_id,
                "report_url": f"/api/datasets/{ds.submission_id}/report" if ds.report_uri else "",
                "trace_id": ds.trace_id, "run_id": run_id,
            })
        return rows

    def _render_dead_letters(self) -> list[dict]:
        return self.dead_letters[: self.max_rows]

    def _render_services(self) -> dict:
        return dict(sorted(self.services.items()))


_ORDER = {"submitted": 0, "accepted": 1, "rejected": 1}


def _later(current: str, new: str) -> str:
    """A submission's state only moves forward, whichever stream's event is folded in first."""
    return new if _ORDER.get(new, 0) >= _ORDER.get(current, 0) else current
