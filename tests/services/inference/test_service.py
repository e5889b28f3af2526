"""The whole service against a real nats-server, over real HTTP (uvicorn): champion, reloads, auth,
and its part in a deployment: load a staged checkpoint, report what it serves, withdraw a failed one."""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import Artifact, ArtifactStore
from libs.common.bus import Bus
from libs.common.events import (
    ModelDeployed,
    ModelDeployFailed,
    ModelServing,
    ModelStaged,
)
from libs.common.models import load_model
from libs.common.records import (
    CHAMPION,
    DEPLOYMENT,
    Champion,
    DeployDecision,
    Deployment,
)
from libs.common.tracing import current_trace_id, setup_tracing, tracer
from services.inference.auth import GENERATED_KEY_PATH
from services.inference.settings import InferenceSettings
from tests.conftest import wait_for
from tests.services.inference.conftest import free_port, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = 950  # tokens: a generation that takes a second or two on the tiny model
HELLO = [{"role": "user", "content": "Hello, how can I help you today?"}]


def make_checkpoint(store: ArtifactStore, base: Path, name: str, *, reinit_seed: int | None = None) -> Artifact:
    """A checkpoint directory in the store: the base model, optionally with layer 0 re-initialised."""
    import torch

    target = store.location("checkpoints", name)
    shutil.copytree(base, target)
    if reinit_seed is not None:
        model = load_model(target, "cpu")
        torch.manual_seed(reinit_seed)
        with torch.no_grad():
            for param in model.model.layers[0].parameters():
                param.normal_(0.0, 0.05)
        model.save_pretrained(target)
    return store.describe_dir(target)


def deployed(checkpoint: Artifact, run_id: str, step: int) -> ModelDeployed:
    return ModelDeployed(checkpoint_uri=checkpoint.uri, checkpoint_sha256=checkpoint.sha256, run_id=run_id,
                         step=step, exact_match=0.5, val_loss=1.0, reason="test")


async def put_champion(bus: Bus, checkpoint: Artifact, run_id: str, step: int) -> None:
    """The record as the deployer writes it."""
    record = await bus.record(CHAMPION)
    await record.put(Champion(
        checkpoint_uri=checkpoint.uri, checkpoint_sha256=checkpoint.sha256, run_id=run_id, step=step,
        exact_match=0.5, val_loss=1.0, suite_version="s", deployed_at=datetime(2025, 1, 1, tzinfo=UTC),
        event_id=f"deploy-{run_id}-{step}",
    ))


def staged(checkpoint: Artifact, deployment_id: str) -> ModelStaged:
    return ModelStaged(deployment_id=deployment_id, kind="promotion", checkpoint_uri=checkpoint.uri,
                       checkpoint_sha256=checkpoint.sha256, run_id="run-s", step=1, reason="test",
                       deadline=datetime(2999, 1, 1, tzinfo=UTC))


async def put_deployment(bus: Bus, checkpoint: Artifact, deployment_id: str) -> None:
    """The deployer's newest deployment, staged, as it writes it before announcing model.staged."""
    when = datetime(2025, 1, 1, tzinfo=UTC)
    candidate = Champion(checkpoint_uri=checkpoint.uri, checkpoint_sha256=checkpoint.sha256, run_id="run-s", step=1,
                         exact_match=0.5, val_loss=1.0, suite_version="s", deployed_at=when, event_id=deployment_id)
    await (await bus.record(DEPLOYMENT)).put(Deployment(
        id=deployment_id, kind="promotion", staged_at=when, deadline=datetime(2999, 1, 1, tzinfo=UTC),
        candidate=candidate, decision=DeployDecision(id="decision", time=when, outcome="promoted", reason="test",
                                                     checkpoint_uri=checkpoint.uri,
                                                     checkpoint_sha256=checkpoint.sha256),
    ))


@pytest.fixture
def settings(tmp_path: Path, nats_server: str, tiny_model_dir: Path) -> InferenceSettings:
    return InferenceSettings(
        data_dir=tmp_path / "data", nats_url=nats_server, http_port=free_port(), base_model=str(tiny_model_dir),
        device="cpu", max_tokens_limit=1000,
    )


