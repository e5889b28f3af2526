"""Deployer: promotes a scored checkpoint to champion when it is better beyond the noise, and
announces `ModelDeployed`.

Consumes `eval.scored` and decides by the rule in `services.deployer.promotion` (a paired test
on the same items, no regression, never a rolled-back run, never across suites). The champion
pointer (`libs.common.records.CHAMPION`) changes only by compare-and-set, so concurrent
deployers never both win. A redelivered score for the current champion re-announces its
`ModelDeployed` with the same id (JetStream drops the duplicate), which also covers a crash
between the KV write and the publish. Every decision, with its reason, is appended to
`DEPLOY_DECISIONS` (the last `decisions_kept`; GET /decisions, `flywheel history`); a crash
between the champion write and that append loses the entry, never the champion's own reason.

Requests (core NATS, `flywheel deploy`): `control.deployer.deploy` serves a checkpoint scored
on the current suite (the newest score's, looked up in the eval.scored stream);
`control.deployer.rollback` (and POST /rollback) restores the previous champion, announces
`ModelRolledBack` and `ModelDeployed`, and bars the rolled-back champion's run from promotion.
Run with `python -m services.deployer`.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import nats.js.errors
from nats.js import api

from libs.common import topology
from libs.common.artifacts import is_sha256
from libs.common.bus import Bus, Delivery
from libs.common.events import (
    DeployCheckpoint,
    DeployReply,
    EvalScored,
    ModelDeployed,
    ModelRolledBack,
    RollBackDeployment,
    derived_id,
    new_id,
    utcnow,
)
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.records import CHAMPION, DEPLOY_DECISIONS, Champion, DeployDecision, DeployDecisions
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Reply, Service, Subscribe
from services.deployer.api import router
from services.deployer.promotion import (
    Decision,
    NothingToRollBack,
    crowned,
    decide,
    decide_manual,
    rescored,
    rollback_target,
    with_rolled_back,
)
from services.deployer.settings import DeployerSettings

NAME = "deployer"
log = get_logger(NAME)


class Deployer:
    def __init__(self, settings: DeployerSettings, bus: Bus, metrics: ServiceMetrics, champion: Record[Champion],
                 decisions: Record[DeployDecisions]) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.champion = champion
        self.decisions = decisions

    @classmethod
    async def open(cls, rt: ServiceRuntime[DeployerSettings]) -> Deployer:
        return cls(rt.settings, rt.bus, rt.metrics, await rt.bus.record(CHAMPION), await rt.bus.record(DEPLOY_DECISIONS))

    # ------------------------------------------------------------------ scores

    async def on_eval_scored(self, event: EvalScored, delivery: Delivery) -> None:
        s = self.settings

        def choose(champion: Champion | None, revision: int):
            decision = decide(event, champion, alpha=s.alpha, max_level_drop=s.max_level_drop,
                              max_loss_rise=s.max_loss_rise)
            new = self._apply(decision, event, champion, revision)
            return new, (decision, champion, new or champion, revision)

        decision, weighed_against, champion, revision = await self.champion.change(choose)
        await self._conclude(decision, champion, lambda: DeployDecision(
            # A redelivery against the same champion revision is the same decision.
            id=derived_id(NAME, "decision", event.id, revision), time=utcnow(), outcome=decision.outcome,
            reason=decision.reason, checkpoint_uri=event.checkpoint_uri, checkpoint_sha256=event.checkpoint_sha256,
            run_id=event.run_id, suite_version=event.suite_version,
            champion_sha256=weighed_against.checkpoint_sha256 if weighed_against else "",
        ))
        log.info("decided", outcome=decision.outcome, candidate=event.checkpoint_uri, reason=decision.reason)
        self.metrics.events_handled.labels(delivery.subject, decision.outcome).inc()

    @staticmethod
    def _apply(decision: Decision, score: EvalScored, champion: Champion | None, revision: int,
               requested_by: str = "") -> Champion | None:
        """The next champion record for `decision` (None: unchanged)."""
        if decision.outcome == "promoted":
            reason = f"{decision.reason}; requested by {requested_by}" if requested_by else decision.reason
            return crowned(score, champion, reason=reason, now=utcnow(),
                           # Unique per champion change: the checkpoint and the revision it replaces.
                           event_id=derived_id(NAME, "deploy", score.checkpoint_sha256, revision))
        if decision.outcome == "rescored" and champion is not None:
            return rescored(champion, score)
        return None

    async def _conclude(self, decision: Decision, champion: Champion | None,
                        entry: Callable[[], DeployDecision]) -> None:
        """After a decision is stored: announce the champion it serves, and keep the decision
        (re-announcing the champion is no decision of its own)."""
        if decision.outcome in ("promoted", "already_champion"):
            await self.bus.publish(topology.MODEL_DEPLOYED, champion.announcement())
        if decision.outcome != "already_champion":
            await self._record(entry())

    async def _record(self, decision: DeployDecision) -> None:
        """Append `decision` to the kept decisions (once per id), with compare-and-set."""
        keep = self.settings.decisions_kept

        def append(current: DeployDecisions | None, _revision: int) -> tuple[DeployDecisions | None, None]:
            kept = current.decisions if current else []
            if any(d.id == decision.id for d in kept):
                return None, None
            return DeployDecisions(decisions=[*kept, decision][-keep:]), None

        await self.decisions.change(append)

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
        sub = await self.bus.js.subscribe(topology.EVAL_SCORED, stream=stream, ordered_consumer=True,
                                          deliver_policy=api.DeliverPolicy.ALL)
        needle = checkpoint.encode()
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                # A cheap filter before decoding: the sha256 or URI appears in the payload.
                if needle in msg.data and (score := _decoded(msg.data)) and checkpoint in (
                        score.checkpoint_sha256, score.checkpoint_uri):
                    found.append(score)
                if msg.metadata.sequence.stream >= newest.seq or msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return found, current.suite_version if current else None

    async def deploy(self, checkpoint: str, requested_by: str) -> DeployReply:
        """Serve `checkpoint` if it was scored on the current suite (`decide_manual`); announce it."""
        wanted = checkpoint.strip()
        scores, current_suite = await self.scores_of(wanted)

        def choose(champion: Champion | None, revision: int):
            decision, score = decide_manual(scores, current_suite, champion, wanted)
            new = self._apply(decision, score, champion, revision, requested_by) if score else None
            return new, (decision, score, champion, new or champion)

        decision, score, weighed_against, champion = await self.champion.change(choose)
        await self._conclude(decision, champion, lambda: DeployDecision(
            id=new_id(), time=utcnow(), outcome=decision.outcome, reason=decision.reason,
            checkpoint_uri=score.checkpoint_uri if score else ("" if is_sha256(wanted) else wanted),
            checkpoint_sha256=score.checkpoint_sha256 if score else (wanted if is_sha256(wanted) else ""),
            run_id=score.run_id if score else "", suite_version=current_suite or "",
            champion_sha256=weighed_against.checkpoint_sha256 if weighed_against else "",
            requested_by=requested_by,
        ))
        log.info("manual deploy", checkpoint=wanted, outcome=decision.outcome, reason=decision.reason,
                 requested_by=requested_by)
        ok = decision.outcome in ("promoted", "already_champion", "rescored")
        return DeployReply(ok=ok, state=decision.outcome, message=decision.reason,
                           checkpoint_uri=score.checkpoint_uri if score else "",
                           checkpoint_sha256=score.checkpoint_sha256 if score else "")

    async def on_deploy_request(self, request: DeployCheckpoint, subject: str) -> DeployReply:
        return await self.deploy(request.checkpoint, request.requested_by)

    # ------------------------------------------------------------------ rollback

    async def rollback(self, requested_by: str) -> Champion:
        """Make the previous champion current again; announce it. The current champion's run is
        never promoted again."""

        async def restore(current: Champion | None, revision: int) -> tuple[Champion, tuple[Champion, Champion]]:
            target = rollback_target(await self.champion.history()) if current else None
            if current is None or target is None:
                raise NothingToRollBack("no earlier champion to roll back to")
            restored = msgspec.structs.replace(
                target,
                deployed_at=utcnow(),
                event_id=derived_id(NAME, "rollback", target.checkpoint_sha256, revision),
                reason=f"rollback requested by {requested_by}: from {current.checkpoint_uri}; "
                       f"run {current.run_id} is never promoted again",
                previous_checkpoint_uri=current.checkpoint_uri,
                kind="rollback",
                rolled_back_runs=with_rolled_back(current.rolled_back_runs, current.run_id),
            )
            return restored, (restored, current)

        restored, previous = await self.champion.change(restore)
        await self.bus.publish(topology.MODEL_ROLLED_BACK, ModelRolledBack(
            id=derived_id(NAME, "rolled-back", restored.event_id),
            checkpoint_uri=restored.checkpoint_uri,
            checkpoint_sha256=restored.checkpoint_sha256,
            rolled_back_from=previous.checkpoint_uri,
            reason=restored.reason,
        ))
        await self.bus.publish(topology.MODEL_DEPLOYED, restored.announcement())
        await self._record(DeployDecision(
            id=derived_id(NAME, "decision", restored.event_id), time=restored.deployed_at, outcome="rolled_back",
            reason=restored.reason, checkpoint_uri=restored.checkpoint_uri,
            checkpoint_sha256=restored.checkpoint_sha256, run_id=restored.run_id,
            suite_version=restored.suite_version, champion_sha256=previous.checkpoint_sha256,
            requested_by=requested_by,
        ))
        log.warning("rolled back", to=restored.checkpoint_uri, rolled_back_from=previous.checkpoint_uri)
        return restored

    async def on_rollback_request(self, request: RollBackDeployment, subject: str) -> DeployReply:
        try:
            restored = await self.rollback(request.requested_by)
        except NothingToRollBack as exc:
            return DeployReply(ok=False, state="refused", message=str(exc))
        return DeployReply(ok=True, state="rolled_back", message=restored.reason,
                           checkpoint_uri=restored.checkpoint_uri, checkpoint_sha256=restored.checkpoint_sha256)


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
    ),
    publications=(
        Publish(topology.MODEL_DEPLOYED, ModelDeployed),
        Publish(topology.MODEL_ROLLED_BACK, ModelRolledBack),
    ),
    replies=(
        Reply(topology.CONTROL_DEPLOYER_DEPLOY, DeployCheckpoint, DeployReply, Deployer.on_deploy_request,
              "deployer serves a checkpoint scored on the current suite (flywheel deploy CHECKPOINT)"),
        Reply(topology.CONTROL_DEPLOYER_ROLLBACK, RollBackDeployment, DeployReply, Deployer.on_rollback_request,
              "deployer restores the previous champion (flywheel deploy --rollback)"),
    ),
    routes=router,
)
