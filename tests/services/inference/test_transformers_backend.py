"""The transformers backend's engine on the tiny model: a request that kills the engine's loop
fails alone; the next request gets a fresh engine (found by tests/fuzz: an empty prompt left
the replica answering 503 until a reload)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.inference.generation import StepOutput
from services.inference.sampling import RowSampling
from services.inference.transformers_backend import EngineLimits, TransformersBackend
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


async def generate(backend: TransformersBackend, input_ids: list[int], max_new_tokens: int = 4) -> StepOutput:
    """Submit and collect until the request finishes: every token, and its error if any."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[StepOutput] = loop.create_future()
    tokens: list[int] = []

    def on_step(step: StepOutput) -> None:
        tokens.extend(step.tokens)
        if step.finished and not done.done():
            done.set_result(StepOutput(tokens=tokens, finished=True, error=step.error))

    backend.submit(input_ids, max_new_tokens, RowSampling(), on_step)
    return await asyncio.wait_for(done, 60)


async def test_a_request_that_kills_the_engine_fails_alone_and_a_fresh_engine_takes_the_next(tiny_model_dir: Path):
    backend = TransformersBackend("cpu", EngineLimits(kv_cache_tokens=1024))
    await asyncio.to_thread(backend.load, tiny_model_dir)
    try:
        prompt = backend.tokenize_text("Once upon a time")
        first = await generate(backend, prompt)
        assert len(first.tokens) == 4 and not first.error

        # An empty prompt raises inside the engine's loop, which then stops for every request.
        killer: list[StepOutput] = []
        backend.submit([], 4, RowSampling(), killer.append)
        await wait_for(lambda: backend._failure(), "the engine to fail on an empty prompt", timeout=30)

        healed = await generate(backend, prompt)
        # The request that killed the engine ended with its error.
        assert killer and killer[-1].finished and killer[-1].error
        assert healed.tokens == first.tokens and not healed.error
        assert backend.restarts == 1 and backend.healthy and backend.table_size() == 0
    finally:
        await asyncio.to_thread(backend.close, 10.0, True)
    # A closed engine stays closed: nothing restarts it.
    assert not backend.healthy and backend.restarts == 1
