"""The vLLM backend: vLLM's V1 async engine (`AsyncLLM`) on a CUDA GPU, behind the same Backend protocol.

Written against vLLM's V1 engine API (its only engine since the V0 engine was removed in 0.11),
read in vLLM's source; these parts of it have kept their shape through the later releases: `AsyncEngineArgs`, `AsyncLLM.from_engine_args`,
`AsyncLLM.generate(TokensPrompt, SamplingParams, request_id)` (an async generator of
`RequestOutput`s), `AsyncLLM.abort`, `AsyncLLM.shutdown`, `AsyncLLM.errored`,
`SamplingParams(output_kind=RequestOutputKind.DELTA)`. vLLM is imported inside functions only:
this module imports where vLLM is not installed (it needs a CUDA build of torch).

- The engine's client runs on an asyncio loop of its own, in a dedicated thread; the engine core
  (scheduler, model, KV cache) is vLLM's own child process. `submit` (on the server's event
  loop) schedules `generate` there and returns at once; each `RequestOutput` (DELTA: the new token
  ids only) is handed back to the server's loop with `call_soon_threadsafe`, in order, with
  `finished=True` on the last. `cancel` forgets the request at once (nothing more is delivered)
  and aborts it in the engine.
- Sampling per request is vLLM's own (`sampling_kwargs`): temperature 0 is greedy, `top_p`, a
  per-request `seed` (vLLM draws a seeded request's randomness from its seed alone: the same
  seed gives the same tokens, though not the tokens the transformers sampler would draw),
  the token budget as `max_tokens`, EOS as `stop_token_ids` (`ignore_eos` off). Stop sequences are
  not passed: the server applies them and cancels. `logprobs=k` returns, per generated token, its
  log probability and the k most likely, from the raw logits (`logprobs_mode="raw_logprobs"`,
  vLLM's default, set explicitly): the model's own, before temperature and top_p, as the
  transformers sampler records them (services/inference/sampling.py).
- A data profile's generation rules (`RowSampling.rules`) are not supported: `submit` raises
  `EngineFailed` for a request that carries them (a model trained on a profile with rules fails
  its load probe with that message). vLLM applies custom logits processors only as engine-wide
  classes loaded into its model runner, and their interface differs between the V1 model runner
  (`vllm.v1.sample.logits_processor.LogitsProcessor`, per-request state through `BatchUpdate`s)
  and the V2 model runner that newer releases choose by default
  (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`, which rejects V1-interface
  processors at load): the rules would need both, with per-request arguments through
  `SamplingParams.extra_args` and a tokenizer in the engine process. Serve such models with
  backend "transformers".
- The served-weights check: vLLM has served stale weights after `reload_weights`
  (vllm-project/vllm#32718). This backend never reloads in place (a deployment gets a new backend
  and a new engine), and still verifies after every load that the engine serves the checkpoint at
  `path`: transformers computes, on the same device and in the same dtype (bf16 on CUDA), the
  log probabilities of the next token after a fixed probe prompt (the chat template over
  "ping"); vLLM generates one greedy token for the same prompt with `logprobs=5`; `same_weights`
  compares them. A mismatch fails the load (`EngineFailed("vLLM serves other weights than ...")`).
- `gpu_memory_utilization` is the fraction of the GPU's memory this engine takes (weights,
  activations, KV cache). The server keeps two engines during a swap (the new one loads beside
  the old one), and the weights check loads a bf16 copy of the weights beside them for a moment,
  so the default, 0.4, lets two engines and that copy share one GPU. The KV cache is whatever of
  that fraction the weights leave; `kv_cache_tokens` (a transformers setting) does not apply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.chat import ChatMessage, prompt_token_ids, text_token_ids
from libs.common.log import get_logger
from libs.common.models import eos_ids, load_tokenizer, spawn_engine_children
from services.inference.generation import BackendInfo, EngineFailed, StepOutput
from services.inference.sampling import RowSampling, TokenLogprob

log = get_logger("inference.vllm")

DEFAULT_GPU_MEMORY_UTILIZATION = 0.4
# The probe whose next-token log probabilities must match the checkpoint's.
PROBE = [ChatMessage(role="user", content="ping")]
PROBE_TOP_K = 5
# How far (nats) a served log probability may be from the checkpoint's own. Both sides run the
# model in bf16, whose 8-bit significand rounds a logit of magnitude 8-16 to a multiple of 1/16
# and one of 16-32 to 1/8; vLLM's kernels (fused norms, paged attention, its own matmul
# order) and transformers' round differently, so the same weights give logits a rounding step or
# two apart, and a log probability (a logit less the log-normalizer) moves by as much: vLLM's own
# issue #18352 measured transformers-vs-vLLM differences up to 0.32 nats on Qwen3-1.7B in bf16,
# most of them under 0.17. Other weights (a stale checkpoint, another run's) move the probe's
# likely tokens by far more. 0.05 would fail correct loads of real models; configurable per backend.
WEIGHTS_TOLERANCE = 0.3
RULES_UNSUPPORTED = (
    "the vLLM backend cannot apply a data profile's generation rules: vLLM takes custom logits "
    "processors only as engine-wide classes whose interface differs between its V1 and V2 model "
    "runners; serve models trained on a profile with generation rules with backend \"transformers\""
)


# ---------------------------------------------------------------------------- pure parts (tested without a GPU)


def sampling_kwargs(sampling: RowSampling, max_new_tokens: int, eos_ids: Iterable[int]) -> dict[str, Any]:
    """The `vllm.SamplingParams` keywords for one request (output_kind aside, added where vLLM is imported).

    Greedy requests get temperature 0 (vLLM then ignores top_p and any seed). A temperature in
    (0, 0.01) is raised to 0.01 by vLLM itself. `logprobs`: None, none; 0, the chosen token's
    only; k, and the k most likely. `detokenize` is off: the server decodes the ids itself.
    """
    greedy = sampling.greedy
    return {
        "n": 1,
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "seed": None if greedy else sampling.seed,
        "max_tokens": int(max_new_tokens),
        "stop_token_ids": [int(t) for t in eos_ids],
        "ignore_eos": False,
        "logprobs": sampling.top_logprobs,
        "detokenize": False,
    }


def position_logprobs(position: Mapping[int, Any] | None) -> dict[int, float]:
    """One position of vLLM's logprobs (token id -> `Logprob`) as token id -> log probability."""
    if not position:
        return {}
    return {int(token): float(entry.logprob) for token, entry in position.items()}


