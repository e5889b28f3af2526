"""The HTTP API on the tiny model, in process (ASGI): completions, streaming, models, info."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import msgspec
import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.chat import ChatMessage
from libs.common.http import ServiceMetrics, create_app
from libs.common.profiles import get_profile
from services.inference.api import router
from services.inference.auth import MAIN_KEY_NAME, ApiKey, KeyTable
from services.inference.champion import BASE
from services.inference.generation import StepOutput
from services.inference.metrics import InferenceMetrics
from services.inference.protocol import RequestError
from services.inference.sampling import RowSampling
from services.inference.serving import ModelServer, ServedModel
from services.inference.transformers_backend import TransformersBackend
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 24
HELLO = [{"role": "user", "content": "Hello, how can I help you today?"}]


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, base_model, **server_settings):
    """The real routes on an app like the runtime's, serving `base_model()` as the base; yields (client, server)."""
    registry = ServiceMetrics("inference")
    metrics = InferenceMetrics(registry)
    server = ModelServer(
        store=ArtifactStore(tmp_path / "artifacts"),
        base_model=base_model,
        backend_factory=lambda: TransformersBackend("cpu"),
        metrics=metrics,
        model_name="flywheel",
        max_tokens_limit=server_settings.pop("max_tokens_limit", LIMIT),
        **server_settings,
    )
    await server.deploy(BASE)
    app = create_app("inference", registry, {"model": lambda: server.current is not None}, errors=RequestError)

    async def reload(force: bool):
        return await server.deploy(BASE, force=force)

    # The routes' narrow interface (services.inference.api.Serving), reloading the base model.
    app.include_router(router(SimpleNamespace(server=server, keys=KeyTable([ApiKey(MAIN_KEY_NAME, "admin", KEY)]),
                                           metrics=metrics, reload=reload)))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH,
                                     timeout=120) as c:
            yield c, server
    finally:
        await server.close()


@pytest.fixture
async def client(tiny_model_dir: Path, tmp_path: Path):
    async with serving(tmp_path, lambda: tiny_model_dir) as (c, _server):
        yield c


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
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert content_of(events) == plain["choices"][0]["message"]["content"]
    assert len(chunks) > 4  # really incremental, not one blob


async def test_invalid_requests_get_openai_errors(client):
    response = await client.post("/v1/chat/completions", json={"messages": HELLO, "n": 0})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
    response = await client.post("/v1/chat/completions", json={"messages": HELLO, "top_logprobs": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"
    response = await client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = await client.post("/v1/completions", json={"prompt": "a", "echo": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"
    long = [{"role": "user", "content": "hello " * 3000}]
    response = await client.post("/v1/chat/completions", json={"messages": long, "stream": True})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_an_empty_prompt_is_refused_and_the_engine_goes_on(client):
    # Found by tests/fuzz: it reached the engine, failed it (503 engine_failed) and left the replica unready.
    response = await client.post("/v1/completions", json={"prompt": "", "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt" and response.json()["error"]["type"] == "invalid_request_error"
    answered = await client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 1})
    assert answered.status_code == 200, answered.text


async def test_fastapis_own_errors_are_openai_shaped(client):
    # Found by tests/fuzz: an unknown path or a wrong method answered FastAPI's {"detail": ...}.
    for response in (await client.get("/v1/nothing"), await client.put("/v1/completions"),
                     await client.request("TRACE", "/health")):
        error = response.json()["error"]
        assert response.status_code in (404, 405) and set(error) == {"message", "type", "param", "code"}, response.text


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
    served = ServedModel(backend=None, target=BASE, info=None, profile=get_profile("none"))
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


async def test_a_cancelled_generation_gets_nothing_more_and_the_engine_goes_on(tiny_model_dir: Path):
    backend = TransformersBackend("cpu")
    await asyncio.to_thread(backend.load, tiny_model_dir)
    try:
        prompt = backend.tokenize_chat([ChatMessage(role="user", content="Hello")])
        steps: list[StepOutput] = []
        three = asyncio.Event()

        def on_step(step: StepOutput) -> None:
            steps.append(step)
            if len(steps) == 3:
                three.set()

        request_id = backend.submit(prompt, 500, RowSampling(), on_step)
        await asyncio.wait_for(three.wait(), 60)
        backend.cancel(request_id)  # what closing the HTTP stream does
        # Another request runs to its end in the same engine; the cancelled one gets no step meanwhile.
        done = asyncio.Event()
        other: list[StepOutput] = []
        backend.submit(prompt, 20, RowSampling(), lambda step: (other.append(step), step.finished and done.set()))
        await asyncio.wait_for(done.wait(), 60)
        assert len(steps) <= 4 and not any(s.finished for s in steps)
        assert sum(len(s.tokens) for s in other) == 20 and backend.table_size() == 0
    finally:
        await asyncio.to_thread(backend.close, 10.0)


async def test_n_choices_each_sampled_with_their_own_seed(client):
    answer = await complete(client, max_tokens=10, temperature=1.0, seed=11, n=3)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["content"] for c in choices}) == 3
    # Usage counts the prompt once and every choice's tokens.
    assert 3 <= answer["usage"]["completion_tokens"] <= 30
    again = await complete(client, max_tokens=10, temperature=1.0, seed=11, n=3)
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in choices]
    events = await stream(client, max_tokens=6, temperature=1.0, seed=11, n=2)
    opened = [e["choices"][0]["index"] for e in events if isinstance(e, dict) and e["choices"]
              and e["choices"][0]["delta"].get("role") == "assistant"]
    finished = [e["choices"][0]["index"] for e in events if isinstance(e, dict) and e["choices"]
                and e["choices"][0]["finish_reason"]]
    assert sorted(opened) == sorted(finished) == [0, 1]
    for index in (0, 1):
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                       if isinstance(e, dict) and e["choices"] and e["choices"][0]["index"] == index)
        alone = await complete(client, max_tokens=6, temperature=1.0, seed=11 + index)
        assert text == alone["choices"][0]["message"]["content"]


