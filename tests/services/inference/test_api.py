"""The HTTP API on the tiny model, in process (ASGI): completions, streaming, models, info."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import msgspec
import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.chat import ChatMessage
from libs.common.http import ServiceMetrics, create_app
from services.inference.api import router
from services.inference.auth import MAIN_KEY_NAME, ApiKey, KeyTable
from services.inference.champion import BASE
from services.inference.generation import GenerationParams, PreparedPrompt
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelServer, ServedModel
from services.inference.transformers_backend import TransformersBackend

pytestmark = pytest.mark.slow

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 24
HELLO = [{"role": "user", "content": "Hello, how can I help you today?"}]


@pytest.fixture
async def client(tiny_model_dir: Path, tmp_path: Path):
    """The real routes on an app like the runtime's, serving the tiny model as the base."""
    registry = ServiceMetrics("inference")
    metrics = InferenceMetrics(registry)
    server = ModelServer(
        store=ArtifactStore(tmp_path / "artifacts"),
        base_model=lambda: tiny_model_dir,
        backend_factory=lambda: TransformersBackend("cpu"),
        metrics=metrics,
        model_name="flywheel",
        max_tokens_limit=LIMIT,
    )
    await server.deploy(BASE)
    app = create_app("inference", registry, {"model": lambda: server.current is not None})

    async def reload(force: bool):
        return await server.deploy(BASE, force=force)

    # The routes' narrow interface (services.inference.api.Serving), reloading the base model.
    app.include_router(router(SimpleNamespace(server=server, keys=KeyTable([ApiKey(MAIN_KEY_NAME, "admin", KEY)]),
                                           metrics=metrics, reload=reload)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH) as c:
        yield c
    await server.close()


async def complete(client: httpx.AsyncClient, **fields) -> dict:
    fields.setdefault("messages", HELLO)
    response = await client.post("/v1/chat/completions", json={"model": "flywheel", **fields})
    assert response.status_code == 200, response.text
    return response.json()


async def stream(client: httpx.AsyncClient, **fields) -> list[dict | str]:
    """The SSE events of a streamed completion, parsed; "[DONE]" stays a string."""
    fields.setdefault("messages", HELLO)
    response = await client.post("/v1/chat/completions", json={"model": "flywheel", "stream": True, **fields})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else msgspec.json.decode(data))
    return events


