"""Where a model comes from, from the event history alone: `flywheel lineage` and the dashboard.

A checkpoint was saved by a run (`checkpoint.saved`: run, step, global step); the run trained one
dataset (`training.started`: `dataset_id`, `init_weights`; `training.finished`, `training.failed`)
that the gatekeeper accepted (`dataset.accepted.*`, with the submission it came from,
`dataset.submitted`), starting from `init_weights`: the final checkpoint of an earlier run, or the
base model. Following `init_weights` back, hop by hop, gives the model's lineage down to the base.
Each checkpoint's selection scores (`eval.scored`: what the deployer decided on), its sealed test
scores if it was champion (`eval.tested`: the figures of its accuracy, decided on by nothing) and
its deployments (`model.deployed`, `model.rolled_back`, with the deployer's recorded decision while
`DEPLOY_DECISIONS` still keeps it) say how it fared, why it was served over the champion before
it, and whether it was rolled back. Every part carries
the trace id of the message it comes from (`flywheel trace`, the tracing UI).

`build_lineage` is the pure part (stored messages in, a `Lineage` out, JSON-ready with
`msgspec.to_builtins`); `read_lineage` reads what it needs: a handful of subjects, never
`training.progress` (most of the TRAINING stream), and `dataset.submitted` without its inline rows
(a curriculum dataset carries its 1,000 rows, ~300 kB, inline: decoding them into Python objects
would cost more than all the rest; skipping them costs next to nothing). The streams keep 30 days:
a chain that reaches a checkpoint whose events are gone ends there, and says so.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import unquote, urlparse

import msgspec

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import (
    ChampionTested,
    CheckpointSaved,
    DatasetAccepted,
    DatasetSubmitted,
    DeploymentKind,
    EvalScored,
    LevelScore,
    ModelDeployed,
    ModelRolledBack,
    TrainingFailed,
    TrainingFinished,
    TrainingStarted,
)
from libs.common.history import Recorded, read_history, read_subject
from libs.common.records import CHAMPION, DEPLOY_DECISIONS, Champion, DeployDecision

# What `read_lineage` reads with `read_history`; `dataset.submitted` is read apart, without its rows.
SUBJECTS: tuple[str, ...] = (
    topology.CHECKPOINT_SAVED,
    topology.TRAINING_STARTED,
    topology.TRAINING_FINISHED,
    topology.TRAINING_FAILED,
    topology.DATASET_ACCEPTED.format(priority="*"),
    topology.EVAL_SCORED,
    topology.EVAL_TESTED,
    topology.MODEL_DEPLOYED,
    topology.MODEL_ROLLED_BACK,
)
# The evaluator scores the base model as run "base", step 0 (services.evaluator.base_model).
BASE_RUN_ID = "base"
# A checkpoint's URI names its run and global step: <store>/checkpoints/<run_id>/step-<global step>.
_CHECKPOINT_URI = re.compile(r"/checkpoints/(?P<run>[^/]+)/step-(?P<step>\d+)/?$")
_HEX = re.compile(r"[0-9a-f]+")
MIN_PREFIX = 8
# Channels whose submissions reach the gatekeeper without a `dataset.submitted` event.
DIRECT_CHANNELS = frozenset({"inbox", "http"})
# A recorded decision belongs to a deployment it was made within this long of.
_DECISION_WINDOW_S = 3600.0

End = Literal["base", "aged_out"]


class UnknownModel(LookupError):
    """No checkpoint, run or deployment in the history matches what was asked for (or several
    do): `candidates` lists what it could match."""

    def __init__(self, message: str, candidates: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


# ---------------------------------------------------------------------------- the result


class CheckpointRef(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint as another event names it (a deployment's previous champion, the next one)."""

    uri: str
    sha256: str = ""
    run_id: str = ""
    step: int | None = None


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One checkpoint of the chain. `saved` is None when its `checkpoint.saved` is no longer
    stored: what is known then comes from its scores, its deployments or its URI."""

    uri: str
    sha256: str
    run_id: str
    step: int | None
    global_step: int | None
    final: bool | None
    saved: datetime | None
    trace_id: str = ""


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One `training.started` of a run: the first, or a resume after a crash, a stop or a failure."""

    started: datetime | None
    start_step: int
    total_steps: int
    global_step: int
    trace_id: str


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    failed: datetime | None
    error: str
    will_retry: bool
    trace_id: str


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """A training run: it trained `dataset_id` from `init_weights` (a checkpoint URI, or the base)."""

    run_id: str
    dataset_id: str
    init_weights: str  # "" when no training.started of it is stored any more
    total_steps: int | None
    attempts: list[Attempt]
    resumes: int
    failures: list[Failure]
    finished: datetime | None
    final_loss: float | None
    duration_s: float | None
    final_global_step: int | None
    checkpoint_uri: str  # the final checkpoint ("" if it never finished)
    checkpoints_saved: int
    trace_ids: list[str]


