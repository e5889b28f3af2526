"""Deployer: decides which checkpoint should be served, has inference load it, and makes it the
champion once a replica serves it.

Consumes `eval.scored` and decides by the rule in `services.deployer.promotion` (a screen on
the selection suite, then a paired test on the confirmation suite at alpha_j for the j-th
confirmation against the champion, its number claimed with compare-and-set in its own record
(`CANDIDATES_TESTED`) before deciding; no regression against the champion or the best champion
so far, never a rolled-back run, never across suites). A promotion,
a manual deploy (`control.deployer.deploy`, `flywheel deploy`) and a rollback
(`control.deployer.rollback`, POST /rollback) all go the same way
(`services.deployer.confirmation`):

1. staged: the deployment is written to KV (`libs.common.records.DEPLOYMENT`) and announced
   with `model.staged`; the champion does not change yet. Requests reply "staged";
2. inference replicas load the checkpoint and report `model.serving` (consumed by a shared
   durable consumer, so a report sent while the deployer was down waits for it);
3. the first ok report naming the staged sha256 makes it final: the champion pointer
   (`libs.common.records.CHAMPION`) changes by compare-and-set, `model.rolled_back` (for a
   rollback) and `model.deployed` are announced, the decision is recorded;
4. a failed load, no report within `confirm_timeout_s`, or a newer deployment instead: the
   champion stays, `model.deploy_failed` says why, and so does the recorded decision.

Each step is one compare-and-set of the deployment record and what follows it is idempotent
(ids from `derived_id`), so a redelivery repeats nothing and a restarted deployer resumes a
staged deployment (announces it again, keeps its deadline) or finishes one a crash interrupted.
A redelivered score for the current champion re-announces its `ModelDeployed` with the same id
(JetStream drops the duplicate). Every decision, with its reason, is appended to
`DEPLOY_DECISIONS` (the last `decisions_kept`; GET /decisions, `flywheel history`).
Run with `python -m services.deployer`.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
import nats.js.errors

from libs.common import topology
from libs.common.artifacts import is_sha256
from libs.common.bus import Bus, Delivery
from libs.common.events import (
    DeployCheckpoint,
    DeploymentKind,
    DeployReply,
    EvalScored,
    ModelDeployed,
    ModelDeployFailed,
    ModelRolledBack,
    ModelServing,
    ModelStaged,
    RollBackDeployment,
    derived_id,
    new_id,
    utcnow,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import Record, RevisionConflict
from libs.common.log import get_logger
from libs.common.records import (
    CANDIDATES_TESTED,
    CHAMPION,
    DEPLOY_DECISIONS,
    DEPLOYMENT,
    CandidatesTested,
    Champion,
    DeployDecision,
    DeployDecisions,
    Deployment,
)
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Reply, Service, Subscribe
from libs.common.stored import stored
from services.deployer.api import router
from services.deployer.confirmation import (
    NotSettled,
    champion_conflict,
    expire,
    failed,
    final_decision,
    replace_staged,
    settle_report,
    staged,
)
from services.deployer.promotion import (
    NothingToRollBack,
    before_the_confirmation,
    before_the_test,
    claim_number,
    crowned,
    decide,
    decide_manual,
    rescored,
    rollback_target,
    rolled_back,
)
from services.deployer.settings import DeployerSettings

NAME = "deployer"
log = get_logger(NAME)

# How often the deadline of a staged deployment is checked.
DEADLINE_CHECK_S = 1.0


class Deployer:
    def __init__(self, settings: DeployerSettings, bus: Bus, metrics: ServiceMetrics, champion: Record[Champion],
                 decisions: Record[DeployDecisions], deployments: Record[Deployment],
                 candidates: Record[CandidatesTested]) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.champion = champion
        self.decisions = decisions
        self.deployments = deployments
        self.candidates = candidates

    @classmethod
    async def open(cls, rt: ServiceRuntime[DeployerSettings]) -> Deployer:
        return cls(rt.settings, rt.bus, rt.metrics, await rt.bus.record(CHAMPION), await rt.bus.record(DEPLOY_DECISIONS),
                   await rt.bus.record(DEPLOYMENT), await rt.bus.record(CANDIDATES_TESTED))

    # ------------------------------------------------------------------ scores

    async def on_eval_scored(self, event: EvalScored, delivery: Delivery) -> None:
        s = self.settings
        # A served deployment's champion record first: decide against what is served.
        await self.settle()

        while True:
            champion, _ = await self.champion.read()
            number = 0
            if (champion is not None and before_the_test(event, champion) is None
                    and before_the_confirmation(event, champion, max_level_drop=s.max_level_drop,
                                                max_loss_rise=s.max_loss_rise) is None):
                # Only a confirmation spends: its number is claimed before deciding.
                number = await self.candidates.change(lambda tested, _rev: claim_number(tested, champion, event))

            def choose(current: Champion | None, revision: int):
                if _reign(current) != _reign(champion):
                    return None, None  # the champion changed since the number was claimed: claim again
                decision = decide(event, current, candidate_number=number or 1, alpha=s.alpha,
                                  max_level_drop=s.max_level_drop, max_loss_rise=s.max_loss_rise)
                new = rescored(current, event) if decision.outcome == "rescored" and current else None
                return new, (decision, revision)

            if (chosen := await self.champion.change(choose)) is not None:
                decision, revision = chosen
                break
        # A redelivery against the same champion on the same suite is the same decision.
        reign = _reign(champion)
        entry = DeployDecision(
            id=derived_id(NAME, "decision", event.id, *reign), time=utcnow(), outcome=decision.outcome,
            reason=decision.reason, checkpoint_uri=event.checkpoint_uri, checkpoint_sha256=event.checkpoint_sha256,
            run_id=event.run_id, suite_version=event.suite_version,
            champion_sha256=champion.checkpoint_sha256 if champion else "",
        )
        if decision.outcome == "promoted":
            await self.stage(derived_id(NAME, "deployment", event.id, *reign), "promotion", crowned(
                event, champion, reason=decision.reason, now=utcnow(),
                # Unique per champion change: the checkpoint and the revision it replaces.
                event_id=derived_id(NAME, "deploy", event.checkpoint_sha256, revision),
            ), champion, entry)
        elif decision.outcome == "already_champion":
            await self.bus.publish(topology.MODEL_DEPLOYED, champion.announcement())
        else:
            await self._record(entry)
        log.info("decided", outcome=decision.outcome, candidate=event.checkpoint_uri, reason=decision.reason)
        self.metrics.events_handled.labels(delivery.subject, decision.outcome).inc()

    async def _record(self, decision: DeployDecision) -> None:
        """Append `decision` to the kept decisions (once per id), with compare-and-set."""
        keep = self.settings.decisions_kept

        def append(current: DeployDecisions | None, _revision: int) -> tuple[DeployDecisions | None, None]:
            kept = current.decisions if current else []
            if any(d.id == decision.id for d in kept):
                return None, None
            return DeployDecisions(decisions=[*kept, decision][-keep:]), None

        await self.decisions.change(append)

    # ------------------------------------------------------------------ staging

    async def stage(self, deployment_id: str, kind: DeploymentKind, candidate: Champion,
                    champion: Champion | None, decision: DeployDecision) -> Deployment:
        """Make `candidate` the newest deployment (a staged one it replaces fails) and announce it
        with `model.staged`. Returns the deployment that stands: this one, or the same checkpoint
        already staged the same way."""
        deployment = staged(
            id=deployment_id, kind=kind, candidate=candidate, champion=champion, now=utcnow(),
            timeout_s=self.settings.confirm_timeout_s,
            # Recorded once, whatever the outcome: keyed by the deployment.
            decision=msgspec.structs.replace(decision, id=derived_id(NAME, "decision", deployment_id)),
        )

        def put(current: Deployment | None, _revision: int) -> tuple[Deployment | None, Deployment]:
            new = replace_staged(current, deployment, utcnow())
            return new, new or current

        while True:
            try:
                standing = await self.deployments.change(put)
                break
            except NotSettled:
                await self.settle()
        await self.settle()  # announces the failure of a deployment this one replaced
        if standing.state == "staged":
            await self.bus.publish(topology.MODEL_STAGED, self._staging(standing))
        log.info("staged", deployment_id=standing.id, kind=standing.kind, checkpoint=standing.candidate.checkpoint_uri,
                 state=standing.state, deadline=standing.deadline.isoformat())
        return standing

    @staticmethod
    def _staging(deployment: Deployment) -> ModelStaged:
        candidate = deployment.candidate
        return ModelStaged(
            id=derived_id(NAME, "staged", deployment.id), deployment_id=deployment.id, kind=deployment.kind,
            checkpoint_uri=candidate.checkpoint_uri, checkpoint_sha256=candidate.checkpoint_sha256,
            run_id=candidate.run_id, step=candidate.step, reason=candidate.reason, deadline=deployment.deadline,
        )

    # ------------------------------------------------------------------ confirmation

    async def on_model_serving(self, report: ModelServing, delivery: Delivery) -> None:
        champion, _ = await self.champion.read()
        now = utcnow()

        def judge(current: Deployment | None, _revision: int) -> tuple[Deployment | None, Deployment | str]:
            outcome = settle_report(current, report, champion, now)
            return (outcome if isinstance(outcome, Deployment) else None), outcome

        outcome = await self.deployments.change(judge)
        if isinstance(outcome, str):
            log.info("serving report ignored", reason=outcome, deployment_id=report.deployment_id,
                     replica=report.replica, ok=report.ok)
        else:
            log.info("deployment resolved", deployment_id=outcome.id, state=outcome.state, reason=outcome.reason,
                     replica=report.replica)
        # Also after an ignored report: a redelivery finishes what a crash interrupted.
        await self.settle()
        self.metrics.events_handled.labels(delivery.subject, outcome.state if isinstance(outcome, Deployment)
                                           else "ignored").inc()

    async def watch_deployments(self, stop: asyncio.Event) -> None:
        """Fail a staged deployment no replica confirmed by its deadline; finish what a crash left.

        At start a staged deployment is announced again (same event id): a replica that missed
        it, or a `model.staged` lost to a crash before publishing, gets it now.
        """
        resumed = False
        while not stop.is_set():
            try:
                if not resumed:
                    await self._resume()
                    resumed = True
                await self._expire()
                await self.settle()
            except (nats.errors.Error, TimeoutError, RevisionConflict) as exc:
                # A NATS hiccup: try again next round. Anything else is a bug and crashes the loop.
                log.warning("deployment check failed; retrying", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEADLINE_CHECK_S)

    async def _resume(self) -> None:
        current, _ = await self.deployments.read()
        if current is not None and current.state == "staged":
            log.info("resuming a staged deployment", deployment_id=current.id,
                     checkpoint=current.candidate.checkpoint_uri, deadline=current.deadline.isoformat())
            await self.bus.publish(topology.MODEL_STAGED, self._staging(current))

    async def _expire(self) -> None:
        now = utcnow()

        def check(current: Deployment | None, _revision: int) -> tuple[Deployment | None, Deployment | None]:
            expired = expire(current, now)
            return expired, expired

        if expired := await self.deployments.change(check):
            log.warning("deployment timed out", deployment_id=expired.id, reason=expired.reason)

    # ------------------------------------------------------------------ outcomes

    async def settle(self) -> None:
        """Do what the newest deployment's outcome implies, once: a served one becomes the champion
        and is announced, a failed one (or one it replaced) is announced as failed; each decision is
        recorded. Safe to repeat and to run in several places at once."""
        current, _ = await self.deployments.read()
        if current is None:
            return
        if current.replaced:
            for earlier in current.replaced:
                await self._announce_failure(earlier)
            await self._forget_replaced({d.id for d in current.replaced})
        if current.state == "staged" or current.settled:
            return
        if current.state == "served" and (conflict := await self._crown(current)):
            current = await self._fail_served(current, conflict)
            if current is None:
                return
        if current.state == "served":
            await self._announce_served(current)
        else:
            await self._announce_failure(current)
        await self._mark_settled(current)

    async def _crown(self, deployment: Deployment) -> str:
        """Make the served deployment's candidate the champion; "" or why it cannot be."""

        def write(current: Champion | None, _revision: int) -> tuple[Champion | None, str]:
            if conflict := champion_conflict(deployment, current):
                return None, conflict
            already = current is not None and current.event_id == deployment.candidate.event_id
            return (None if already else deployment.candidate), ""

        return await self.champion.change(write)

    async def _fail_served(self, deployment: Deployment, conflict: str) -> Deployment | None:
        """A served deployment whose champion record cannot be written after all: failed instead
        (None: the record is another deployment's by now, nothing left to do for this one)."""
        log.error("served deployment cannot become the champion", deployment_id=deployment.id, reason=conflict)

        def fail(current: Deployment | None, _revision: int) -> tuple[Deployment | None, Deployment | None]:
            if current is None or current.id != deployment.id:
                return None, None
            if current.state != "served":
                return None, current
            changed = failed(current, conflict, utcnow())
            return changed, changed

        return await self.deployments.change(fail)

    async def _announce_served(self, deployment: Deployment) -> None:
        champion = deployment.candidate
        if deployment.kind == "rollback":
            await self.bus.publish(topology.MODEL_ROLLED_BACK, ModelRolledBack(
                id=derived_id(NAME, "rolled-back", champion.event_id),
                checkpoint_uri=champion.checkpoint_uri,
                checkpoint_sha256=champion.checkpoint_sha256,
                rolled_back_from=champion.previous_checkpoint_uri,
                reason=champion.reason,
            ))
        await self.bus.publish(topology.MODEL_DEPLOYED, champion.announcement())
        await self._record(final_decision(deployment))
        log.info("deployed", deployment_id=deployment.id, kind=deployment.kind, checkpoint=champion.checkpoint_uri,
                 served_by=deployment.served_by)

    async def _announce_failure(self, deployment: Deployment) -> None:
        await self.bus.publish(topology.MODEL_DEPLOY_FAILED, ModelDeployFailed(
            id=derived_id(NAME, "deploy-failed", deployment.id), deployment_id=deployment.id, kind=deployment.kind,
            checkpoint_uri=deployment.candidate.checkpoint_uri, checkpoint_sha256=deployment.checkpoint_sha256,
            reason=deployment.reason,
        ))
        await self._record(final_decision(deployment))
        log.warning("deployment failed; the champion stays", deployment_id=deployment.id, kind=deployment.kind,
                    checkpoint=deployment.candidate.checkpoint_uri, reason=deployment.reason)

    async def _forget_replaced(self, announced: set[str]) -> None:
        def drop(current: Deployment | None, _revision: int) -> tuple[Deployment | None, None]:
            if current is None or not any(d.id in announced for d in current.replaced):
                return None, None
            return msgspec.structs.replace(current, replaced=[d for d in current.replaced if d.id not in announced]), None

        await self.deployments.change(drop)

    async def _mark_settled(self, deployment: Deployment) -> None:
        def mark(current: Deployment | None, _revision: int) -> tuple[Deployment | None, None]:
            if current is None or current.id != deployment.id or current.state != deployment.state or current.settled:
                return None, None
            return msgspec.structs.replace(current, settled=True), None

        await self.deployments.change(mark)

    # ------------------------------------------------------------------ manual deploy

    async def scores_of(self, checkpoint: str) -> tuple[list[EvalScored], str | None]:
        """Every score of `checkpoint` (sha256 or URI) in the eval.scored stream, oldest first, and
        the current suite: the newest score's (None when nothing was scored yet)."""
        stream = topology.stream_for(topology.EVAL_SCORED)
        try:
            newest = await self.bus.js.get_last_msg(stream, topology.EVAL_SCORED)
        except nats.js.errors.NotFoundError:
            return [], None
        current = _decoded(newest.data)
        found: list[EvalScored] = []
        needle = checkpoint.encode()
        async for msg in stored(self.bus.js, stream, topology.EVAL_SCORED):
            # A cheap filter before decoding: the sha256 or URI appears in the payload.
            if needle in msg.data and (score := _decoded(msg.data)) and checkpoint in (
                    score.checkpoint_sha256, score.checkpoint_uri):
                found.append(score)
        return found, current.suite_version if current else None

    async def deploy(self, checkpoint: str, requested_by: str) -> DeployReply:
        """Stage `checkpoint` if it was scored on the current suite (`decide_manual`)."""
        wanted = checkpoint.strip()
        scores, current_suite = await self.scores_of(wanted)
        await self.settle()

        def choose(champion: Champion | None, revision: int):
            decision, score = decide_manual(scores, current_suite, champion, wanted)
            new = rescored(champion, score) if decision.outcome == "rescored" and champion and score else None
            return new, (decision, score, champion, revision)

        decision, score, champion, revision = await self.champion.change(choose)
        entry = DeployDecision(
            id=new_id(), time=utcnow(), outcome=decision.outcome, reason=decision.reason,
            checkpoint_uri=score.checkpoint_uri if score else ("" if is_sha256(wanted) else wanted),
            checkpoint_sha256=score.checkpoint_sha256 if score else (wanted if is_sha256(wanted) else ""),
            run_id=score.run_id if score else "", suite_version=current_suite or "",
            champion_sha256=champion.checkpoint_sha256 if champion else "", requested_by=requested_by,
        )
        log.info("manual deploy", checkpoint=wanted, outcome=decision.outcome, reason=decision.reason,
                 requested_by=requested_by)
        if decision.outcome == "promoted":
            deployment = await self.stage(new_id(), "manual", crowned(
                score, champion, reason=f"{decision.reason}; requested by {requested_by}", now=utcnow(),
                event_id=derived_id(NAME, "deploy", score.checkpoint_sha256, revision),
            ), champion, entry)
            return _staged_reply(deployment, decision.reason)
        if decision.outcome == "already_champion":
            await self.bus.publish(topology.MODEL_DEPLOYED, champion.announcement())
        else:
            await self._record(entry)
        return DeployReply(ok=decision.outcome in ("already_champion", "rescored"), state=decision.outcome,
                           message=decision.reason, checkpoint_uri=score.checkpoint_uri if score else "",
                           checkpoint_sha256=score.checkpoint_sha256 if score else "")

    async def on_deploy_request(self, request: DeployCheckpoint, subject: str) -> DeployReply:
        return await self.deploy(request.checkpoint, request.requested_by)

    # ------------------------------------------------------------------ rollback

    async def rollback(self, requested_by: str) -> Deployment:
        """Stage the previous champion again; once served, the current champion's run is never
        promoted again."""
        await self.settle()
        current, revision = await self.champion.read()
        target = rollback_target(await self.champion.history()) if current else None
        if current is None or target is None:
            raise NothingToRollBack("no earlier champion to roll back to")
        restored = rolled_back(
            target, current, now=utcnow(),
            event_id=derived_id(NAME, "rollback", target.checkpoint_sha256, revision),
            reason=f"rollback requested by {requested_by}: from {current.checkpoint_uri}; "
                   f"run {current.run_id} is never promoted again",
        )
        deployment = await self.stage(new_id(), "rollback", restored, current, DeployDecision(
            id="", time=restored.deployed_at, outcome="rolled_back", reason=restored.reason,
            checkpoint_uri=restored.checkpoint_uri, checkpoint_sha256=restored.checkpoint_sha256,
            run_id=restored.run_id, suite_version=restored.suite_version, champion_sha256=current.checkpoint_sha256,
            requested_by=requested_by,
        ))
        log.warning("rollback staged", to=restored.checkpoint_uri, rolled_back_from=current.checkpoint_uri,
                    deployment_id=deployment.id)
        return deployment

    async def on_rollback_request(self, request: RollBackDeployment, subject: str) -> DeployReply:
        try:
            deployment = await self.rollback(request.requested_by)
        except NothingToRollBack as exc:
            return DeployReply(ok=False, state="refused", message=str(exc))
        return _staged_reply(deployment, deployment.candidate.reason)


