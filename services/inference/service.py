"""The inference service: serve the champion over an OpenAI-compatible API and follow deployments.

Every replica must see every deployment, so its subscriptions are declared `every_replica`: an
ordered consumer of this process alone, bound before the service is built. The build then
loads the champion named in KV (or the base model when none was deployed yet); a deployment
published meanwhile is delivered after that first load, so the newest one wins.

A deployment is final only once inference serves it (services/deployer/confirmation.py):
- `model.staged`: load the checkpoint (its sha256 verified, a token generated) and answer on
  `model.serving` with the sha256 the loaded model reports, or ok=False and why it failed (the
  previous model keeps serving). A deployment that is no longer the deployer's newest
  (`libs.common.records.DEPLOYMENT`) is not loaded, or, if it stopped being so during the
  load, is withdrawn and not reported;
- `model.deploy_failed`: a replica serving (or loading) the failed checkpoint goes back to the
  champion in KV;
- `model.deployed`: the new champion; a replica that missed its `model.staged` catches up.

Run: `FLYWHEEL_NATS_URL=nats://... FLYWHEEL_DATA_DIR=data python -m services.inference`
"""

from __future__ import annotations

import os
import socket

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import (
    ModelDeployed,
    ModelDeployFailed,
    ModelServing,
    ModelStaged,
    derived_id,
)
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.models import ensure_base_model
from libs.common.records import CHAMPION, DEPLOYMENT, Champion, Deployment
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Service, Subscribe
from libs.common.tracing import tracer
from services.inference.api import router
from services.inference.auth import KeyTable, resolve_api_keys
from services.inference.backends import choose_backend, make_backend
from services.inference.champion import (
    ChampionError,
    ModelTarget,
    read_champion,
    target_for_deployment,
    target_for_event,
)
from services.inference.metrics import InferenceMetrics
from services.inference.protocol import RequestError
from services.inference.serving import ModelInfo, ModelServer, ReloadFailed
from services.inference.settings import InferenceSettings

NAME = "inference"
log = get_logger(NAME)