class Submission(msgspec.Struct, frozen=True, kw_only=True):
    """The `dataset.submitted` a dataset came from (its inline rows are not read)."""

    submission_id: str
    submitted: datetime | None
    channel: str
    submitted_by: str
    source: str  # the service that published it
    level: str  # the validation level asked for
    inline: bool  # rows inline in the event (else at `uri`)
    uri: str
    trace_id: str


class Dataset(msgspec.Struct, frozen=True, kw_only=True):
    """The dataset a run trained on, as the gatekeeper accepted it (its validation summary)."""

    dataset_id: str
    name: str
    schema: str
    priority: str
    num_rows: int
    num_rows_dropped: int
    uri: str
    report_uri: str
    submission_id: str
    accepted: datetime | None
    trace_id: str
    # How it came in and who sent it, as the gatekeeper's verdict records them ("" in events from
    # before it did): an inbox file or an HTTP upload has no `dataset.submitted`, so no `submission`.
    channel: str
    submitted_by: str
    submission: Submission | None
    # How often it was accepted (a resubmission of the same content), and every run that trained it.
    acceptances: int
    trained_in: list[str]


class Score(msgspec.Struct, frozen=True, kw_only=True):
    """One `eval.scored`: the checkpoint on one selection suite version (what decided on it)."""

    suite: str
    suite_version: str
    exact_match: float
    exact_match_low: float
    exact_match_high: float
    num_examples: int
    val_loss: float | None
    ece: float | None
    levels: dict[str, LevelScore]
    by_level: dict[str, float]
    regressions: list[str]
    compared_with: str
    scored: datetime | None
    trace_id: str


class SealedTest(msgspec.Struct, frozen=True, kw_only=True):
    """One `eval.tested`: a champion on one sealed test suite version, the figures of its accuracy
    (`eval_id`: the selection score it was champion with)."""

    suite: str
    suite_version: str
    exact_match: float
    exact_match_low: float
    exact_match_high: float
    num_examples: int
    val_loss: float | None
    levels: dict[str, LevelScore]
    eval_id: str
    tested: datetime | None
    trace_id: str


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """One time the checkpoint became the champion, why, and what became of it."""

    deployed: datetime | None
    kind: DeploymentKind
    reason: str
    previous: CheckpointRef | None  # the champion it replaced (None: the first champion)
    replaced_by: CheckpointRef | None  # the next champion (None: still served)
    replaced: datetime | None
    rolled_back: bool
    rollback_reason: str
    decision: DeployDecision | None  # the deployer's recorded decision, while it is kept
    event_id: str
    trace_id: str


class Hop(msgspec.Struct, frozen=True, kw_only=True):
    """One checkpoint of the chain with the run that made it, its dataset, scores (selection), tests
    (sealed, once champion) and deployments; `parent` is what the run started from (the next hop,
    or the origin)."""

    checkpoint: Checkpoint
    run: Run | None
    dataset: Dataset | None
    scores: list[Score]
    tests: list[SealedTest]
    deployments: list[Deployment]
    # The deployer's other recorded decisions on it (kept, refused, deploy_failed, ...), while kept.
    decisions: list[DeployDecision]
    parent: str
    notes: list[str]


class Origin(msgspec.Struct, frozen=True, kw_only=True):
    """Where the chain ends: the base model (with its own scores and deployments), or a checkpoint
    whose history is no longer stored."""

    kind: End
    uri: str
    note: str
    scores: list[Score] = []
    tests: list[SealedTest] = []
    deployments: list[Deployment] = []
    run_id: str = ""
    global_step: int | None = None


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """A model's lineage, newest hop first, down to `origin`.

    `query`: what was asked for ("" the served model). `model`: the checkpoint it resolved to
    (None: nothing was ever deployed and none was named). `served`: it is the champion now;
    `deployed`: it ever was. `summary`: the answer in one sentence. `trace_ids`: every trace
    the lineage touches, newest hop first. `events_read`: the stored events it was built from.
    Every time is the event's own (`time`: when it happened, by its producer's clock).
    """

    query: str
    model: CheckpointRef | None
    served: bool
    deployed: bool
    champion: CheckpointRef | None
    summary: str
    hops: list[Hop]
    origin: Origin | None
    trace_ids: list[str]
    events_read: int


# ---------------------------------------------------------------------------- the index


def _norm(uri: str) -> str:
    return uri.rstrip("/")