def token_logprobs(tokens: list[int], positions: Iterable[Mapping[int, Any] | None] | None, k: int) -> list[TokenLogprob]:
    """`TokenLogprob`s for generated `tokens` from vLLM's per-position logprobs (the sampled token and the top k).

    vLLM lists the sampled token and the k most likely (k + 1 entries, or k when the sampled one
    is among them); `top` keeps the k most likely, most likely first, as the transformers sampler does.
    """
    entries = []
    for token, position in zip(tokens, positions or (), strict=False):
        values = position_logprobs(position)
        top = tuple(sorted(values.items(), key=lambda item: -item[1])[:k]) if k else ()
        # vLLM always lists the sampled token; -inf only if it ever did not.
        entries.append(TokenLogprob(token, values.get(token, float("-inf")), top))
    return entries


def same_weights(expected: Mapping[int, float], served: Mapping[int, float], tolerance: float = WEIGHTS_TOLERANCE) -> str:
    """"" when `served` (the engine's next-token log probabilities) matches `expected` (the checkpoint's), else why not.

    Both map token id -> log probability for the probe's next token: `served` vLLM's top k (with
    the sampled token), `expected` the checkpoint's top k computed with transformers, and, where
    known, its log probabilities of the tokens `served` lists. They match when
    - every token both list has log probabilities within `tolerance` of each other;
    - the most likely token is the same, unless the two candidates are tied within `tolerance`
      on both sides (bf16 rounding may order near-equal tokens either way);
    - a token one side lists above everything the other lists (by more than `tolerance`) is
      listed by the other too: each side's list is its own top k.
    """
    if not expected or not served:
        return "no log probabilities to compare"
    shared = expected.keys() & served.keys()
    if shared:
        diff, token = max((abs(expected[t] - served[t]), t) for t in shared)
        if diff > tolerance:
            return (f"token {token} has log probability {served[token]:.4f} served but {expected[token]:.4f} "
                    f"in the checkpoint (off by {diff:.4f}, tolerance {tolerance:g})")
    expected_top = max(expected, key=expected.__getitem__)
    served_top = max(served, key=served.__getitem__)
    if expected_top != served_top:
        tied = (served_top in expected and expected[served_top] >= expected[expected_top] - tolerance
                and expected_top in served and served[expected_top] >= served[served_top] - tolerance)
        if not tied:
            return (f"the most likely next token is {served_top} served but {expected_top} in the checkpoint "
                    f"(log probability {expected[expected_top]:.4f})")
    for listed, other, side in ((expected, served, "served"), (served, expected, "the checkpoint's")):
        floor = min(other.values())
        missing = sorted((t for t in listed if t not in other and listed[t] > floor + tolerance), key=lambda t: -listed[t])
        if missing:
            token = missing[0]
            return (f"token {token} (log probability {listed[token]:.4f}) is missing from {side} top tokens, "
                    f"whose least likely has {floor:.4f}")
    return ""