class Inference:
    def __init__(self, server: ModelServer, champion: Record[Champion], keys: KeyTable, metrics: InferenceMetrics,
                 *, bus: Bus, deployments: Record[Deployment], replica: str) -> None:
        self.server = server
        self.champion = champion
        self.keys = keys
        self.metrics = metrics
        self.bus = bus
        self.deployments = deployments
        self.replica = replica

    @classmethod
    async def open(cls, rt: ServiceRuntime[InferenceSettings]) -> Inference:
        settings = rt.settings
        # A backend that cannot run here (vllm without a GPU) stops the service now, naming the setting.
        log.info("generation engine", backend=choose_backend(settings.backend, settings.device))
        metrics = InferenceMetrics(rt.metrics)
        server = ModelServer(
            store=rt.store,
            base_model=lambda: ensure_base_model(settings.data_dir, settings.base_model),
            backend_factory=lambda: make_backend(
                settings.backend, settings.device, max_batch_requests=settings.max_batch_requests,
                max_batch_tokens=settings.max_batch_tokens, kv_cache_tokens=settings.kv_cache_tokens),
            metrics=metrics,
            model_name=settings.model_name,
            max_tokens_limit=settings.max_tokens_limit,
            max_pending=settings.max_pending,
            request_timeout_s=settings.request_timeout_s,
        )
        keys = resolve_api_keys(settings.api_key, settings.api_key_file, settings.api_keys_file, settings.data_dir)
        inference = cls(server, await rt.bus.record(CHAMPION), keys, metrics, bus=rt.bus,
                        deployments=await rt.bus.record(DEPLOYMENT),
                        replica=settings.replica_id or f"{socket.gethostname()}-{os.getpid()}")
        with tracer().start_as_current_span("champion sync"):
            try:
                await inference.reload(False)
            except (ReloadFailed, ChampionError) as exc:
                log.error("no model could be loaded at start; not ready until a deployment loads", error=str(exc))
        await inference.resume_staged()
        return inference

    async def reload(self, force: bool) -> ModelInfo:
        """Serve the champion in KV (the base model if none); `force` reloads it even if unchanged."""
        return await self.server.deploy(await read_champion(self.champion), force=force)

    async def on_model_deployed(self, event: ModelDeployed, delivery: Delivery) -> None:
        log.info("model deployed", event_id=event.id, uri=event.checkpoint_uri)
        try:
            await self.server.deploy(target_for_event(event))
        except ReloadFailed:
            pass  # logged and counted by the server; the previous model keeps serving

    # ------------------------------------------------------------------ confirming deployments

    async def on_model_staged(self, event: ModelStaged, delivery: Delivery) -> None:
        log.info("model staged", deployment_id=event.deployment_id, uri=event.checkpoint_uri, kind=event.kind)
        await self._stage(event.deployment_id, target_for_event(event))

    async def resume_staged(self) -> None:
        """Load the deployer's staged deployment, if one waits: its `model.staged` went out before
        this replica's consumer began (the replica was down, or died loading it), and the deployer
        waits for a report until the deadline. Without this a replica restarted mid-deployment
        never reports and the deployment fails by timeout."""
        newest, _ = await self.deployments.read()
        if newest is not None and newest.state == "staged":
            log.info("a deployment is staged; loading it", deployment_id=newest.id,
                     uri=newest.candidate.checkpoint_uri, kind=newest.kind)
            await self._stage(newest.id, target_for_deployment(newest))

    async def _stage(self, deployment_id: str, target: ModelTarget) -> None:
        if not await self._still_wanted(deployment_id):
            log.info("staged deployment is no longer the newest; not loading it", deployment_id=deployment_id)
            return
        try:
            info = await self.server.deploy(target)
        except ReloadFailed as exc:
            await self._report(deployment_id, ok=False, reason=str(exc))
            return
        if not await self._still_wanted(deployment_id):
            log.info("deployment failed or was replaced while loading; back to the champion",
                     deployment_id=deployment_id)
            await self._withdraw(target.sha256)
            return
        await self._report(deployment_id, ok=True, info=info)

    async def on_deploy_failed(self, event: ModelDeployFailed, delivery: Delivery) -> None:
        log.info("deployment failed", deployment_id=event.deployment_id, uri=event.checkpoint_uri, reason=event.reason)
        await self._withdraw(event.checkpoint_sha256)

    async def _still_wanted(self, deployment_id: str) -> bool:
        """Whether `deployment_id` is the deployer's newest deployment, staged or served."""
        newest, _ = await self.deployments.read()
        return newest is not None and newest.id == deployment_id and newest.state in ("staged", "served")

    async def _withdraw(self, sha256: str) -> None:
        try:
            if info := await self.server.withdraw(sha256, lambda: read_champion(self.champion)):
                log.info("withdrew a failed deployment; serving the champion", withdrawn=sha256, serving=info.id)
        except (ReloadFailed, ChampionError) as exc:
            log.error("could not go back to the champion; the withdrawn checkpoint keeps serving", error=str(exc))

    async def _report(self, deployment_id: str, *, ok: bool, info: ModelInfo | None = None, reason: str = "") -> None:
        """Tell the deployer what this replica serves now (a staged checkpoint, or still its previous model)."""
        serving = info or (self.server.current.info if self.server.current else None)
        await self.bus.publish(topology.MODEL_SERVING, ModelServing(
            id=derived_id(NAME, "serving", deployment_id, self.replica), deployment_id=deployment_id,
            replica=self.replica, ok=ok, checkpoint_sha256=serving.sha256 if serving else "",
            checkpoint_uri=serving.uri if serving else "", reason=reason,
        ))
        log.info("reported serving", deployment_id=deployment_id, ok=ok, reason=reason,
                 sha256=serving.sha256 if serving else "")

    def readiness(self) -> dict:
        # Loaded, and its engine's loop alive (a fatal engine error makes the replica unready).
        return {"model": lambda: self.server.current is not None and self.server.current.backend.healthy}

    async def close(self) -> None:
        await self.server.close()


SERVICE = Service(
    name=NAME,
    settings=InferenceSettings,
    build=Inference.open,
    subscriptions=(
        Subscribe(topology.MODEL_STAGED, ModelStaged, Inference.on_model_staged, every_replica=True,
                  summary="inference loads a staged checkpoint on every replica and reports on model.serving"),
        Subscribe(topology.MODEL_DEPLOYED, ModelDeployed, Inference.on_model_deployed, every_replica=True,
                  summary="inference follows deployments: every replica loads every new champion"),
        Subscribe(topology.MODEL_DEPLOY_FAILED, ModelDeployFailed, Inference.on_deploy_failed, every_replica=True,
                  summary="inference on every replica goes back to the champion from a failed deployment"),
    ),
    publications=(
        Publish(topology.MODEL_SERVING, ModelServing),
    ),
    routes=router,
    errors=RequestError,
    readiness=Inference.readiness,
    close=Inference.close,
)