async def info_when(client: httpx.AsyncClient, condition, timeout: float = 60.0) -> dict:
    last: dict = {}

    async def matching() -> dict | None:
        last.clear()
        last.update((await client.get("/models/info")).json())
        return dict(last) if condition(last) else None

    return await wait_for(matching, lambda: f"/models/info to match; last: {last}", timeout=timeout)


async def chat(client: httpx.AsyncClient, **fields) -> dict:
    response = await client.post("/v1/chat/completions", json={"model": "flywheel", "messages": HELLO, **fields})
    assert response.status_code == 200, response.text
    return response.json()


async def test_serves_base_then_reloads_on_deployment_while_a_request_runs(settings, bus: Bus, tiny_model_dir: Path):
    setup_tracing("test", None)
    store = ArtifactStore(settings.data_dir / "artifacts")
    first = make_checkpoint(store, tiny_model_dir, "run-a-1")
    second = make_checkpoint(store, tiny_model_dir, "run-a-2", reinit_seed=1)
    assert first.sha256 != second.sha256

    async with running(settings) as client:
        # No champion yet: the base model, said so.
        info = (await client.get("/models/info")).json()
        assert info["source"] == "base" and info["id"] == "flywheel:base"
        # The generated key guards the API over real HTTP; the open routes stay open.
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await client.get("/health", headers={"Authorization": ""})).status_code == 200
        on_base = await chat(client, max_tokens=LONG, temperature=0)
        assert on_base["model"] == "flywheel:base" and on_base["usage"]["completion_tokens"] == LONG
        base_text = on_base["choices"][0]["message"]["content"]
        # Seeded sampling shows a change of weights where the random model's argmax may not.
        sampled = {"max_tokens": 32, "temperature": 1.0, "seed": 3}
        base_sample = (await chat(client, **sampled))["choices"][0]["message"]["content"]

        await put_champion(bus, first, "run-a", 1)
        await bus.publish(topology.MODEL_DEPLOYED, deployed(first, "run-a", 1))
        info = await info_when(client, lambda i: i["sha256"] == first.sha256)
        assert info["source"] == "champion" and info["uri"] == first.uri
        assert (info["run_id"], info["step"], info["id"]) == ("run-a", 1, "flywheel:run-a-step1")

        # A long generation starts on the first checkpoint; the second is deployed meanwhile.
        body = {"model": "flywheel", "messages": HELLO, "max_tokens": LONG, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = aiter(response.aiter_lines())
            while not (line := await anext(lines)).startswith("data: "):
                pass
            with tracer().start_as_current_span("deploy"):
                deploy_trace = current_trace_id()
                event = deployed(second, "run-a", 2)
                await put_champion(bus, second, "run-a", 2)
                await bus.publish(topology.MODEL_DEPLOYED, event)
            info = await info_when(client, lambda i: i["sha256"] == second.sha256)
            swapped_at = time.monotonic()
            events = [line] + [line async for line in lines if line.startswith("data: ")]
            finished_at = time.monotonic()
        assert swapped_at < finished_at
        assert events[-1] == "data: [DONE]"
        chunks = [msgspec.json.decode(e[len("data: "):]) for e in events[:-1]]
        assert {c["model"] for c in chunks} == {"flywheel:run-a-step1"}  # finished on the model it started with
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == LONG
        # ...and on its weights (the first checkpoint is a copy of the base).
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == base_text

        assert (info["run_id"], info["step"], info["uri"]) == ("run-a", 2, second.uri)
        assert info["event_id"] == event.id and info["trace_id"] == deploy_trace
        on_second = await chat(client, **sampled)
        assert on_second["model"] == "flywheel:run-a-step2"
        assert on_second["choices"][0]["message"]["content"] != base_sample  # the new weights answer
        listed = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == ["flywheel:run-a-step2"]

        # A deployment whose bytes do not match its hash is refused; the old model keeps serving.
        bad = make_checkpoint(store, tiny_model_dir, "run-b-1", reinit_seed=2)
        await bus.publish(topology.MODEL_DEPLOYED, deployed(Artifact(bad.uri, second.sha256[::-1], 0), "run-b", 1))
        info = await info_when(client, lambda i: i["last_reload_error"] != "")
        assert "does not match" in info["last_reload_error"] and info["sha256"] == second.sha256
        assert (await chat(client, max_tokens=4))["model"] == "flywheel:run-a-step2"
        metrics = (await client.get("/metrics")).text
        assert 'flywheel_inference_reloads_total{outcome="failed"} 1.0' in metrics
        assert 'flywheel_inference_reloads_total{outcome="ok"} 3.0' in metrics

        # A rollback is announced as a deployment of the earlier champion.
        await put_champion(bus, first, "run-a", 1)
        await bus.publish(topology.MODEL_DEPLOYED, deployed(first, "run-a", 1))
        info = await info_when(client, lambda i: i["sha256"] == first.sha256)
        assert (info["run_id"], info["step"], info["last_reload_error"]) == ("run-a", 1, "")

        # A manual reload re-reads the KV champion; force reloads it even though it is unchanged.
        same = (await client.post("/models/reload")).json()
        assert same["loaded_at"] == info["loaded_at"]
        forced = (await client.post("/models/reload", json={"force": True})).json()
        assert forced["sha256"] == first.sha256 and forced["loaded_at"] > info["loaded_at"]


async def test_starts_on_the_kv_champion_and_waits_for_a_loadable_one(settings, bus: Bus, tiny_model_dir: Path):
    store = ArtifactStore(settings.data_dir / "artifacts")
    good = make_checkpoint(store, tiny_model_dir, "run-c-5")
    # The champion's bytes changed after it was announced: nothing may be served from them.
    await put_champion(bus, Artifact(good.uri, "0" * 64, 0), "run-c", 5)
    key_file = settings.data_dir.parent / "key"
    key_file.write_text("from-a-file\n")
    settings = msgspec.structs.replace(settings, api_key_file=str(key_file))

    async with running(settings, ready=False, key="from-a-file") as client:
        assert (await client.get("/ready")).status_code == 503
        response = await client.get("/models/info")
        assert response.status_code == 503 and "does not match" in response.json()["error"]["message"]

        await put_champion(bus, good, "run-c", 5)
        assert (await client.post("/models/reload")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        info = (await client.get("/models/info")).json()
        assert (info["source"], info["sha256"], info["run_id"], info["step"]) == ("champion", good.sha256, "run-c", 5)
        assert info["event_id"] == "deploy-run-c-5"

    assert not (settings.data_dir / GENERATED_KEY_PATH).exists()
    # A restart finds the champion in the KV straight away.
    async with running(settings, key="from-a-file") as client:
        info = (await client.get("/models/info")).json()
        assert (info["source"], info["sha256"]) == ("champion", good.sha256)


async def test_a_staged_checkpoint_is_loaded_and_reported_with_the_sha256_it_serves(settings, bus: Bus,
                                                                                   tiny_model_dir: Path):
    store = ArtifactStore(settings.data_dir / "artifacts")
    good = make_checkpoint(store, tiny_model_dir, "run-s-1")
    other = make_checkpoint(store, tiny_model_dir, "run-s-2", reinit_seed=4)
    reports = await bus.js.subscribe(topology.MODEL_SERVING)

    async def next_report() -> ModelServing:
        return msgspec.json.decode((await reports.next_msg(timeout=60)).data, type=ModelServing)

    async with running(msgspec.structs.replace(settings, replica_id="replica-7")) as client:
        # Staged: loaded, and the report carries the sha256 the loaded model reports.
        await put_deployment(bus, good, "d1")
        await bus.publish(topology.MODEL_STAGED, staged(good, "d1"))
        serving = await next_report()
        info = (await client.get("/models/info")).json()
        assert (serving.ok, serving.deployment_id, serving.replica) == (True, "d1", "replica-7")
        assert serving.checkpoint_sha256 == info["sha256"] == good.sha256 and serving.checkpoint_uri == good.uri

        # Bytes that do not match the staged hash: not served, and the report says why and what still serves.
        forged = Artifact(other.uri, "0" * 64, 0)
        await put_deployment(bus, forged, "d2")
        await bus.publish(topology.MODEL_STAGED, staged(forged, "d2"))
        failure = await next_report()
        assert (failure.ok, failure.deployment_id) == (False, "d2") and "does not match" in failure.reason
        assert failure.checkpoint_sha256 == good.sha256
        assert (await client.get("/models/info")).json()["sha256"] == good.sha256

        # The deployer gives up on a checkpoint this replica loaded: back to the champion in KV (none: the base).
        await put_deployment(bus, other, "d3")
        await bus.publish(topology.MODEL_STAGED, staged(other, "d3"))
        assert (await next_report()).checkpoint_sha256 == other.sha256
        await bus.publish(topology.MODEL_DEPLOY_FAILED, ModelDeployFailed(
            deployment_id="d3", kind="promotion", checkpoint_uri=other.uri, checkpoint_sha256=other.sha256,
            reason="no inference replica reported serving it within 120 s"))
        await info_when(client, lambda i: i["source"] == "base")

        # A staged deployment that is no longer the deployer's newest is not loaded, nor reported.
        await put_deployment(bus, other, "d5")
        await bus.publish(topology.MODEL_STAGED, staged(good, "d4"))
        with pytest.raises(TimeoutError):
            await reports.next_msg(timeout=3)
        assert (await client.get("/models/info")).json()["source"] == "base"
    await reports.unsubscribe()


async def test_the_first_answer_of_a_staged_checkpoint_ends_the_deployments_trace(spans, settings, bus: Bus,
                                                                                  tiny_model_dir: Path):
    store = ArtifactStore(settings.data_dir / "artifacts")
    checkpoint = make_checkpoint(store, tiny_model_dir, "run-t-1")
    reports = await bus.js.subscribe(topology.MODEL_SERVING)
    async with running(settings) as client:
        with tracer().start_as_current_span("deployment"):  # the dataset's trace, as the deployer continues it
            deployment_trace = current_trace_id()
            await put_deployment(bus, checkpoint, "d-t")
            await bus.publish(topology.MODEL_STAGED, staged(checkpoint, "d-t"))
        assert msgspec.json.decode((await reports.next_msg(timeout=60)).data, type=ModelServing).ok
        # Two callers at once, each in a trace of its own: one of them gets the first answer.
        callers = [f"{n:032x}" for n in (0xA1, 0xB2)]
        answers = await asyncio.gather(*(
            client.post("/v1/chat/completions", json={"model": "flywheel", "messages": HELLO, "max_tokens": 4},
                        headers={"traceparent": f"00-{trace}-{n + 1:016x}-01"})
            for n, trace in enumerate(callers)))
        assert [a.status_code for a in answers] == [200, 200]
        await chat(client, max_tokens=2)
    await reports.unsubscribe()

    finished = spans.get_finished_spans()
    [first] = [s for s in finished if s.name == "first answer" and f"{s.context.trace_id:032x}" == deployment_trace]
    [load] = [s for s in finished if s.name == "model load" and s.context.span_id == first.parent.span_id]
    assert f"{load.context.trace_id:032x}" == deployment_trace and load.attributes["flywheel.model.uri"] == checkpoint.uri
    assert first.attributes["flywheel.checkpoint.sha256"] == checkpoint.sha256
    assert first.attributes["flywheel.model.id"] == "flywheel:run-s-step1"
    # The answer's request keeps its own trace: the first answer names it and links to it.
    caller = first.attributes["flywheel.request.trace_id"]
    assert caller in callers and [f"{link.context.trace_id:032x}" for link in first.links] == [caller]
    assert first.attributes["flywheel.completion.id"] in {a.json()["id"] for a in answers}
    assert [s for s in finished if s.name == "first answer"] == [first]  # once, however many answers followed
