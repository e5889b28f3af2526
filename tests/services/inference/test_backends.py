"""Choosing the generation engine (services/inference/backends.py) and the vLLM backend's pure parts
(services/inference/vllm_backend.py): no GPU, no vLLM, no model."""

from __future__ import annotations

import asyncio
import math
import threading
from types import SimpleNamespace

import pytest

from libs.common.settings import SettingsError
from services.inference import backends
from services.inference.backends import choose_backend, make_backend
from services.inference.generation import EngineFailed
from services.inference.sampling import RowSampling, TokenLogprob
from services.inference.transformers_backend import EngineLimits, TransformersBackend
from services.inference.vllm_backend import (
    RULES_UNSUPPORTED,
    VllmBackend,
    position_logprobs,
    same_weights,
    sampling_kwargs,
    token_logprobs,
)

# ---------------------------------------------------------------------------- choosing


@pytest.fixture
def vllm_present(monkeypatch: pytest.MonkeyPatch):
    """Pretend vLLM is installed (or not): `vllm_present(True)`."""
    def set_present(present: bool) -> None:
        monkeypatch.setattr(backends, "vllm_installed", lambda: present)
    return set_present


def test_auto_is_transformers_on_cpu_even_with_vllm(vllm_present):
    vllm_present(True)
    assert choose_backend("auto", "cpu") == "transformers"


def test_auto_is_vllm_on_the_gpu_when_vllm_is_installed(vllm_present):
    vllm_present(True)
    assert choose_backend("auto", "cuda") == "vllm"
    assert choose_backend("auto", "cuda:0") == "vllm"
    # vLLM cannot be pointed at another GPU by name: that one stays with transformers.
    assert choose_backend("auto", "cuda:1") == "transformers"
    vllm_present(False)
    assert choose_backend("auto", "cuda") == "transformers"


def test_transformers_is_taken_as_asked(vllm_present):
    vllm_present(True)
    assert choose_backend("transformers", "cuda") == "transformers"
    assert choose_backend("transformers", "cpu") == "transformers"


def test_vllm_on_cpu_is_a_settings_error_naming_backend(vllm_present):
    vllm_present(True)
    with pytest.raises(SettingsError, match=r"^backend: .*'cpu'"):
        choose_backend("vllm", "cpu")
    with pytest.raises(SettingsError, match=r"^backend: .*'cuda:1'"):
        choose_backend("vllm", "cuda:1")


def test_vllm_without_vllm_installed_is_a_settings_error_naming_backend(vllm_present):
    vllm_present(False)
    with pytest.raises(SettingsError, match=r"^backend: vllm is not installed"):
        choose_backend("vllm", "cuda")


def test_the_real_lookup_agrees_with_the_environment():
    # vLLM is not installed here (it needs a CUDA torch); where it is, auto on cpu is transformers all the same.
    assert choose_backend("auto", "cpu") == "transformers"
    if not backends.vllm_installed():
        with pytest.raises(SettingsError, match="^backend: vllm is not installed"):
            choose_backend("vllm", "cuda")


def test_an_unknown_backend_is_a_settings_error():
    with pytest.raises(SettingsError, match="^backend: "):
        choose_backend("sglang", "cpu")


def test_make_backend_builds_transformers_with_its_limits(vllm_present):
    vllm_present(True)
    backend = make_backend("auto", "cpu", max_batch_requests=8, max_batch_tokens=512, kv_cache_tokens=1024,
                           gpu_memory_utilization=0.3)
    assert isinstance(backend, TransformersBackend)
    assert backend.limits == EngineLimits(max_batch_requests=8, max_batch_tokens=512, kv_cache_tokens=1024)