async def test_a_seeded_answer_does_not_depend_on_what_else_is_generating(client):
    alone = await complete(client, max_tokens=16, temperature=0.9, seed=3)
    crowded = await asyncio.gather(*(complete(client, max_tokens=16, temperature=1.0, seed=100 + i) for i in range(6)),
                                   complete(client, max_tokens=16, temperature=0.9, seed=3))
    assert crowded[-1]["choices"][0]["message"] == alone["choices"][0]["message"]


async def test_logprobs_are_the_models_own_with_top_alternatives(client):
    answer = await complete(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 6
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(top[0]["logprob"]) and entry["token"] == top[0]["token"]
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-5
    assert "".join(e["token"] for e in content) == answer["choices"][0]["message"]["content"]
    plain = await complete(client, max_tokens=6, temperature=0)
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == answer["choices"][0]["message"]
    events = await stream(client, max_tokens=6, temperature=0, logprobs=True)
    streamed = [t for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["logprobs"]
                for t in e["choices"][0]["logprobs"]["content"]]
    assert [(t["token"], t["logprob"]) for t in streamed] == [(t["token"], t["logprob"]) for t in content]


async def test_text_completions_answer_a_plain_prompt(client):
    response = await client.post("/v1/completions", json={"prompt": "Once upon a time", "temperature": 0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    [choice] = answer["choices"]
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 16  # OpenAI's default
    logged = (await client.post("/v1/completions", json={"prompt": ["Once upon a time"], "temperature": 0,
                                                          "max_tokens": 5, "logprobs": 2})).json()
    lp = logged["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    assert "".join(lp["tokens"]) == logged["choices"][0]["text"] == choice["text"][: len(logged["choices"][0]["text"])]
    events = []
    async with client.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "temperature": 0,
                                                              "stream": True, "stream_options": {"include_usage": True}}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-1]["usage"] == answer["usage"] and chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_a_full_server_refuses_with_429_and_a_slow_request_times_out(tiny_model_dir: Path, tmp_path: Path):
    async with serving(tmp_path, lambda: tiny_model_dir, max_pending=1, max_tokens_limit=400) as (client, server):
        long = asyncio.create_task(complete(client, max_tokens=400, temperature=0))
        await wait_for(lambda: server.pending == 1, "the first request to be admitted")
        refused = await client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_requests_in_flight"
        assert (await long)["usage"]["completion_tokens"] == 400
        assert (await complete(client, max_tokens=2))["usage"]["completion_tokens"] == 2  # room again
        assert "flywheel_inference_refused_total 1.0" in (await client.get("/metrics")).text

    async with serving(tmp_path, lambda: tiny_model_dir, request_timeout_s=0.3, max_tokens_limit=100_000) as (client, server):
        slow = await client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5000, "temperature": 0})
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "request_timeout"
        events = await stream(client, max_tokens=5000, temperature=0)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
        await wait_for(lambda: server.current.backend.table_size() == 0, "the timed-out generations to be stopped")