_NEVER = datetime.min.replace(tzinfo=UTC)
_FOREVER = datetime.max.replace(tzinfo=UTC)


def _aware(t: datetime | None) -> datetime:
    if t is None:
        return _NEVER
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _stored(r: Recorded) -> datetime:
    return _aware(r.stored)


def parse_checkpoint_uri(uri: str) -> tuple[str, int] | None:
    """(run id, global step) from a checkpoint URI (`<store>/checkpoints/<run>/step-<n>`); None otherwise."""
    match = _CHECKPOINT_URI.search(unquote(urlparse(uri).path) if "://" in uri else uri)
    return (match["run"], int(match["step"])) if match else None


class _Index:
    """The stored events the lineage needs, by key; duplicates (a re-announcement with the same
    event id after JetStream's duplicate window) are kept once, the first stored."""

    def __init__(self, records: Iterable[Recorded]) -> None:
        self.count = 0
        self.saved: dict[str, Recorded] = {}
        self.saved_by_run: dict[str, list[Recorded]] = {}
        self.started: dict[str, list[Recorded]] = {}
        self.finished: dict[str, Recorded] = {}
        self.failed: dict[str, list[Recorded]] = {}
        self.accepted: dict[str, list[Recorded]] = {}
        self.submitted: dict[str, Recorded] = {}
        self.scored: dict[str, list[Recorded]] = {}
        self.tested: dict[str, list[Recorded]] = {}
        self.deployed: list[Recorded] = []
        self.rolled_back: list[Recorded] = []
        self.runs_by_dataset: dict[str, list[str]] = {}
        self.uri_sha: dict[str, str] = {}
        self.sha_ref: dict[str, CheckpointRef] = {}
        seen: set[str] = set()
        for r in sorted(records, key=lambda r: (_stored(r), r.stream, r.seq)):
            event = r.event
            if event is None or event.id in seen:
                continue
            seen.add(event.id)
            match event:
                case CheckpointSaved():
                    self.saved.setdefault(_norm(event.uri), r)
                    self.saved_by_run.setdefault(event.run_id, []).append(r)
                    self._know(event.uri, event.sha256, event.run_id, event.step)
                case TrainingStarted():
                    self.started.setdefault(event.run_id, []).append(r)
                    runs = self.runs_by_dataset.setdefault(event.dataset_id, [])
                    if event.run_id not in runs:
                        runs.append(event.run_id)
                case TrainingFinished():
                    self.finished[event.run_id] = r  # the newest: a run retrained after its state was lost
                case TrainingFailed():
                    self.failed.setdefault(event.run_id, []).append(r)
                case DatasetAccepted():
                    self.accepted.setdefault(event.dataset_id, []).append(r)
                case DatasetSubmitted():
                    self.submitted.setdefault(event.id, r)
                case EvalScored():
                    self.scored.setdefault(event.checkpoint_sha256, []).append(r)
                    self._know(event.checkpoint_uri, event.checkpoint_sha256, event.run_id, event.step)
                case ChampionTested():
                    self.tested.setdefault(event.checkpoint_sha256, []).append(r)
                    self._know(event.checkpoint_uri, event.checkpoint_sha256, event.run_id, event.step)
                case ModelDeployed():
                    self.deployed.append(r)
                    self._know(event.checkpoint_uri, event.checkpoint_sha256, event.run_id, event.step)
                case ModelRolledBack():
                    self.rolled_back.append(r)
                case _:
                    continue  # training.progress and the like: not part of a lineage
            self.count += 1

    def _know(self, uri: str, sha256: str, run_id: str, step: int) -> None:
        if uri and sha256:
            self.uri_sha.setdefault(_norm(uri), sha256)
            self.sha_ref.setdefault(sha256, CheckpointRef(uri=uri, sha256=sha256, run_id=run_id, step=step))

    def ref(self, uri: str = "", sha256: str = "") -> CheckpointRef:
        """What is known of a checkpoint named by its URI or sha256."""
        sha256 = sha256 or self.uri_sha.get(_norm(uri), "")
        if known := self.sha_ref.get(sha256):
            return known
        if saved := self.saved.get(_norm(uri)):
            event = saved.event
            return CheckpointRef(uri=event.uri, sha256=event.sha256, run_id=event.run_id, step=event.step)
        parsed = parse_checkpoint_uri(uri)
        return CheckpointRef(uri=uri, sha256=sha256, run_id=parsed[0] if parsed else "")

    def runs(self) -> list[str]:
        """Every run id in the history, newest first."""
        found: dict[str, datetime] = {}
        for table in (self.started, self.saved_by_run, self.failed):
            for run_id, rs in table.items():
                found[run_id] = max(found.get(run_id, _NEVER), _stored(rs[-1]))
        for run_id, r in self.finished.items():
            found[run_id] = max(found.get(run_id, _NEVER), _stored(r))
        return sorted(found, key=found.__getitem__, reverse=True)

    def base_uris(self) -> list[str]:
        """What runs started from that is no checkpoint: the base model (as the trainer names it)."""
        uris = (rs[0].event.init_weights for rs in self.started.values())
        return list(dict.fromkeys(u for u in uris if u and parse_checkpoint_uri(u) is None
                                  and _norm(u) not in self.saved))

    def base_shas(self) -> list[str]:
        shas = [sha for sha, rs in self.scored.items() if rs[0].event.run_id == BASE_RUN_ID]
        shas += [r.event.checkpoint_sha256 for r in self.deployed if r.event.run_id == BASE_RUN_ID]
        return list(dict.fromkeys(shas))