def reference_logprobs(path: Path, device: str, input_ids: list[int], k: int = PROBE_TOP_K,
                       tokens: Iterable[int] = ()) -> tuple[dict[int, float], int]:
    """The checkpoint's own next-token log probabilities after `input_ids` (its top k and `tokens`), and its parameter count.

    Loaded with transformers (libs.common.models.load_model: bf16 on CUDA, as vLLM runs it here)
    and freed again before returning.
    """
    import torch

    from libs.common.models import load_model

    model = load_model(path, device)
    try:
        parameters = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            logits = model(torch.tensor([list(input_ids)], device=device)).logits[0, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        del logits
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    values, ids = logprobs.topk(k)
    expected = dict(zip(ids.tolist(), values.tolist(), strict=True))
    wanted = [int(t) for t in tokens if 0 <= int(t) < logprobs.numel()]
    expected.update(zip(wanted, logprobs[wanted].tolist(), strict=True))
    return expected, parameters


def eos_token_ids(path: Path, tokenizer) -> list[int]:
    """The checkpoint's EOS ids: its generation config's, else the tokenizer's (as the transformers backend takes them)."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    return eos_ids(configured, tokenizer)


@dataclass(frozen=True)
class WeightsCheck:
    """What the served-weights check compared at load, and its verdict ("" when the weights matched)."""

    probe_ids: list[int]
    expected: dict[int, float]
    served: dict[int, float]
    tolerance: float
    verdict: str


# ---------------------------------------------------------------------------- the engine's thread


class _EngineLoop:
    """An asyncio loop on a daemon thread of its own: vLLM's engine client lives and runs there."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine, timeout: float | None = None):
        """Run `coroutine` on this loop and wait for its result (from another thread only)."""
        return self.submit(coroutine).result(timeout)

    def stop(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


# ---------------------------------------------------------------------------- the backend


class VllmBackend:
    """One model in one vLLM engine (its own engine process), with the transformers tokenizer the server decodes with."""

    name = "vllm"

    def __init__(self, device: str = "cuda", *, gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                 max_batch_requests: int = 64, max_batch_tokens: int = 2048, max_model_len: int | None = None,
                 enforce_eager: bool = False, weights_tolerance: float = WEIGHTS_TOLERANCE) -> None:
        if device not in ("cuda", "cuda:0"):
            # vLLM takes no device name: it runs on the first GPU CUDA_VISIBLE_DEVICES leaves visible.
            raise ValueError(f"the vLLM backend runs on the first visible CUDA GPU (cuda or cuda:0), not {device!r}")
        self.device = device
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        # No CUDA graphs and no torch.compile: starts in seconds instead of a minute, serves slower.
        self.enforce_eager = enforce_eager
        self.weights_tolerance = weights_tolerance
        self.tokenizer = None
        self.eos_ids: list[int] = []
        self.weights_check: WeightsCheck | None = None
        self._engine = None
        self._engine_loop: _EngineLoop | None = None
        self._closed = False
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._info: dict[str, Any] = {}
        # Requests whose steps are still delivered (touched on the server's event loop only).
        self._live: set[str] = set()
        # Each request's generate() task, as seen from other threads (engine thread and callers).
        self._streams: dict[str, concurrent.futures.Future] = {}
        self._streams_lock = threading.Lock()
        # The same tasks as the engine's loop sees them (touched on that loop only).
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ loading

    def engine_kwargs(self, path: Path) -> dict[str, Any]:
        """The `AsyncEngineArgs` for the model at `path`."""
        kwargs: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            # As libs.common.models.load_model runs a model on CUDA (and so the weights check).
            "dtype": "bfloat16",
            "seed": 0,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_batch_requests,
            "max_num_batched_tokens": self.max_batch_tokens,
            "enforce_eager": self.enforce_eager,
            # The model's own log probabilities, before temperature and top_p (vLLM's default).
            "logprobs_mode": "raw_logprobs",
            "disable_log_stats": True,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs

    def load(self, path: Path) -> None:
        """Start a vLLM engine on the checkpoint at `path` and verify it serves those weights (blocking).

        Raises EngineFailed when the engine serves other weights; the engine is stopped again then.
        """
        if self._engine_loop is not None:
            raise EngineFailed("this vLLM backend was loaded already; every model gets a new backend")
        path = Path(path)
        self.tokenizer = load_tokenizer(path)
        self.eos_ids = eos_token_ids(path, self.tokenizer)
        # vLLM starts its engine core as a child process: spawned, never forked from this threaded process.
        spawn_engine_children()
        self._engine_loop = _EngineLoop(f"vllm-engine-{self._prefix}")
        try:
            self._engine = self._engine_loop.call(self._start(path))
            self._check_weights(path)
        except BaseException:
            self.close(timeout_s=0, hard=True)
            raise
        log.info("vLLM engine serving", path=str(path), **self._info)

    async def _start(self, path: Path):
        # On the engine's loop: AsyncLLM binds its output handler and IPC sockets to the running loop.
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs(path)))
        config = engine.model_config
        self._info = {
            "version": vllm.__version__,
            "dtype": str(config.dtype).removeprefix("torch."),
            "max_positions": int(config.max_model_len),
        }
        return engine

    def _check_weights(self, path: Path) -> None:
        probe_ids = self.tokenize_chat(PROBE)
        served = self.served_logprobs(probe_ids)
        expected, parameters = reference_logprobs(path, self.device, probe_ids, PROBE_TOP_K, tokens=served)
        self._info["parameters"] = parameters
        verdict = same_weights(expected, served, self.weights_tolerance)
        self.weights_check = WeightsCheck(probe_ids, expected, served, self.weights_tolerance, verdict)
        if verdict:
            raise EngineFailed(f"vLLM serves other weights than {path}: {verdict}")

    def served_logprobs(self, input_ids: list[int], k: int = PROBE_TOP_K) -> dict[int, float]:
        """The engine's top-k next-token log probabilities after `input_ids` (blocking; never on an event loop)."""
        if self._engine is None or self._engine_loop is None:
            raise EngineFailed("no model is loaded in this engine")
        return self._engine_loop.call(self._probe(list(input_ids), k))

    async def _probe(self, input_ids: list[int], k: int) -> dict[int, float]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=k, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self._engine.generate(TokensPrompt(prompt_token_ids=input_ids), params,
                                                  self._new_id("probe")):
            final = output
        positions = final.outputs[0].logprobs if final is not None and final.outputs else None
        if not positions:
            raise EngineFailed("vLLM returned no log probabilities for the weights probe")
        return position_logprobs(positions[0])

    def describe(self) -> BackendInfo:
        return BackendInfo(
            device=self.device,
            dtype=self._info.get("dtype", ""),
            parameters=self._info.get("parameters", 0),
            max_positions=self._info.get("max_positions", 0),
            engine=f"vLLM {self._info.get('version', '?')} (AsyncLLM, paged attention, "
                   f"gpu_memory_utilization {self.gpu_memory_utilization:g})",
        )

    def tokenize_chat(self, messages: list[ChatMessage]) -> list[int]:
        return prompt_token_ids(self.tokenizer, messages)

    def tokenize_text(self, text: str) -> list[int]:
        return text_token_ids(self.tokenizer, text)

    # ------------------------------------------------------------------ generating

    def submit(self, input_ids: list[int], max_new_tokens: int, sampling: RowSampling,
               on_step: Callable[[StepOutput], None]) -> str:
        """Start a generation; `on_step` gets its tokens as they come, on the calling event loop.

        Call from the event loop. Returns the request id for `cancel`.
        """
        if sampling.rules is not None:
            raise EngineFailed(RULES_UNSUPPORTED)
        engine = self._running_engine()
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(**sampling_kwargs(sampling, max_new_tokens, self.eos_ids),
                                output_kind=RequestOutputKind.DELTA)
        server_loop = asyncio.get_running_loop()
        request_id = self._new_id("r")

        def deliver(step: StepOutput, entries: list[TokenLogprob]) -> None:  # on the server's loop
            if request_id not in self._live:
                return  # cancelled, or finished already
            if step.finished:
                self._live.discard(request_id)
            # Before the step: the decoder reads a token's entry when it counts the token.
            sampling.logprobs.extend(entries)
            on_step(step)

        def post(step: StepOutput, entries: list[TokenLogprob]) -> None:  # on the engine's loop
            try:
                server_loop.call_soon_threadsafe(deliver, step, entries)
            except RuntimeError:  # the server's loop is closed: nobody is waiting any more
                pass

        self._live.add(request_id)
        stream = self._engine_loop.submit(self._stream(engine, request_id, list(input_ids), params,
                                                       sampling.top_logprobs, post))
        with self._streams_lock:
            self._streams[request_id] = stream
        stream.add_done_callback(lambda _done: self._forget(request_id))
        return request_id

    async def _stream(self, engine, request_id: str, input_ids: list[int], params, top_logprobs: int | None,
                      post: Callable[[StepOutput, list[TokenLogprob]], None]) -> None:
        from vllm.inputs import TokensPrompt

        task = asyncio.current_task()
        self._tasks.add(task)
        finished = False
        try:
            async for output in engine.generate(TokensPrompt(prompt_token_ids=input_ids), params, request_id):
                completion = output.outputs[0]
                tokens = [int(t) for t in completion.token_ids]
                entries = token_logprobs(tokens, completion.logprobs, top_logprobs) if top_logprobs is not None else []
                finished = bool(output.finished)
                error = None
                if finished and completion.finish_reason == "abort":
                    error = "vLLM aborted the request"
                if tokens or finished:
                    post(StepOutput(tokens=tokens, finished=finished, error=error), entries)
            if not finished:
                post(StepOutput(finished=True, error="vLLM ended the request's stream before it finished"), [])
        except asyncio.CancelledError:
            # cancel() (then this is dropped: the request is no longer live) or close(hard=True).
            post(StepOutput(finished=True, error="the generation engine was stopped"), [])
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure ends this request with its reason
            cause = exc.__cause__ or exc
            post(StepOutput(finished=True, error=f"vLLM failed: {cause!r}"), [])
        finally:
            self._tasks.discard(task)

    def cancel(self, request_id: str) -> None:
        """Stop a generation; nothing more is delivered for it."""
        if request_id not in self._live:
            return
        self._live.discard(request_id)
        with self._streams_lock:
            stream = self._streams.get(request_id)
        # Cancelling generate() makes vLLM abort the request; the explicit abort covers a request
        # that reached the engine while its generate() task was being cancelled.
        if stream is not None:
            stream.cancel()
        if self._engine is not None and self._engine_loop is not None and self._engine_loop.alive:
            self._engine_loop.submit(self._abort(request_id))

    async def _abort(self, request_id: str) -> None:
        try:
            await self._engine.abort(request_id)
        except Exception as exc:  # noqa: BLE001 - an engine that is gone has nothing left to abort
            log.debug("vLLM abort failed", request_id=request_id, error=repr(exc))

    def _forget(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)

    def _in_flight(self) -> list[concurrent.futures.Future]:
        with self._streams_lock:
            return list(self._streams.values())

    def _new_id(self, kind: str) -> str:
        return f"{self._prefix}-{kind}{next(self._ids)}"

    def _running_engine(self):
        if self._engine is None or self._engine_loop is None:
            raise EngineFailed("no model is loaded in this engine")
        if self._closed or not self._engine_loop.alive:
            raise EngineFailed("the generation engine has stopped")
        if self._engine.errored:
            raise EngineFailed("the vLLM engine has failed (its engine process died; see the log)")
        return self._engine

    @property
    def healthy(self) -> bool:
        return (self._engine is not None and not self._closed and self._engine_loop is not None
                and self._engine_loop.alive and not self._engine.errored)

    def close(self, timeout_s: float | None = None, hard: bool = False) -> None:
        """Stop the engine once the requests in flight are done, or at once when `hard` (blocking).

        Requests still running after `timeout_s` are stopped; then the engine process exits and
        its GPU memory is free.
        """
        self._closed = True
        engine_loop = self._engine_loop
        if engine_loop is None or not engine_loop.alive:
            return
        if not hard:
            concurrent.futures.wait(self._in_flight(), timeout=timeout_s)
        for stream in self._in_flight():
            stream.cancel()
        try:
            engine_loop.call(self._shutdown(), timeout=120.0)
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            log.warning("vLLM engine shutdown failed", error=repr(exc))
        engine_loop.stop(timeout=30.0)

    async def _shutdown(self) -> None:
        if self._tasks:  # the cancelled generate() tasks abort their requests on the way out
            await asyncio.wait(set(self._tasks), timeout=10.0)
        if self._engine is not None:
            self._engine.shutdown()