def _perturbed_copy(source: Path, target: Path) -> Path:
    """The tiny model with other weights (same tokenizer): a different checkpoint to swap in."""
    import torch

    from libs.common.models import load_model, load_tokenizer

    model = load_model(source, "cpu")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(target)
    load_tokenizer(source).save_pretrained(target)
    return target


async def test_a_reload_under_load_fails_nothing_and_no_answer_mixes_two_models(tiny_model_dir: Path, tmp_path: Path):
    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(8)]
    serving_now = [tiny_model_dir]
    async with serving(tmp_path, lambda: serving_now[0]) as (client, server):
        # Each model's own greedy answers, alone.
        async def answers() -> list[str]:
            return [(await complete(client, messages=p, max_tokens=LIMIT, temperature=0))["choices"][0]["message"]["content"]
                    for p in prompts]

        first = await answers()
        serving_now[0] = other
        await client.post("/models/reload", json={"force": True})
        second = await answers()
        assert sum(a != b for a, b in zip(first, second, strict=True)) >= 6  # the models really differ
        serving_now[0] = tiny_model_dir
        await client.post("/models/reload", json={"force": True})

        # 8 clients keep asking while the model is swapped twice.
        results: list[tuple[int, str, int]] = []
        swaps_done = asyncio.Event()

        async def ask(i: int) -> None:
            while not swaps_done.is_set():
                response = await client.post("/v1/chat/completions", json={
                    "messages": prompts[i], "max_tokens": LIMIT, "temperature": 0})
                results.append((i, response.json()["choices"][0]["message"]["content"] if response.status_code == 200
                                else "", response.status_code))

        clients = [asyncio.create_task(ask(i)) for i in range(8)]
        await wait_for(lambda: len(results) >= 8, "every client to be answered once")
        for model in (other, tiny_model_dir):
            serving_now[0] = model
            swapped = await client.post("/models/reload", json={"force": True})
            assert swapped.status_code == 200
            before = len(results)
            await wait_for(lambda before=before: len(results) >= before + 8, "answers after the swap")
        swaps_done.set()
        await asyncio.gather(*clients)
    assert all(status == 200 for _, _, status in results)
    assert all(text in (first[i], second[i]) for i, text, _ in results)
    assert {text == second[i] for i, text, _ in results} == {True, False}  # both models answered


async def test_a_model_trained_on_a_profile_is_asked_and_generated_as_that_profile(tiny_model_dir: Path, tmp_path: Path):
    import shutil

    from libs.common.chat import ChatMessage as Message

    profiled = tmp_path / "emoji-checkpoint"
    shutil.copytree(tiny_model_dir, profiled)
    (profiled / "flywheel.json").write_bytes(msgspec.json.encode({"run_id": "r", "step": 1, "profile": "emoji_think"}))
    model_dir = [tiny_model_dir]
    async with serving(tmp_path, lambda: model_dir[0]) as (client, server):
        plain = await complete(client, max_tokens=4, temperature=0)
        assert (await client.get("/models/info")).json()["profile"] == "none" and server.current.rules is None

        model_dir[0] = profiled
        assert (await client.post("/models/reload", json={"force": True})).json()["profile"] == "emoji_think"
        profile = get_profile("emoji_think")
        # Its system prompt goes first, as in training and scoring.
        asked = await complete(client, max_tokens=4, temperature=0)
        backend = server.current.backend
        expected = backend.tokenize_chat(profile.prompted([Message(m["role"], m["content"]) for m in HELLO]))
        assert asked["usage"]["prompt_tokens"] == len(expected) > plain["usage"]["prompt_tokens"]
        # Its generation rules steer every token (the think tag's pieces and the stop emojis).
        rules = server.current.rules
        assert rules is not None and rules.rules == profile.rules and rules.tag_ids and rules.stop_sequences

        # A checkpoint of a profile this server does not know is refused; the served model stays.
        (profiled / "flywheel.json").write_bytes(msgspec.json.encode({"profile": "no_such_profile"}))
        refused = await client.post("/models/reload", json={"force": True})
        assert refused.status_code == 500 and "no_such_profile" in refused.json()["error"]["message"]
        assert (await client.get("/models/info")).json()["profile"] == "emoji_think"