def test_make_backend_builds_vllm_with_its_limits_without_importing_vllm(vllm_present):
    vllm_present(True)
    backend = make_backend("vllm", "cuda", max_batch_requests=8, max_batch_tokens=512, kv_cache_tokens=1024,
                           gpu_memory_utilization=0.3)
    assert isinstance(backend, VllmBackend)
    assert (backend.name, backend.device) == ("vllm", "cuda")
    kwargs = backend.engine_kwargs("/models/m")
    assert kwargs["max_num_seqs"] == 8 and kwargs["max_num_batched_tokens"] == 512
    assert kwargs["gpu_memory_utilization"] == 0.3
    assert kwargs["dtype"] == "bfloat16" and kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs["model"] == kwargs["tokenizer"] == "/models/m"


def test_make_backend_refuses_unknown_limits():
    with pytest.raises(TypeError, match="kv_cache_tokenz"):
        make_backend("transformers", "cpu", kv_cache_tokenz=1)


def test_two_vllm_engines_fit_one_gpu_by_default():
    assert 2 * VllmBackend("cuda").gpu_memory_utilization < 0.9


# ---------------------------------------------------------------------------- sampling settings


def test_greedy_maps_to_temperature_zero_without_seed():
    kwargs = sampling_kwargs(RowSampling(temperature=0.0, top_p=0.5, seed=7), 12, [3, 9])
    assert kwargs == {"n": 1, "temperature": 0.0, "top_p": 1.0, "seed": None, "max_tokens": 12,
                      "stop_token_ids": [3, 9], "ignore_eos": False, "logprobs": None, "detokenize": False}


def test_sampled_requests_keep_temperature_top_p_and_their_seed():
    kwargs = sampling_kwargs(RowSampling(temperature=0.7, top_p=0.9, seed=2**62 + 5), 1, [2])
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["seed"]) == (0.7, 0.9, 2**62 + 5)
    assert kwargs["max_tokens"] == 1 and kwargs["stop_token_ids"] == [2] and not kwargs["ignore_eos"]
    assert sampling_kwargs(RowSampling(temperature=1.0), 5, [])["seed"] is None


@pytest.mark.parametrize("top_logprobs", [None, 0, 5])
def test_log_probabilities_are_asked_for_as_the_request_asks(top_logprobs):
    assert sampling_kwargs(RowSampling(top_logprobs=top_logprobs), 4, [1])["logprobs"] == top_logprobs


def test_profile_rules_are_refused_at_submit_before_anything_runs():
    backend = VllmBackend("cuda")
    with pytest.raises(EngineFailed, match="generation rules") as raised:
        backend.submit([1, 2], 4, RowSampling(rules=object()), lambda step: None)
    assert str(raised.value) == RULES_UNSUPPORTED


def test_submit_without_a_model_is_an_engine_failure():
    async def submit():
        return VllmBackend("cuda").submit([1, 2], 4, RowSampling(), lambda step: None)

    with pytest.raises(EngineFailed, match="no model"):
        asyncio.run(submit())
    assert not VllmBackend("cuda").healthy
    VllmBackend("cuda").close()  # nothing to stop: no error


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_the_vllm_backend_runs_on_the_first_visible_gpu_only(device):
    with pytest.raises(ValueError, match="first visible CUDA GPU"):
        VllmBackend(device)
    assert VllmBackend("cuda:0").device == "cuda:0"


# ---------------------------------------------------------------------------- vLLM's log probabilities -> ours


def lp(logprob: float, rank: int) -> SimpleNamespace:
    """A stand-in for `vllm.logprobs.Logprob` (what position_logprobs reads: .logprob)."""
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=None)


def test_each_generated_token_gets_its_log_probability_and_the_top_k_most_likely_first():
    positions = [
        # The sampled token (rank 3) comes first, then vLLM's top 2.
        {7: lp(-2.0, 3), 1: lp(-0.5, 1), 4: lp(-1.0, 2)},
        # The sampled token is the most likely: k entries only.
        {1: lp(-0.1, 1), 9: lp(-3.0, 2)},
    ]
    assert token_logprobs([7, 1], positions, 2) == [
        TokenLogprob(7, -2.0, ((1, -0.5), (4, -1.0))),
        TokenLogprob(1, -0.1, ((1, -0.1), (9, -3.0))),
    ]