def _reign(champion: Champion | None) -> tuple[str, ...]:
    """What a decision is made against: one champion record on one suite."""
    return (champion.event_id, champion.suite_version) if champion else ()


def _staged_reply(deployment: Deployment, reason: str) -> DeployReply:
    return DeployReply(
        ok=True, state="staged", deployment_id=deployment.id,
        message=f"{reason}; staged as deployment {deployment.id}: final once an inference replica serves it "
                f"(by {deployment.deadline:%H:%M:%S} UTC; see flywheel history)",
        checkpoint_uri=deployment.candidate.checkpoint_uri, checkpoint_sha256=deployment.checkpoint_sha256,
    )


def _decoded(data: bytes) -> EvalScored | None:
    try:
        return msgspec.json.decode(data, type=EvalScored)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


SERVICE = Service(
    name=NAME,
    settings=DeployerSettings,
    build=Deployer.open,
    subscriptions=(
        Subscribe(topology.EVAL_SCORED, EvalScored, Deployer.on_eval_scored, consumers=(topology.DEPLOYER,)),
        Subscribe(topology.MODEL_SERVING, ModelServing, Deployer.on_model_serving,
                  consumers=(topology.DEPLOYER_SERVING,)),
    ),
    publications=(
        Publish(topology.MODEL_STAGED, ModelStaged),
        Publish(topology.MODEL_DEPLOYED, ModelDeployed),
        Publish(topology.MODEL_DEPLOY_FAILED, ModelDeployFailed),
        Publish(topology.MODEL_ROLLED_BACK, ModelRolledBack),
    ),
    replies=(
        Reply(topology.CONTROL_DEPLOYER_DEPLOY, DeployCheckpoint, DeployReply, Deployer.on_deploy_request,
              "deployer stages a checkpoint scored on the current suite (flywheel deploy CHECKPOINT)"),
        Reply(topology.CONTROL_DEPLOYER_ROLLBACK, RollBackDeployment, DeployReply, Deployer.on_rollback_request,
              "deployer stages the previous champion again (flywheel deploy --rollback)"),
    ),
    routes=router,
    loops=(Deployer.watch_deployments,),
)