# ---------------------------------------------------------------------------- resolving MODEL


def _describe(ref: CheckpointRef) -> str:
    where = f"{ref.run_id}@{ref.step}" if ref.run_id and ref.step is not None else ref.run_id or ref.uri
    return f"{ref.sha256[:12] or '?'} ({where})"


def _candidates(ix: _Index) -> list[str]:
    deployed = list(dict.fromkeys(r.event.checkpoint_sha256 for r in reversed(ix.deployed)))
    return [_describe(ix.ref(sha256=sha)) for sha in deployed[:5]] + ix.runs()[:5]


def _unknown(query: str, ix: _Index) -> UnknownModel:
    deployed = list(dict.fromkeys(r.event.checkpoint_sha256 for r in reversed(ix.deployed)))[:5]
    runs = ix.runs()[:5]
    known = "; ".join(part for part in (
        f"deployed, newest first: {', '.join(_describe(ix.ref(sha256=s)) for s in deployed)}" if deployed else "",
        f"newest runs: {', '.join(runs)}" if runs else "",
    ) if part) or "the history holds no checkpoint yet"
    return UnknownModel(
        f"no checkpoint or run matches {query!r} (give a checkpoint sha256 or its first {MIN_PREFIX}+ hex digits, "
        f"a checkpoint URI, a run id, RUN@STEP or 'base'); {known}",
        _candidates(ix),
    )


def _run_checkpoint(ix: _Index, run_id: str, step: int | None) -> CheckpointRef | None:
    """A run's checkpoint at `step` (its run-local step, else its global step), or its final one."""
    saved = [r.event for r in ix.saved_by_run.get(run_id, [])]
    if step is not None:
        hit = [e for e in saved if e.step == step] or [e for e in saved if e.global_step == step]
        return ix.ref(hit[-1].uri, hit[-1].sha256) if hit else None
    if finished := ix.finished.get(run_id):
        return ix.ref(finished.event.checkpoint_uri)
    final = [e for e in saved if e.final] or sorted(saved, key=lambda e: e.step)
    if final:
        return ix.ref(final[-1].uri, final[-1].sha256)
    # Only its score or deployment is stored (its checkpoint.saved aged out).
    refs = [ref for ref in ix.sha_ref.values() if ref.run_id == run_id]
    return refs[-1] if refs else None


def resolve(ix: _Index, query: str) -> CheckpointRef | Literal["base"]:
    """The checkpoint `query` names; raises UnknownModel."""
    q = query.strip()
    if q.lower() == BASE_RUN_ID:
        return "base"
    if q.startswith("/"):
        q = f"file://{q}"
    if "://" in q:
        if _norm(q) in map(_norm, ix.base_uris()):
            return "base"
        ref = ix.ref(q)
        if ref.sha256 or _norm(q) in ix.saved or (ref.run_id and (ref.run_id in ix.started)):
            return ref
        raise _unknown(query, ix)
    lowered = q.lower()
    if len(lowered) >= MIN_PREFIX and _HEX.fullmatch(lowered):
        shas = sorted({*ix.sha_ref, *(r.event.sha256 for r in ix.saved.values())})
        hits = [sha for sha in shas if sha.startswith(lowered)]
        if len(hits) == 1:
            return ix.ref(sha256=hits[0])
        if len(hits) > 1:
            listed = [_describe(ix.ref(sha256=sha)) for sha in hits]
            raise UnknownModel(f"{query!r} is the start of {len(hits)} checkpoints' sha256: {', '.join(listed[:10])}; "
                               "give more digits", listed)
    run_id, _, step_text = q.partition("@")
    step = int(step_text) if step_text.isdigit() else None
    if step_text and step is None:
        raise _unknown(query, ix)
    known_runs = {*ix.started, *ix.saved_by_run, *ix.finished, *ix.failed, *(r.run_id for r in ix.sha_ref.values())}
    if run_id in known_runs:
        if ref := _run_checkpoint(ix, run_id, step):
            return ref
        saved = sorted(r.event.step for r in ix.saved_by_run.get(run_id, []))
        raise UnknownModel(
            f"run {run_id} saved no checkpoint at step {step} (it saved steps {', '.join(map(str, saved))})" if saved
            else f"run {run_id} saved no checkpoint (it never got that far)", [f"{run_id}@{s}" for s in saved])
    raise _unknown(query, ix)


