"""The inference service: serve the champion over an OpenAI-compatible API and follow deployments.

At start it subscribes to `model.deployed`, then loads the champion named in the KV bucket
(or the base model when none was deployed yet). Every replica must see every deployment, so
deployments arrive on an ephemeral ordered JetStream consumer delivering only new messages,
not on a shared durable one.

Run: `FLYWHEEL_NATS_URL=nats://... FLYWHEEL_DATA_DIR=data python -m services.inference`
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.subscription import Subscription
from nats.js import api
from opentelemetry.trace import SpanKind

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import ModelDeployed
from libs.common.log import get_logger
from libs.common.models import ensure_base_model
from libs.common.runtime import ServiceRuntime, run_service
from libs.common.tracing import extract_context, tracer
from services.inference.api import add_routes
from services.inference.auth import resolve_api_key
from services.inference.champion import ChampionError, read_champion, target_for_event
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelInfo, ModelServer, ReloadFailed
from services.inference.settings import InferenceSettings
from services.inference.transformers_backend import TransformersBackend

NAME = "inference"
log = get_logger(NAME)


async def start(rt: ServiceRuntime[InferenceSettings]) -> None:
    settings = rt.settings
    assert rt.bus is not None
    api_key = resolve_api_key(settings.api_key, settings.api_key_file, settings.data_dir)
    metrics = InferenceMetrics(rt.metrics)
    server = ModelServer(
        store=ArtifactStore(Path(settings.data_dir) / "artifacts"),
        base_model=lambda: ensure_base_model(settings.data_dir, settings.base_model),
        backend_factory=lambda: TransformersBackend(settings.device),
        metrics=metrics,
        model_name=settings.model_name,
        max_tokens_limit=settings.max_tokens_limit,
    )
    rt.on_shutdown(server.close)
    rt.checks["model"] = lambda: server.current is not None
    kv = await rt.bus.kv(topology.CHAMPION_BUCKET)

    async def reload(force: bool) -> ModelInfo:
        return await server.deploy(await read_champion(kv), force=force)

    add_routes(rt.app, server, api_key=api_key, reload=reload, metrics=metrics)

    # Subscribe first, then read the KV: a deployment in between is seen by one or the other.
    # The loop starts only after this first load, so a deployment buffered meanwhile is applied
    # after it and the newest one wins.
    subscription, seen_seq = await _subscribe(rt.bus)
    with tracer().start_as_current_span("champion sync"):
        try:
            await reload(False)
        except (ReloadFailed, ChampionError) as exc:
            log.error("no model could be loaded at start; not ready until a deployment loads", error=str(exc))
    rt.spawn(_follow(subscription, seen_seq, server, rt.stop), "deployments")


async def _subscribe(bus: Bus) -> tuple[Subscription, int]:
    stream = topology.stream_for(topology.MODEL_DEPLOYED)
    # Stream sequences up to here are history (covered by the KV read). An ordered consumer
    # that resets before its first message restarts from sequence 1; this bound skips the replay.
    seen_seq = (await bus.js.stream_info(stream)).state.last_seq
    subscription = await bus.js.subscribe(
        topology.MODEL_DEPLOYED, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW
    )
    return subscription, seen_seq


async def _follow(subscription: Subscription, seen_seq: int, server: ModelServer, stop: asyncio.Event) -> None:
    try:
        while not stop.is_set():
            try:
                msg = await subscription.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            sequence = msg.metadata.sequence.stream
            if sequence <= seen_seq:
                continue
            seen_seq = sequence
            await _on_deployed(msg.subject, msg.data, dict(msg.headers or {}), server)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()


async def _on_deployed(subject: str, data: bytes, headers: dict[str, str], server: ModelServer) -> None:
    with tracer().start_as_current_span(
        f"{subject} process", context=extract_context(headers), kind=SpanKind.CONSUMER,
        attributes={"messaging.destination.name": subject, "flywheel.event_id": headers.get("ce-id", "")},
    ):
        try:
            event = msgspec.json.decode(data, type=ModelDeployed)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("ignoring an undecodable deployment", subject=subject, error=str(exc))
            return
        log.info("model deployed", event_id=event.id, uri=event.checkpoint_uri)
        try:
            await server.deploy(target_for_event(event))
        except ReloadFailed:
            pass  # logged and counted by the server; the previous model keeps serving


def main() -> None:
    run_service(NAME, InferenceSettings, start)