def test_top_logprobs_zero_keeps_the_chosen_tokens_only():
    assert token_logprobs([5], [{5: lp(-0.25, 1)}], 0) == [TokenLogprob(5, -0.25, ())]


def test_missing_positions_give_no_entries():
    assert token_logprobs([1, 2], None, 3) == []
    assert position_logprobs(None) == {}
    entry = token_logprobs([3], [{4: lp(-1.0, 1)}], 1)[0]
    assert math.isinf(entry.logprob) and entry.top == ((4, -1.0),)


# ---------------------------------------------------------------------------- the served-weights check


CHECKPOINT = {11: -0.40, 12: -1.60, 13: -2.90, 14: -3.70, 15: -4.20}


def test_the_same_weights_within_bf16_noise_match():
    assert same_weights(CHECKPOINT, dict(CHECKPOINT), 0.05) == ""
    noisy = {11: -0.41, 12: -1.58, 13: -2.93, 14: -3.66, 15: -4.22}
    assert same_weights(CHECKPOINT, noisy, 0.05) == ""


def test_near_tied_top_tokens_may_come_in_either_order():
    assert same_weights({1: -0.690, 2: -0.700, 3: -4.0}, {2: -0.689, 1: -0.701, 3: -4.0}, 0.05) == ""


def test_another_most_likely_token_is_caught():
    served = {16: -0.30, 12: -1.60, 13: -2.90, 14: -3.70, 15: -4.20}
    reason = same_weights(CHECKPOINT, served, 0.05)
    assert "most likely next token is 16 served but 11" in reason


def test_log_probabilities_drifting_beyond_the_tolerance_are_caught():
    served = {11: -0.40, 12: -1.60, 13: -3.10, 14: -3.70, 15: -4.20}
    reason = same_weights(CHECKPOINT, served, 0.05)
    assert reason.startswith("token 13 has log probability -3.1000 served but -2.9000")
    assert same_weights(CHECKPOINT, served, 0.3) == ""


def test_a_likely_token_missing_from_the_other_side_is_caught():
    # Token 12 is the checkpoint's second best; the engine's list ends far below it without it.
    served = {11: -0.40, 13: -2.90, 14: -3.70, 15: -4.20, 16: -4.30}
    assert "token 12 (log probability -1.6000) is missing from served top tokens" in same_weights(CHECKPOINT, served, 0.05)


def test_nothing_to_compare_is_not_a_match():
    assert same_weights({}, CHECKPOINT, 0.05) != ""
    assert same_weights(CHECKPOINT, {}, 0.05) != ""


# ---------------------------------------------------------------------------- delivery, cancel and close (a stand-in engine)