# ---------------------------------------------------------------------------- the parts


def _score(r: Recorded) -> Score:
    e: EvalScored = r.event
    return Score(
        suite=e.suite, suite_version=e.suite_version, exact_match=e.exact_match,
        exact_match_low=e.exact_match_low, exact_match_high=e.exact_match_high, num_examples=e.num_examples,
        val_loss=e.val_loss, ece=e.ece, levels=dict(e.levels), by_level=dict(e.by_level),
        regressions=list(e.regressions), compared_with=e.compared_with, scored=e.time,
        trace_id=r.trace_id,
    )


def _scores(ix: _Index, sha256: str) -> list[Score]:
    return [_score(r) for r in ix.scored.get(sha256, [])] if sha256 else []


def _tests(ix: _Index, sha256: str) -> list[SealedTest]:
    return [SealedTest(
        suite=e.suite, suite_version=e.suite_version, exact_match=e.exact_match, exact_match_low=e.exact_match_low,
        exact_match_high=e.exact_match_high, num_examples=e.num_examples, val_loss=e.val_loss, levels=dict(e.levels),
        eval_id=e.eval_id, tested=e.time, trace_id=r.trace_id,
    ) for r in ix.tested.get(sha256, []) if (e := r.event)] if sha256 else []


def _matching_decision(decisions: Sequence[DeployDecision], sha256: str, when: datetime,
                       used: set[str]) -> DeployDecision | None:
    fits = [d for d in decisions if d.checkpoint_sha256 == sha256 and d.outcome in ("promoted", "rolled_back")
            and d.id not in used and abs((_aware(d.time) - _aware(when)).total_seconds()) <= _DECISION_WINDOW_S]
    if not fits:
        return None
    best = min(fits, key=lambda d: abs((_aware(d.time) - _aware(when)).total_seconds()))
    used.add(best.id)
    return best


def _deployments(ix: _Index, sha256: str, decisions: Sequence[DeployDecision]) -> list[Deployment]:
    """Every time `sha256` became the champion, oldest first."""
    found, used = [], set()
    for i, r in enumerate(ix.deployed):
        e: ModelDeployed = r.event
        if e.checkpoint_sha256 != sha256 or not sha256:
            continue
        nxt = ix.deployed[i + 1] if i + 1 < len(ix.deployed) else None
        until = _stored(nxt) if nxt else _FOREVER
        back = next((b for b in ix.rolled_back if _stored(r) <= _stored(b) <= until
                     and _norm(b.event.rolled_back_from) == _norm(e.checkpoint_uri)), None)
        restored = any(_norm(b.event.checkpoint_uri) == _norm(e.checkpoint_uri)
                       and _norm(b.event.rolled_back_from) == _norm(e.previous_checkpoint_uri)
                       and abs((_stored(b) - _stored(r)).total_seconds()) <= _DECISION_WINDOW_S
                       for b in ix.rolled_back)
        decision = _matching_decision(decisions, sha256, e.time, used)
        if restored or (decision is not None and decision.outcome == "rolled_back"):
            kind: DeploymentKind = "rollback"
        elif (decision is not None and decision.requested_by != "eval.scored") or e.reason.startswith("manual deploy"):
            kind = "manual"
        else:
            kind = "promotion"
        found.append(Deployment(
            deployed=e.time, kind=kind, reason=e.reason,
            previous=ix.ref(e.previous_checkpoint_uri) if e.previous_checkpoint_uri else None,
            replaced_by=ix.ref(nxt.event.checkpoint_uri, nxt.event.checkpoint_sha256) if nxt else None,
            replaced=nxt.event.time if nxt else None, rolled_back=back is not None,
            rollback_reason=back.event.reason if back else "", decision=decision, event_id=e.id,
            trace_id=r.trace_id,
        ))
    return found


