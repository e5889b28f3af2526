"""Deployer: promotes the best scored checkpoint to champion and announces `ModelDeployed`.

Consumes `eval.scored`; the champion pointer lives in KV (`champion`/`current`) and changes
only by compare-and-set, so concurrent deployers never both win. A redelivered score for the
current champion re-announces its `ModelDeployed` with the same id (JetStream drops the
duplicate), which also covers a crash between the KV write and the publish. Rollback
(POST /rollback) restores the previous champion and announces `ModelRolledBack` and
`ModelDeployed`. Run with `python -m services.deployer`.
"""

from __future__ import annotations

import uuid

import msgspec

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import EvalScored, ModelRolledBack, utcnow
from libs.common.http import ServiceMetrics
from libs.common.log import get_logger
from libs.common.runtime import ServiceRuntime, run_service
from libs.common.settings import CommonSettings, SettingsError
from services.deployer.api import add_routes
from services.deployer.champion import ChampionBoard, ChampionChanged, NothingToRollBack
from services.deployer.promotion import Champion, decide, rollback_target

log = get_logger("deployer")
# Ids: uuid5 of (checkpoint sha256, the KV revision it replaces), unique per champion change.
DEPLOY_NAMESPACE = uuid.UUID("0b7c2f4e-8d1a-4f3b-9c65-2a4e1d7f9b31")
# Each conflict means another deployer changed the champion; after this many in a row,
# fail and let redelivery try later rather than spin.
MAX_CAS_ATTEMPTS = 20


class DeployerSettings(CommonSettings):
    http_port: int = 0
    # Promote only when exact match beats the champion's by more than this.
    min_gain: float = 0.0
    # On an exact-match tie, promote only when val_loss is lower by more than this.
    min_loss_gain: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_gain < 0 or self.min_loss_gain < 0:
            raise SettingsError(f"min_gain and min_loss_gain must be >= 0, got {self.min_gain}, {self.min_loss_gain}")


class Deployer:
    def __init__(self, bus: Bus, board: ChampionBoard, settings: DeployerSettings, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.board = board
        self.settings = settings
        self.metrics = metrics

    async def handle(self, event: EvalScored, delivery: Delivery) -> None:
        for _ in range(MAX_CAS_ATTEMPTS):
            champion, revision = await self.board.read()
            decision = decide(
                event, champion, min_gain=self.settings.min_gain, min_loss_gain=self.settings.min_loss_gain
            )
            if decision.already_champion:
                await self.bus.publish(topology.MODEL_DEPLOYED, champion.announcement())
                self.metrics.events_handled.labels(delivery.subject, "already_champion").inc()
                return
            if not decision.promote:
                log.info("kept champion", candidate=event.checkpoint_uri, reason=decision.reason)
                self.metrics.events_handled.labels(delivery.subject, "kept").inc()
                return
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
                event_id=uuid.uuid5(DEPLOY_NAMESPACE, f"deploy:{event.checkpoint_sha256}:{revision}").hex,
                reason=decision.reason,
                previous_checkpoint_uri=champion.checkpoint_uri if champion else "",
            )
            try:
                await self.board.write(new, revision)
            except ChampionChanged:
                log.info("champion changed while deciding; deciding again", candidate=event.checkpoint_uri)
                continue
            await self.bus.publish(topology.MODEL_DEPLOYED, new.announcement())
            self.metrics.events_handled.labels(delivery.subject, "promoted").inc()
            log.info("promoted", checkpoint=new.checkpoint_uri, reason=new.reason)
            return
        raise RuntimeError(f"champion kept changing: {MAX_CAS_ATTEMPTS} compare-and-set conflicts in a row")

    async def rollback(self, requested_by: str) -> Champion:
        """Make the previous champion current again; announce it."""
        for _ in range(MAX_CAS_ATTEMPTS):
            current, revision = await self.board.read()
            target = rollback_target(await self.board.history()) if current else None
            if current is None or target is None:
                raise NothingToRollBack("no earlier champion to roll back to")
            reason = f"rollback requested by {requested_by}: from {current.checkpoint_uri}"
            restored = msgspec.structs.replace(
                target,
                deployed_at=utcnow(),
                event_id=uuid.uuid5(DEPLOY_NAMESPACE, f"rollback:{target.checkpoint_sha256}:{revision}").hex,
                reason=reason,
                previous_checkpoint_uri=current.checkpoint_uri,
                kind="rollback",
            )
            try:
                await self.board.write(restored, revision)
            except ChampionChanged:
                continue
            await self.bus.publish(topology.MODEL_ROLLED_BACK, ModelRolledBack(
                id=uuid.uuid5(DEPLOY_NAMESPACE, f"rolled-back:{target.checkpoint_sha256}:{revision}").hex,
                checkpoint_uri=restored.checkpoint_uri,
                checkpoint_sha256=restored.checkpoint_sha256,
                rolled_back_from=current.checkpoint_uri,
                reason=reason,
            ))
            await self.bus.publish(topology.MODEL_DEPLOYED, restored.announcement())
            log.warning("rolled back", to=restored.checkpoint_uri, rolled_back_from=current.checkpoint_uri)
            return restored
        raise RuntimeError(f"champion kept changing: {MAX_CAS_ATTEMPTS} compare-and-set conflicts in a row")


async def start(rt: ServiceRuntime[DeployerSettings]) -> None:
    board = ChampionBoard(await rt.bus.kv(topology.CHAMPION_BUCKET))
    deployer = Deployer(rt.bus, board, rt.settings, rt.metrics)
    add_routes(rt.app, deployer)
    rt.spawn(rt.bus.consume(topology.DEPLOYER, EvalScored, deployer.handle, rt.stop), "consume")


def main() -> None:
    run_service("deployer", DeployerSettings, start)
