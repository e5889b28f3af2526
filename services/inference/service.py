"""The inference service: serve the champion over an OpenAI-compatible API and follow deployments.

Every replica must see every deployment, so `model.deployed` is declared `every_replica`: an
ordered consumer of this process alone, bound before the service is built. The build then
loads the champion named in KV (or the base model when none was deployed yet); a deployment
published meanwhile is delivered after that first load, so the newest one wins.

Run: `FLYWHEEL_NATS_URL=nats://... FLYWHEEL_DATA_DIR=data python -m services.inference`
"""

from __future__ import annotations

from libs.common import topology
from libs.common.bus import Delivery
from libs.common.events import ModelDeployed
from libs.common.kv import Record
from libs.common.log import get_logger
from libs.common.models import ensure_base_model
from libs.common.records import CHAMPION, Champion
from libs.common.runtime import ServiceRuntime
from libs.common.service import Service, Subscribe
from libs.common.tracing import tracer
from services.inference.api import router
from services.inference.auth import resolve_api_key
from services.inference.champion import ChampionError, read_champion, target_for_event
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelInfo, ModelServer, ReloadFailed
from services.inference.settings import InferenceSettings
from services.inference.transformers_backend import TransformersBackend

NAME = "inference"
log = get_logger(NAME)


class Inference:
    def __init__(self, server: ModelServer, champion: Record[Champion], api_key: str, metrics: InferenceMetrics) -> None:
        self.server = server
        self.champion = champion
        self.api_key = api_key
        self.metrics = metrics

    @classmethod
    async def open(cls, rt: ServiceRuntime[InferenceSettings]) -> Inference:
        settings = rt.settings
        metrics = InferenceMetrics(rt.metrics)
        server = ModelServer(
            store=rt.store,
            base_model=lambda: ensure_base_model(settings.data_dir, settings.base_model),
            backend_factory=lambda: TransformersBackend(settings.device),
            metrics=metrics,
            model_name=settings.model_name,
            max_tokens_limit=settings.max_tokens_limit,
        )
        api_key = resolve_api_key(settings.api_key, settings.api_key_file, settings.data_dir)
        inference = cls(server, await rt.bus.record(CHAMPION), api_key, metrics)
        with tracer().start_as_current_span("champion sync"):
            try:
                await inference.reload(False)
            except (ReloadFailed, ChampionError) as exc:
                log.error("no model could be loaded at start; not ready until a deployment loads", error=str(exc))
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

    def readiness(self) -> dict:
        return {"model": lambda: self.server.current is not None}

    async def close(self) -> None:
        await self.server.close()


SERVICE = Service(
    name=NAME,
    settings=InferenceSettings,
    build=Inference.open,
    subscriptions=(
        Subscribe(topology.MODEL_DEPLOYED, ModelDeployed, Inference.on_model_deployed, every_replica=True,
                  summary="inference follows deployments: every replica loads every new champion"),
    ),
    routes=router,
    readiness=Inference.readiness,
    close=Inference.close,
)