def _run(ix: _Index, run_id: str) -> Run | None:
    starts = ix.started.get(run_id, [])
    finished = ix.finished.get(run_id)
    failures = ix.failed.get(run_id, [])
    saved = ix.saved_by_run.get(run_id, [])
    if not (starts or finished or failures):
        return None
    first = starts[0].event if starts else None
    fin: TrainingFinished | None = finished.event if finished else None
    dataset_id = first.dataset_id if first else fin.dataset_id if fin else failures[0].event.dataset_id
    traces = [r.trace_id for r in (*starts, *failures, *((finished,) if finished else ())) if r.trace_id]
    return Run(
        run_id=run_id, dataset_id=dataset_id, init_weights=first.init_weights if first else "",
        total_steps=starts[-1].event.total_steps if starts else None,
        attempts=[Attempt(started=r.event.time, start_step=r.event.start_step,
                          total_steps=r.event.total_steps, global_step=r.event.global_step, trace_id=r.trace_id)
                  for r in starts],
        resumes=sum(1 for r in starts[1:] if r.event.start_step > 0),
        failures=[Failure(failed=r.event.time, error=r.event.error, will_retry=r.event.will_retry,
                          trace_id=r.trace_id) for r in failures],
        finished=fin.time if fin else None,
        final_loss=fin.final_loss if fin else None, duration_s=fin.duration_s if fin else None,
        final_global_step=fin.global_step if fin else None, checkpoint_uri=fin.checkpoint_uri if fin else "",
        checkpoints_saved=len(saved), trace_ids=list(dict.fromkeys(traces)),
    )


def _dataset(ix: _Index, dataset_id: str, before: datetime | None) -> Dataset | None:
    accepted = ix.accepted.get(dataset_id, [])
    if not accepted:
        return None
    # The acceptance the run trained: the newest one stored before it started.
    earlier = [r for r in accepted if before is None or _aware(r.event.time) <= _aware(before)]
    r = earlier[-1] if earlier else accepted[0]
    e: DatasetAccepted = r.event
    submission = None
    if sub := ix.submitted.get(e.submission_id):
        s: DatasetSubmitted = sub.event
        submission = Submission(
            submission_id=s.id, submitted=s.time, channel=s.channel, submitted_by=s.submitted_by,
            source=s.source, level=s.level, inline=s.rows is not None, uri=s.uri or "", trace_id=sub.trace_id,
        )
    return Dataset(
        dataset_id=e.dataset_id, name=e.name, schema=e.schema, priority=e.priority, num_rows=e.num_rows,
        num_rows_dropped=e.num_rows_dropped, uri=e.uri, report_uri=e.report_uri, submission_id=e.submission_id,
        accepted=e.time, trace_id=r.trace_id, channel=e.channel or (submission.channel if submission else ""),
        submitted_by=e.submitted_by or (submission.submitted_by if submission else ""),
        submission=submission, acceptances=len(accepted),
        trained_in=list(ix.runs_by_dataset.get(dataset_id, [])),
    )


def _hop(ix: _Index, ref: CheckpointRef, decisions: Sequence[DeployDecision]) -> Hop:
    notes: list[str] = []
    saved = ix.saved.get(_norm(ref.uri))
    parsed = parse_checkpoint_uri(ref.uri)
    if saved is not None:
        e: CheckpointSaved = saved.event
        checkpoint = Checkpoint(uri=e.uri, sha256=e.sha256, run_id=e.run_id, step=e.step, global_step=e.global_step,
                                final=e.final, saved=e.time, trace_id=saved.trace_id)
    else:
        run_id = ref.run_id or (parsed[0] if parsed else "")
        checkpoint = Checkpoint(uri=ref.uri, sha256=ref.sha256, run_id=run_id, step=ref.step,
                                global_step=parsed[1] if parsed else None, final=None, saved=None)
        notes.append("its checkpoint.saved is no longer stored")
    run = _run(ix, checkpoint.run_id) if checkpoint.run_id else None
    if run is None:
        notes.append(f"no event of run {checkpoint.run_id or '?'} is stored any more: what it trained on and "
                     "started from is unknown")
    elif not run.attempts:
        notes.append(f"run {run.run_id}'s training.started is no longer stored: what it started from is unknown")
    dataset_id = run.dataset_id if run else saved.event.dataset_id if saved else ""
    first_start = run.attempts[0].started if run and run.attempts else None
    dataset = _dataset(ix, dataset_id, first_start) if dataset_id else None
    if dataset_id and dataset is None:
        notes.append(f"dataset {dataset_id[:12]}'s dataset.accepted is no longer stored")
    elif dataset is not None and dataset.submission is None and dataset.channel not in DIRECT_CHANNELS:
        notes.append(f"submission {dataset.submission_id}'s dataset.submitted is no longer stored")
    deployments = _deployments(ix, checkpoint.sha256, decisions)
    matched = {d.decision.id for d in deployments if d.decision}
    others = [d for d in decisions if checkpoint.sha256 and d.checkpoint_sha256 == checkpoint.sha256
              and d.id not in matched]
    return Hop(checkpoint=checkpoint, run=run, dataset=dataset, scores=_scores(ix, checkpoint.sha256),
               tests=_tests(ix, checkpoint.sha256), deployments=deployments, decisions=others, parent=run.init_weights if run else "", notes=notes)


