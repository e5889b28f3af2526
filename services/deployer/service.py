"""Deployer: promotes the best scored checkpoint to champion and announces `ModelDeployed`.

Consumes `eval.scored`; the champion pointer (`libs.common.records.CHAMPION`) changes only by
compare-and-set, so concurrent deployers never both win. A redelivered score for the current
champion re-announces its `ModelDeployed` with the same id (JetStream drops the duplicate),
which also covers a crash between the KV write and the publish. Rollback (POST /rollback)
restores the previous champion and announces `ModelRolledBack` and `ModelDeployed`.
Run with `python -m services.deployer`.
"""

from __future__ import annotations

import msgspec

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import EvalScored, ModelDeployed, ModelRolledBack, derived_id, utcnow
from libs.common.http import ServiceMetrics
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.records import CHAMPION, Champion
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Service, Subscribe
from services.deployer.api import router
from services.deployer.promotion import NothingToRollBack, decide, rollback_target
from services.deployer.settings import DeployerSettings

NAME = "deployer"
log = get_logger(NAME)


class Deployer:
    def __init__(self, settings: DeployerSettings, bus: Bus, metrics: ServiceMetrics, champion: Record[Champion]) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.champion = champion

    @classmethod
    async def open(cls, rt: ServiceRuntime[DeployerSettings]) -> Deployer:
        return cls(rt.settings, rt.bus, rt.metrics, await rt.bus.record(CHAMPION))

    async def on_eval_scored(self, event: EvalScored, delivery: Delivery) -> None:
        def choose(champion: Champion | None, revision: int) -> tuple[Champion | None, tuple[str, Champion | None]]:
            decision = decide(
                event, champion, min_gain=self.settings.min_gain, min_loss_gain=self.settings.min_loss_gain
            )
            if decision.already_champion:
                return None, ("already_champion", champion)
            if not decision.promote:
                log.info("kept champion", candidate=event.checkpoint_uri, reason=decision.reason)
                return None, ("kept", None)
            if champion is not None and champion.suite_version != event.suite_version:
                log.warning("suite version changed; champion treated as absent",
                            champion_suite=champion.suite_version, candidate_suite=event.suite_version)
            new = Champion(
                checkpoint_uri=event.checkpoint_uri,
                checkpoint_sha256=event.checkpoint_sha256,
                run_id=event.run_id,
                step=event.step,
                exact_match=event.exact_match,
                val_loss=event.val_loss,
                suite_version=event.suite_version,
                deployed_at=utcnow(),
                # Unique per champion change: the checkpoint and the revision it replaces.
                event_id=derived_id(NAME, "deploy", event.checkpoint_sha256, revision),
                reason=decision.reason,
                previous_checkpoint_uri=champion.checkpoint_uri if champion else "",
            )
            return new, ("promoted", new)

        outcome, champion = await self.champion.change(choose)
        if champion is not None:
            await self.bus.publish(topology.MODEL_DEPLOYED, champion.announcement())
        if outcome == "promoted":
            log.info("promoted", checkpoint=champion.checkpoint_uri, reason=champion.reason)
        self.metrics.events_handled.labels(delivery.subject, outcome).inc()

    async def rollback(self, requested_by: str) -> Champion:
        """Make the previous champion current again; announce it."""

        async def restore(current: Champion | None, revision: int) -> tuple[Champion, tuple[Champion, Champion]]:
            target = rollback_target(await self.champion.history()) if current else None
            if current is None or target is None:
                raise NothingToRollBack("no earlier champion to roll back to")
            restored = msgspec.structs.replace(
                target,
                deployed_at=utcnow(),
                event_id=derived_id(NAME, "rollback", target.checkpoint_sha256, revision),
                reason=f"rollback requested by {requested_by}: from {current.checkpoint_uri}",
                previous_checkpoint_uri=current.checkpoint_uri,
                kind="rollback",
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
        log.warning("rolled back", to=restored.checkpoint_uri, rolled_back_from=previous.checkpoint_uri)
        return restored


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
    routes=router,
)
