"""The official `openai` Python client, unmodified, against the real server (uvicorn, NATS, the tiny model).

Every option the issue names goes through the client's own request building and response parsing:
chat completions streamed and whole, `n`, `temperature`, `top_p`, `seed`, `stop`,
`max_tokens` / `max_completion_tokens`, `logprobs` / `top_logprobs`, usage in the last stream chunk,
`/v1/completions`, `/v1/models`, and errors raised as the client's own exception types.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KEY = "openai-client-test-key"
ASK = [{"role": "user", "content": "What is 101 + 11 in binary?"}]


@pytest.fixture
async def openai_client(tmp_path: Path, nats_server: str, tiny_model_dir: Path):
    from openai import AsyncOpenAI

    settings = InferenceSettings(data_dir=tmp_path / "data", nats_url=nats_server, http_port=free_port(),
                                 base_model=str(tiny_model_dir), device="cpu", api_key=KEY, max_tokens_limit=64,
                                 max_pending=4)
    async with running(settings):
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{settings.http_port}/v1", api_key=KEY, max_retries=0)
        try:
            yield client
        finally:
            await client.close()


async def test_chat_completions_whole_and_streamed(openai_client):
    [model] = (await openai_client.models.list()).data
    assert model.id == "flywheel:base" and model.owned_by == "flywheel"

    whole = await openai_client.chat.completions.create(model=model.id, messages=ASK, temperature=0,
                                                        max_completion_tokens=12)
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5

    pieces, usage, finish = [], None, None
    stream = await openai_client.chat.completions.create(model=model.id, messages=ASK, temperature=0, max_tokens=12,
                                                         stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == choice.message.content and finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_sampling_options_n_seed_stop_and_logprobs(openai_client):
    create = openai_client.chat.completions.create
    seeded = await create(model="flywheel", messages=ASK, temperature=0.9, top_p=0.95, seed=42, n=3, max_tokens=10)
    assert [c.index for c in seeded.choices] == [0, 1, 2]
    again = await create(model="flywheel", messages=ASK, temperature=0.9, top_p=0.95, seed=42, n=3, max_tokens=10)
    assert [c.message.content for c in again.choices] == [c.message.content for c in seeded.choices]
    assert len({c.message.content for c in seeded.choices}) > 1

    full = (await create(model="flywheel", messages=ASK, temperature=0, max_tokens=20)).choices[0].message.content
    stop = full[5:7]
    cut = (await create(model="flywheel", messages=ASK, temperature=0, max_tokens=20, stop=[stop])).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"

    logged = (await create(model="flywheel", messages=ASK, temperature=0, max_tokens=5, logprobs=True,
                           top_logprobs=2)).choices[0]
    assert len(logged.logprobs.content) == 5
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in logged.logprobs.content)


async def test_legacy_completions(openai_client):
    answer = await openai_client.completions.create(model="flywheel", prompt="1 + 1 =", max_tokens=6, temperature=0,
                                                    logprobs=1)
    [choice] = answer.choices
    assert answer.usage.completion_tokens == 6 and len(choice.logprobs.tokens) == 6
    assert "".join(choice.logprobs.tokens) == choice.text
    streamed = await openai_client.completions.create(model="flywheel", prompt="1 + 1 =", max_tokens=6, temperature=0,
                                                      stream=True)
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == choice.text


async def test_errors_come_back_as_the_clients_own_exceptions(openai_client, tmp_path: Path):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        await openai_client.chat.completions.create(model="flywheel", messages=ASK, temperature=3)
    assert bad.value.code is None or bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        await openai_client.chat.completions.create(model="flywheel", messages=[{"role": "user", "content": "a " * 4000}])
    assert long.value.code == "context_length_exceeded"
    stranger = openai.AsyncOpenAI(base_url=str(openai_client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await stranger.models.list()
    await stranger.close()