class FakeEngine:
    """Just what VllmBackend uses of vLLM's AsyncLLM: DELTA outputs one token at a time, abort, shutdown, errored."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.aborted: list[str] = []
        self.shut_down = False
        self.errored = False

    async def generate(self, prompt, params, request_id):
        count = params.kwargs["max_tokens"]
        for i in range(count):
            await asyncio.sleep(0.01)
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("engine core died")
            token = 100 + i
            finished = i == count - 1
            positions = None if params.kwargs["logprobs"] is None else [{token: lp(-0.5, 1), 7: lp(-1.5, 2)}]
            yield SimpleNamespace(finished=finished, outputs=[SimpleNamespace(
                token_ids=[token], logprobs=positions, finish_reason="length" if finished else None)])

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch):
    """The two vLLM modules submit and the stream import, as stand-ins."""
    import enum
    import sys
    import types

    class SamplingParams:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    params = types.ModuleType("vllm.sampling_params")
    params.SamplingParams = SamplingParams
    params.RequestOutputKind = enum.Enum("RequestOutputKind", "CUMULATIVE DELTA FINAL_ONLY")
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", params)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)


@pytest.fixture
def fake_backend(fake_vllm):
    from services.inference.vllm_backend import _EngineLoop

    backend = VllmBackend("cuda")
    backend.eos_ids = [2]
    backend._engine = FakeEngine()
    backend._engine_loop = _EngineLoop("fake-vllm")
    yield backend
    backend.close(timeout_s=5.0, hard=True)


async def collect(backend: VllmBackend, sampling: RowSampling, max_new_tokens: int = 4):
    done = asyncio.get_running_loop().create_future()
    steps, threads = [], set()

    def on_step(step) -> None:
        steps.append((step, len(sampling.logprobs)))
        threads.add(threading.get_ident())
        if step.finished:
            done.set_result(None)

    request_id = backend.submit([1, 2, 3], max_new_tokens, sampling, on_step)
    await asyncio.wait_for(done, 10)
    return request_id, steps, threads


def test_steps_come_in_order_on_the_callers_loop_with_their_log_probabilities_first(fake_backend):
    sampling = RowSampling(temperature=0.0, top_logprobs=1)

    async def scenario():
        return (*await collect(fake_backend, sampling), threading.get_ident())

    _, steps, threads, loop_thread = asyncio.run(scenario())
    assert threads == {loop_thread}
    assert [step.tokens for step, _ in steps] == [[100], [101], [102], [103]]
    assert [step.finished for step, _ in steps] == [False, False, False, True]
    # Each step's token had its entry recorded before the step was handed over.
    assert [seen for _, seen in steps] == [1, 2, 3, 4]
    assert sampling.logprobs[0] == TokenLogprob(100, -0.5, ((100, -0.5),))
    assert fake_backend.healthy


def test_cancel_delivers_nothing_more_and_aborts_in_the_engine(fake_backend):
    async def scenario():
        steps = []
        first = asyncio.Event()

        def on_step(step) -> None:
            steps.append(step)
            first.set()

        request_id = fake_backend.submit([1], 50, RowSampling(), on_step)
        await first.wait()
        fake_backend.cancel(request_id)
        seen = len(steps)
        await asyncio.sleep(0.2)
        return request_id, seen, steps

    request_id, seen, steps = asyncio.run(scenario())
    assert len(steps) == seen == 1
    assert request_id in fake_backend._engine.aborted
    fake_backend.cancel(request_id)  # twice, or after the end: nothing happens


def test_an_engine_failure_ends_the_request_with_its_reason(fake_backend):
    fake_backend._engine.fail_after = 2
    _, steps, _ = asyncio.run(collect(fake_backend, RowSampling(), max_new_tokens=10))
    assert [step.tokens for step, _ in steps] == [[100], [101], []]
    assert steps[-1][0].finished and "engine core died" in steps[-1][0].error


def test_close_waits_for_the_requests_in_flight_then_stops_the_engine(fake_backend):
    async def scenario():
        task = asyncio.ensure_future(collect(fake_backend, RowSampling(), max_new_tokens=10))
        await asyncio.sleep(0.03)
        await asyncio.to_thread(fake_backend.close, 10.0)
        return await task

    _, steps, _ = asyncio.run(scenario())
    assert len(steps) == 10 and steps[-1][0].finished and steps[-1][0].error is None
    assert fake_backend._engine.shut_down and not fake_backend.healthy
    with pytest.raises(EngineFailed, match="stopped"):
        asyncio.run(collect(fake_backend, RowSampling()))


def test_a_hard_close_ends_the_requests_in_flight_with_an_error(fake_backend):
    async def scenario():
        task = asyncio.ensure_future(collect(fake_backend, RowSampling(), max_new_tokens=500))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(fake_backend.close, None, True)
        return await task

    _, steps, _ = asyncio.run(scenario())
    assert steps[-1][0].finished and steps[-1][0].error == "the generation engine was stopped"
    assert len(steps) < 500 and fake_backend._engine.shut_down