def _base(ix: _Index, uri: str, decisions: Sequence[DeployDecision]) -> Origin:
    shas = ix.base_shas()
    scores = [s for sha in shas for s in _scores(ix, sha)]
    tests = [t for sha in shas for t in _tests(ix, sha)]
    deployments = sorted((d for sha in shas for d in _deployments(ix, sha, decisions)),
                         key=lambda d: _aware(d.deployed))
    uri = uri or next(iter(ix.base_uris()), "") or (ix.sha_ref[shas[0]].uri if shas else "")
    return Origin(kind="base", uri=uri, note="the base model",
                  scores=scores, tests=tests, deployments=deployments)


def _trace_ids(hops: Sequence[Hop], origin: Origin | None) -> list[str]:
    ids: list[str] = []
    for hop in hops:
        ids += [d.trace_id for d in reversed(hop.deployments)]
        ids += [t.trace_id for t in reversed(hop.tests)]
        ids += [s.trace_id for s in reversed(hop.scores)]
        ids.append(hop.checkpoint.trace_id)
        if hop.run:
            ids += hop.run.trace_ids
        if hop.dataset:
            ids.append(hop.dataset.trace_id)
            if hop.dataset.submission:
                ids.append(hop.dataset.submission.trace_id)
    if origin:
        ids += [d.trace_id for d in origin.deployments] + [t.trace_id for t in origin.tests]
        ids += [s.trace_id for s in origin.scores]
    return [t for t in dict.fromkeys(ids) if t]


# ---------------------------------------------------------------------------- the walk


def build_lineage(records: Iterable[Recorded], model: str | None = None, *, champion: Champion | None = None,
                  decisions: Sequence[DeployDecision] = ()) -> Lineage:
    """The lineage of `model` (default: the served model) from stored messages.

    `records`: what `read_lineage` reads (any others are ignored); `champion`: the champion record
    in KV (without it, the newest `model.deployed` is taken for the served model); `decisions`:
    the deployer's recorded decisions. `model`: a checkpoint sha256 (or a unique prefix of at
    least 8 hex digits), a checkpoint URI, `<run_id>` (its final checkpoint), `<run_id>@<step>`,
    or "base". Raises `UnknownModel` when nothing matches.
    """
    ix = _Index(records)
    query = (model or "").strip()
    served_ref: CheckpointRef | None = None
    if champion is not None:
        served_ref = ix.sha_ref.get(champion.checkpoint_sha256) or CheckpointRef(
            uri=champion.checkpoint_uri, sha256=champion.checkpoint_sha256, run_id=champion.run_id, step=champion.step)
    elif ix.deployed:
        newest = ix.deployed[-1].event
        served_ref = ix.ref(newest.checkpoint_uri, newest.checkpoint_sha256)

    def lineage(ref: CheckpointRef | None, summary: str, hops: list[Hop], origin: Origin | None, *,
                deployed: bool) -> Lineage:
        served = ref is not None and served_ref is not None and ref.sha256 == served_ref.sha256
        return Lineage(query=query, model=ref, served=served or (ref is None and served_ref is None),
                       deployed=deployed, champion=served_ref, summary=summary, hops=hops, origin=origin,
                       trace_ids=_trace_ids(hops, origin), events_read=ix.count)

    if not query and served_ref is None:
        origin = _base(ix, "", decisions)
        return lineage(None, "nothing was ever deployed: inference serves the base model, and there is no lineage",
                       [], origin, deployed=False)
    target = resolve(ix, query) if query else served_ref
    assert target is not None
    if target == "base" or (isinstance(target, CheckpointRef) and target.run_id == BASE_RUN_ID):
        origin = _base(ix, "", decisions)
        shas = ix.base_shas()
        pick = next((s for s in shas if served_ref and s == served_ref.sha256), shas[-1] if shas else "")
        ref = target if isinstance(target, CheckpointRef) else ix.sha_ref.get(pick)
        served = ref is not None and served_ref is not None and ref.sha256 == served_ref.sha256
        state = ("is served" if served else "was served before" if origin.deployments else "was never deployed")
        return lineage(ref, f"the base model {state}: it was trained by no run here, so there is no lineage",
                       [], origin, deployed=bool(origin.deployments))

    hops: list[Hop] = []
    origin: Origin | None = None
    seen: set[str] = set()
    ref: CheckpointRef | None = target
    while ref is not None:
        seen.add(_norm(ref.uri))
        hop = _hop(ix, ref, decisions)
        if hop.run is None and hop.checkpoint.saved is None and not hop.scores and not hop.deployments and hops:
            # Nothing of this checkpoint is stored any more: the chain ends before it.
            origin = Origin(kind="aged_out", uri=ref.uri, run_id=hop.checkpoint.run_id,
                            global_step=hop.checkpoint.global_step,
                            note=f"checkpoint {ref.uri} (run {hop.checkpoint.run_id or '?'}) has no event stored any "
                                 "more (the streams keep 30 days): the lineage before it is unknown")
            break
        hops.append(hop)
        parent = hop.parent
        if not parent:
            origin = Origin(kind="aged_out", uri="", run_id=hop.checkpoint.run_id,
                            note=f"what run {hop.checkpoint.run_id or '?'} started from is no longer stored "
                                 "(the streams keep 30 days): the lineage before it is unknown")
            break
        if _norm(parent) in seen:
            origin = Origin(kind="aged_out", uri=parent, note=f"{parent} appears twice in the chain: stopped there")
            break
        if parse_checkpoint_uri(parent) is None and _norm(parent) not in ix.saved:
            origin = _base(ix, parent, decisions)
            break
        ref = ix.ref(parent)
    summary = _summary(hops, origin, served_ref)
    first = hops[0] if hops else None
    deployed = bool(first and first.deployments)
    return lineage(target, summary, hops, origin, deployed=deployed)