def content_of(events: list[dict | str]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"])


async def test_chat_completion_is_openai_shaped_and_greedy_is_deterministic(client):
    first = await complete(client, max_tokens=8, temperature=0)
    assert first["object"] == "chat.completion" and first["id"].startswith("chatcmpl-")
    assert first["model"] == "flywheel:base"
    [choice] = first["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    usage = first["usage"]
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    second = await complete(client, max_tokens=8, temperature=0)
    assert second["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert second["id"] != first["id"]


async def test_seeded_sampling_repeats(client):
    runs = [await complete(client, max_tokens=12, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    assert runs[0]["choices"][0]["message"] == runs[1]["choices"][0]["message"]


async def test_max_tokens_is_capped_by_the_server_limit(client):
    capped = await complete(client, max_tokens=10_000, temperature=0)
    assert capped["usage"]["completion_tokens"] == LIMIT
    assert capped["choices"][0]["finish_reason"] == "length"


async def test_stop_sequence_cuts_the_answer(client):
    full = (await complete(client, temperature=0))["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = await complete(client, temperature=0, stop=[stop, "never-there"])
    assert cut["choices"][0]["message"]["content"] == full[: full.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < LIMIT
    streamed = await stream(client, temperature=0, stop=stop)
    assert content_of(streamed) == full[: full.find(stop)]


async def test_streaming_sends_openai_chunks_then_done(client):
    plain = await complete(client, max_tokens=16, temperature=0)
    events = await stream(client, max_tokens=16, temperature=0, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "flywheel:base" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert content_of(events) == plain["choices"][0]["message"]["content"]
    assert len(chunks) > 4  # really incremental, not one blob


async def test_invalid_requests_get_openai_errors(client):
    response = await client.post("/v1/chat/completions", json={"messages": HELLO, "n": 3})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
    long = [{"role": "user", "content": "hello " * 3000}]
    response = await client.post("/v1/chat/completions", json={"messages": long, "stream": True})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_models_list_and_info(client, tiny_model_dir: Path):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["flywheel:base"]
    info = (await client.get("/models/info")).json()
    assert info["source"] == "base" and info["id"] == "flywheel:base"
    assert info["uri"] == tiny_model_dir.resolve().as_uri()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["parameters"] > 1_000_000 and info["max_positions"] == 1024
    assert info["loaded_at"] and info["last_reload_error"] == ""
    forced = (await client.post("/models/reload", json={"force": True})).json()
    assert forced["loaded_at"] > info["loaded_at"]
    same = (await client.post("/models/reload")).json()
    assert same["loaded_at"] == forced["loaded_at"]


async def test_metrics_count_requests_and_tokens(client):
    await complete(client, max_tokens=5, temperature=0)
    text = (await client.get("/metrics")).text
    assert 'flywheel_inference_requests_total{outcome="ok",stream="false"} 1.0' in text
    assert "flywheel_inference_completion_tokens_total 5.0" in text  # the load probe is not counted
    assert 'flywheel_inference_reloads_total{outcome="ok"} 1.0' in text


def _named(spans, name: str) -> list:
    return [s for s in spans.get_finished_spans() if s.name == name]


async def test_the_first_answer_of_each_loaded_model_is_a_span_under_its_load(spans, client):
    # `spans` comes first: the client's model load is recorded.
    [load] = _named(spans, "model load")
    assert not _named(spans, "first answer")
    events = await stream(client, max_tokens=6, temperature=0)
    completion_id = events[0]["id"]
    await asyncio.gather(*(complete(client, max_tokens=3, temperature=0) for _ in range(3)))

    [first] = _named(spans, "first answer")  # one per loaded model, however many answers follow
    assert first.context.trace_id == load.context.trace_id and first.parent.span_id == load.context.span_id
    attributes = dict(first.attributes)
    assert attributes["flywheel.model.id"] == "flywheel:base" and attributes["flywheel.model.source"] == "base"
    assert attributes["flywheel.completion.id"] == completion_id and attributes["flywheel.completion.stream"] is True
    assert attributes["flywheel.completion.tokens"] == 6
    assert "flywheel.request.trace_id" not in attributes and not first.links  # the client sent no traceparent
    assert first.start_time >= load.end_time

    # A reload is a new loaded model: its first answer is recorded under its own load.
    await client.post("/models/reload", json={"force": True})
    await complete(client, max_tokens=2, temperature=0)
    await complete(client, max_tokens=2, temperature=0)
    [reload] = [s for s in _named(spans, "model load") if s is not load]
    [_, again] = _named(spans, "first answer")
    assert again.parent.span_id == reload.context.span_id and again.context.trace_id == reload.context.trace_id
    assert again.attributes["flywheel.completion.stream"] is False


def test_only_one_caller_claims_a_models_first_answer():
    served = ServedModel(backend=None, target=BASE, info=None)
    start = threading.Barrier(8)
    claims: list[bool] = []

    def claim() -> None:
        start.wait()
        claims.append(served.claim_first_answer())

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claims) == [False] * 7 + [True]
    assert not served.claim_first_answer()


def test_a_cancelled_generation_stops_at_the_next_token(tiny_model_dir: Path):
    backend = TransformersBackend("cpu")
    backend.load(tiny_model_dir)
    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            cancel.set()  # what closing the HTTP stream does

    prompt = PreparedPrompt(backend.tokenize_chat([ChatMessage(role="user", content="Hello")]), 500,
                            GenerationParams(temperature=0))
    done = backend.stream(prompt, on_text, cancel)
    assert len(pieces) == 3 and done.completion_tokens < 10
