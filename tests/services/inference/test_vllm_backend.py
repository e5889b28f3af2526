"""The vLLM backend on a real GPU with the tiny model: streaming on the caller's event loop, per-request
seeds, log probabilities, cancel, and the served-weights check on two checkpoints with different weights.

Skipped where there is no CUDA GPU or no vLLM (it needs a CUDA build of torch).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(900)]

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

from libs.common.models import load_model, load_tokenizer
from services.inference.generation import EngineFailed, StepOutput
from services.inference.sampling import RowSampling
from services.inference.vllm_backend import PROBE, VllmBackend, reference_logprobs, same_weights

# Small and quick to start: a third of the GPU each (two engines at once in the weights test), no CUDA graphs.
ENGINE = {"gpu_memory_utilization": 0.3, "enforce_eager": True}
PERTURB_SEED = 20240611


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):
    engine = VllmBackend("cuda", **ENGINE)
    engine.load(tiny_model_dir)
    yield engine
    engine.close(timeout_s=30.0, hard=True)


@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every weight matrix moved by noise of its own scale (fixed seed): other weights, same tokenizer."""
    target = tmp_path_factory.mktemp("perturbed") / "model"
    model = load_model(tiny_model_dir, "cpu")
    generator = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    model.save_pretrained(target)
    load_tokenizer(tiny_model_dir).save_pretrained(target)
    return target


async def _generate(backend: VllmBackend, input_ids: list[int], max_new_tokens: int,
                    sampling: RowSampling) -> tuple[list[StepOutput], set[int], int]:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    steps: list[StepOutput] = []
    threads: set[int] = set()

    def on_step(step: StepOutput) -> None:
        steps.append(step)
        threads.add(threading.get_ident())
        if step.finished and not done.done():
            done.set_result(None)

    backend.submit(input_ids, max_new_tokens, sampling, on_step)
    await asyncio.wait_for(done, 120)
    return steps, threads, threading.get_ident()


def generate(backend: VllmBackend, input_ids: list[int], max_new_tokens: int, sampling: RowSampling) -> list[StepOutput]:
    """Run one generation on a fresh event loop (as the server's); its steps, checked to come on that loop."""
    steps, threads, loop_thread = asyncio.run(_generate(backend, input_ids, max_new_tokens, sampling))
    assert threads == {loop_thread}
    return steps


def tokens_of(steps: list[StepOutput]) -> list[int]:
    return [token for step in steps for token in step.tokens]


def test_a_greedy_generation_streams_its_tokens_and_finishes(backend: VllmBackend):
    ids = backend.tokenize_chat(PROBE)
    steps = generate(backend, ids, 16, RowSampling(temperature=0.0))
    tokens = tokens_of(steps)
    assert steps and steps[-1].finished and not any(step.finished for step in steps[:-1])
    assert all(step.error is None for step in steps)
    assert 1 <= len(tokens) <= 16
    assert len(tokens) == 16 or tokens[-1] in backend.eos_ids
    assert tokens_of(generate(backend, ids, 16, RowSampling(temperature=0.0))) == tokens
    info = backend.describe()
    assert (info.device, info.dtype, info.max_positions) == ("cuda", "bfloat16", 1024)
    assert info.parameters > 0 and info.engine.startswith("vLLM ")
    assert backend.healthy


def test_a_seed_reproduces_its_sample(backend: VllmBackend):
    ids = backend.tokenize_chat(PROBE)
    first = tokens_of(generate(backend, ids, 24, RowSampling(temperature=1.0, seed=1234)))
    again = tokens_of(generate(backend, ids, 24, RowSampling(temperature=1.0, seed=1234)))
    other = tokens_of(generate(backend, ids, 24, RowSampling(temperature=1.0, seed=4321)))
    assert first == again
    assert first != other


def test_log_probabilities_come_with_every_token(backend: VllmBackend):
    sampling = RowSampling(temperature=0.0, top_logprobs=3)
    tokens = tokens_of(generate(backend, backend.tokenize_chat(PROBE), 8, sampling))
    assert [entry.token for entry in sampling.logprobs] == tokens
    for entry in sampling.logprobs:
        assert len(entry.top) == 3
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True) and all(value <= 0 for value in values)
        # Greedy: the chosen token is the most likely one.
        assert entry.top[0][0] == entry.token and entry.logprob == pytest.approx(entry.top[0][1])


def test_cancel_stops_delivery_and_the_engine_goes_on(backend: VllmBackend):
    ids = backend.tokenize_chat(PROBE)

    async def scenario() -> tuple[int, int]:
        steps: list[StepOutput] = []
        first = asyncio.Event()

        def on_step(step: StepOutput) -> None:
            steps.append(step)
            first.set()

        request_id = backend.submit(ids, 500, RowSampling(temperature=1.0, seed=5), on_step)
        await asyncio.wait_for(first.wait(), 60)
        backend.cancel(request_id)
        delivered = len(steps)
        await asyncio.sleep(1.0)
        return delivered, len(steps)

    delivered, later = asyncio.run(scenario())
    assert later == delivered
    assert backend.healthy
    assert tokens_of(generate(backend, ids, 4, RowSampling(temperature=0.0)))


def test_each_checkpoint_passes_the_weights_check_and_a_stale_engine_would_not(
        backend: VllmBackend, tiny_model_dir: Path, perturbed_model_dir: Path):
    other = VllmBackend("cuda", **ENGINE)
    other.load(perturbed_model_dir)  # raises EngineFailed if the engine served other weights
    try:
        assert backend.weights_check is not None and backend.weights_check.verdict == ""
        assert other.weights_check is not None and other.weights_check.verdict == ""
        ids = backend.tokenize_chat(PROBE)
        assert other.tokenize_chat(PROBE) == ids
        greedy = RowSampling(temperature=0.0)
        assert tokens_of(generate(backend, ids, 16, greedy)) != tokens_of(generate(other, ids, 16, greedy))

        # The engine on the tiny model serves the tiny model's weights, not the perturbed ones: had
        # the second load left it serving (a stale engine), the check would have said so.
        served = backend.served_logprobs(ids)
        expected_here, _ = reference_logprobs(tiny_model_dir, "cuda", ids, tokens=served)
        expected_there, _ = reference_logprobs(perturbed_model_dir, "cuda", ids, tokens=served)
        assert same_weights(expected_here, served, backend.weights_tolerance) == ""
        assert same_weights(expected_there, served, other.weights_tolerance) != ""
        assert same_weights(other.weights_check.expected, backend.weights_check.served, other.weights_tolerance) != ""
    finally:
        other.close(timeout_s=30.0)
    assert not other.healthy

    async def submit_to_closed() -> None:
        other.submit(ids, 4, RowSampling(), lambda step: None)

    with pytest.raises(EngineFailed, match="stopped"):
        asyncio.run(submit_to_closed())