def _summary(hops: Sequence[Hop], origin: Origin | None, served: CheckpointRef | None) -> str:
    if not hops:
        return origin.note if origin else "no lineage"
    top = hops[0]
    c = top.checkpoint
    name = f"checkpoint {c.sha256[:12] or c.uri} (run {c.run_id or '?'}"
    name += f", step {c.step})" if c.step is not None else ")"
    if served is not None and c.sha256 == served.sha256:
        state = "is served"
    elif top.deployments:
        state = "was served before"
    else:
        state = "was never deployed"
    runs = sum(1 for h in hops if h.run)
    datasets = len({h.dataset.dataset_id for h in hops if h.dataset})
    end = ("the base model" if origin and origin.kind == "base"
           else "a checkpoint whose history is no longer stored")
    return (f"{name} {state}; {len(hops)} hop{'s' if len(hops) != 1 else ''} back to {end}: "
            f"{runs} run{'s' if runs != 1 else ''} on {datasets} dataset{'s' if datasets != 1 else ''}")


# ---------------------------------------------------------------------------- reading


class _SubmissionHead(DatasetSubmitted, frozen=True, tag="DatasetSubmitted"):
    """`DatasetSubmitted` whose `rows` stay raw JSON bytes, never parsed into objects."""

    rows: msgspec.Raw = msgspec.Raw(b"null")


_head_decoder = msgspec.json.Decoder(_SubmissionHead)


def _submission_without_rows(data: bytes) -> DatasetSubmitted:
    """A `dataset.submitted` with its inline rows skipped (`rows=[]` when it had some)."""
    head = _head_decoder.decode(data)
    fields = {name: getattr(head, name) for name in head.__struct_fields__ if name != "rows"}
    return DatasetSubmitted(**fields, rows=None if bytes(head.rows) == b"null" else [])


async def read_submissions(bus: Bus, *, idle_timeout_s: float = 5.0) -> list[Recorded]:
    """Every stored `dataset.submitted`, oldest first, as `Recorded` events whose inline rows are
    not kept (`rows=[]` for an inline submission): who sent a dataset, by which channel."""
    return await read_subject(bus, topology.DATASET_SUBMITTED, idle_timeout_s=idle_timeout_s,
                              decode=_submission_without_rows)


async def read_records(bus: Bus) -> tuple[list[Recorded], Champion | None, list[DeployDecision]]:
    """What `build_lineage` needs, read concurrently: the subjects, the submissions, the champion
    and the deployer's decisions."""

    async def kept(key):
        value, _ = await (await bus.record(key)).read()
        return value

    records, submissions, champion, decisions = await asyncio.gather(
        read_history(bus, SUBJECTS), read_submissions(bus), kept(CHAMPION), kept(DEPLOY_DECISIONS),
    )
    return [*records, *submissions], champion, list(decisions.decisions) if decisions else []


async def read_lineage(bus: Bus, model: str | None = None) -> Lineage:
    """The lineage of `model` (default: the served model) from the streams and KV as they are now;
    raises `UnknownModel` when nothing matches `model`."""
    records, champion, decisions = await read_records(bus)
    return build_lineage(records, model, champion=champion, decisions=decisions)
