"""The served model: load and verify a new one beside the old, swap, and run generations.

- A load runs in a worker thread while the current model keeps answering; the new model gets
  its own engine (services/inference/transformers_backend.py). It is served only after its
  artifact hash matched and it generated a token through that engine; then one reference
  assignment swaps it in. A failed load leaves the current model serving. Loads run one at a
  time; `withdraw` (a deployment that failed) waits for a load in progress before it decides.
- A request takes the current `ServedModel` once and keeps it to the end, so a swap never
  changes the weights under a running generation: no answer mixes two models. The old model
  finishes what it started, then its engine stops and it is freed.
- Every request runs in the model's continuous-batching engine: requests in flight share each
  forward pass. At most `max_pending` requests are admitted at once (waiting or generating);
  one more is refused with `Overloaded` (HTTP 429) rather than queued without bound, and a
  request that runs past `request_timeout_s` is stopped (`GenerationTimeout`).
- A model trained on a data profile (its `flywheel.json`'s `profile`, libs.common.profiles) is
  asked as it was trained and scored: the profile's system prompt goes first, and its
  generation rules apply to every token (libs.common.profile_logits, in the sampler).
- The first answer a loaded model serves is recorded as a "first answer" span under its
  "model load" span, in the load's trace: for a deployment that is the dataset's own trace,
  which so runs from submission to the first answer served by the model the dataset produced.
  The request keeps its own trace (a `traceparent` it sent), which the span links to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from libs.common.artifacts import ArtifactStore
from libs.common.chat import ChatMessage
from libs.common.log import get_logger
from libs.common.profile_logits import ProfileLogits
from libs.common.profiles import DEFAULT_PROFILE, Profile, UnknownProfile, get_profile
from libs.common.tracing import current_trace_id, tracer
from services.inference.champion import ModelTarget, Source, needs_reload
from services.inference.decoding import ChoiceDecoder
from services.inference.generation import (
    Backend,
    Completion,
    Delta,
    EngineFailed,
    GenerationParams,
    PreparedPrompt,
    StepOutput,
    new_token_budget,
)
from services.inference.metrics import InferenceMetrics

log = get_logger("inference.serving")

_PROBE = [ChatMessage(role="user", content="ping")]


# flywheel.json, written by the trainer into every checkpoint: only the profile matters here.
CHECKPOINT_INFO = "flywheel.json"


class ReloadFailed(RuntimeError):
    """A new model could not be loaded or verified; the previous one is still served."""


class Overloaded(RuntimeError):
    """`max_pending` requests are in flight already: come back later."""


class GenerationTimeout(RuntimeError):
    """A request ran past `request_timeout_s` and was stopped."""


class _CheckpointProfile(msgspec.Struct):
    profile: str = DEFAULT_PROFILE


def checkpoint_profile(path: Path) -> Profile:
    """The data profile the model at `path` was trained on (none for a model without flywheel.json)."""
    info = path / CHECKPOINT_INFO
    name = msgspec.json.decode(info.read_bytes(), type=_CheckpointProfile).profile if info.is_file() else DEFAULT_PROFILE
    try:
        return get_profile(name)
    except UnknownProfile as exc:
        raise ReloadFailed(f"{path}: trained on data profile {name!r}, which this server does not know") from exc


class ModelInfo(msgspec.Struct, kw_only=True):
    id: str
    source: Source
    uri: str
    sha256: str
    run_id: str
    step: int
    loaded_at: datetime
    device: str
    dtype: str
    parameters: int
    max_positions: int
    engine: str
    # The data profile it was trained on: its system prompt and generation rules apply.
    profile: str
    # The trace the load ran in (for a deployment: the deployment's own trace) and the event.
    trace_id: str
    event_id: str


@dataclass(eq=False)
class ServedModel:
    backend: Backend
    target: ModelTarget
    info: ModelInfo
    profile: Profile
    # The profile's rules, with a tokenizer of their own (they decode on the engine's thread).
    rules: ProfileLogits | None = None
    # The "model load" span this model was loaded in: its first answer is recorded under it.
    load_span: SpanContext | None = None
    # Acquired once, never released: whoever gets it records the first answer.
    _first_answer: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Requests generating on this model now, and an event set whenever there are none.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.idle.set()

    def claim_first_answer(self) -> bool:
        """True exactly once per loaded model, whichever thread or task asks first."""
        return self._first_answer.acquire(blocking=False)

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class RequestOrigin(msgspec.Struct, frozen=True):
    """What a chat request says about itself: its completion id and the trace it came in (if any)."""

    completion_id: str = ""
    # The caller's span from its `traceparent` header; None when it sent none.
    span: SpanContext | None = None


def served_model_id(model_name: str, target: ModelTarget) -> str:
    if target.source == "base":
        return f"{model_name}:base"
    checkpoint = f"{target.run_id}-step{target.step}" if target.run_id else target.sha256[:12]
    return f"{model_name}:{checkpoint}"


class ModelServer:
    def __init__(
        self,
        *,
        store: ArtifactStore,
        base_model: Callable[[], Path],
        backend_factory: Callable[[], Backend],
        metrics: InferenceMetrics,
        model_name: str,
        max_tokens_limit: int,
        max_pending: int = 256,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.store = store
        self.base_model = base_model
        self.backend_factory = backend_factory
        self.metrics = metrics
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.current: ServedModel | None = None
        self.last_error = ""
        self.pending = 0
        self._reload_lock = asyncio.Lock()
        # Swapped-out models finishing their requests, each with the task that retires it.
        self._retiring: dict[asyncio.Task, ServedModel] = {}

    # ------------------------------------------------------------------ loading

    async def deploy(self, target: ModelTarget, *, force: bool = False) -> ModelInfo:
        """Serve `target` unless it is already served; raises ReloadFailed (old model kept)."""
        async with self._reload_lock:
            return await self._swap(target, force)

    async def withdraw(self, sha256: str, instead: Callable[[], Awaitable[ModelTarget]]) -> ModelInfo | None:
        """Stop serving checkpoint `sha256` if it is served: load `instead()` in its place.

        Waits for a load in progress, so a checkpoint withdrawn while it was loading is replaced
        as soon as it is in. None: `sha256` was not served. Raises ReloadFailed (it stays served).
        """
        async with self._reload_lock:
            served = self.current.target if self.current else None
            if served is None or served.source != "champion" or served.sha256 != sha256:
                return None
            return await self._swap(await instead(), False)

    async def _swap(self, target: ModelTarget, force: bool) -> ModelInfo:
        if self.current and not needs_reload(self.current.target, target, force=force):
            return self.current.info
        with tracer().start_as_current_span("model load", attributes={
            "flywheel.model.source": target.source, "flywheel.model.uri": target.uri,
        }) as span:
            served = None
            try:
                # From the object store first when hosts share no disk (checked against its sha256).
                path = await self.store.fetch(target.uri, target.sha256) if target.source == "champion" else None
                # A copy of the context goes with the thread, so the load's spans nest here.
                served = await asyncio.to_thread(self._load, target, path, current_trace_id(), span.get_span_context())
                await self._probe(served)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old model
                if served is not None:
                    await asyncio.to_thread(served.backend.close, 10.0, True)
                self.metrics.reloads.labels("failed").inc()
                self.last_error = f"loading {target.source} {target.uri or ''}: {exc}".strip()
                log.error("model load failed; keeping the current model", target=target.uri,
                          source=target.source, error=repr(exc),
                          serving=self.current.info.id if self.current else None)
                raise ReloadFailed(self.last_error) from exc
        old, self.current = self.current, served
        self.last_error = ""
        self.metrics.reloads.labels("ok").inc()
        log.info("model loaded", **msgspec.to_builtins(served.info))
        if old is not None:
            task = asyncio.create_task(self._retire(old))
            self._retiring[task] = old
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return served.info

    async def _retire(self, old: ServedModel) -> None:
        """Let the swapped-out model finish the requests it started, then stop its engine."""
        await old.idle.wait()
        await asyncio.to_thread(old.backend.close, 30.0)
        log.info("previous model retired", model=old.info.id, sha256=old.info.sha256)

    def _load(self, target: ModelTarget, path: Path | None, trace_id: str,
              load_span: SpanContext | None = None) -> ServedModel:
        """Load `target` (a champion from its verified local `path`, or the base model)."""
        if path is None:
            path = self.base_model()
            target = replace(target, uri=path.resolve().as_uri())
        profile = checkpoint_profile(path)
        backend = self.backend_factory()
        backend.load(path)
        described = backend.describe()
        info = ModelInfo(
            id=served_model_id(self.model_name, target),
            source=target.source,
            uri=target.uri,
            sha256=target.sha256,
            run_id=target.run_id,
            step=target.step,
            loaded_at=datetime.now(UTC),
            device=described.device,
            dtype=described.dtype,
            parameters=described.parameters,
            max_positions=described.max_positions,
            engine=described.engine,
            profile=profile.name,
            trace_id=trace_id,
            event_id=target.event_id,
        )
        rules = None
        if not profile.rules.neutral:
            from libs.common.models import load_tokenizer

            rules = ProfileLogits(profile.rules, load_tokenizer(path), prompt_length=0)
        return ServedModel(backend, target, info, profile, rules, load_span if load_span and load_span.is_valid else None)

    async def _probe(self, served: ServedModel) -> None:
        """The new engine must generate a token before the model is served."""
        prompt = PreparedPrompt(served.backend.tokenize_chat(_PROBE), 1, GenerationParams(max_tokens=1, temperature=0))
        async for _index, item in self._run(served, prompt, time.monotonic() + self.request_timeout_s):
            if isinstance(item, Completion) and item.completion_tokens != 1:
                raise ReloadFailed(f"{served.info.uri}: the loaded model did not generate a token")

    # ------------------------------------------------------------------ generating

    def prepare(self, served: ServedModel, messages: list[ChatMessage], params: GenerationParams) -> PreparedPrompt:
        """Tokenize (as the model's profile asks) and budget a chat request; raises PromptTooLong."""
        return self._budget(served, served.backend.tokenize_chat(served.profile.prompted(messages)), params)

    def prepare_text(self, served: ServedModel, text: str, params: GenerationParams) -> PreparedPrompt:
        """Tokenize and budget a plain-text prompt (/v1/completions); raises PromptTooLong."""
        return self._budget(served, served.backend.tokenize_text(text), params)

    def _budget(self, served: ServedModel, input_ids: list[int], params: GenerationParams) -> PreparedPrompt:
        budget = new_token_budget(params.max_tokens, self.max_tokens_limit, served.info.max_positions, len(input_ids))
        return PreparedPrompt(input_ids, budget, params)

    async def generate(self, served: ServedModel, prompt: PreparedPrompt,
                       origin: RequestOrigin | None = None, *, stream: bool = True) -> AsyncIterator[tuple[int, Delta | Completion]]:
        """Each choice's new text as it is generated, then its Completion, as (choice index, item).

        Raises Overloaded before anything starts when `max_pending` requests are in flight, and
        GenerationTimeout past `request_timeout_s`. Closing the iterator stops the generation.
        """
        if self.pending >= self.max_pending:
            self.metrics.refused.inc()
            raise Overloaded(f"{self.pending} requests are in flight, the most this server admits "
                             f"(max_pending); retry shortly")
        started_ns = time.time_ns()
        self.pending += 1
        self.metrics.pending.set(self.pending)
        try:
            first = True
            async for index, item in self._run(served, prompt, time.monotonic() + self.request_timeout_s):
                if isinstance(item, Completion):
                    self._count(item)
                    if first:
                        first = False
                        self._answered(served, item, started_ns, origin, stream=stream)
                yield index, item
        finally:
            self.pending -= 1
            self.metrics.pending.set(self.pending)

    async def _run(self, served: ServedModel, prompt: PreparedPrompt,
                   deadline: float) -> AsyncIterator[tuple[int, Delta | Completion]]:
        """Run `prompt`'s choices in `served`'s engine; what `generate` yields, without admission.

        Raises GenerationTimeout once `deadline` (time.monotonic) passes. The deadline bounds this
        generator's own waits only, never the consumer's between two items (a timeout scope
        around an async generator would cancel whatever its consumer awaits, e.g. a socket write).
        """
        backend = served.backend
        items: asyncio.Queue[tuple[int, Delta | Completion | Exception]] = asyncio.Queue()
        running: dict[int, str] = {}  # choice index -> engine request id, while it runs

        def on_step(decoder: ChoiceDecoder, step: StepOutput) -> None:
            if decoder.index not in running:
                return  # already ended here (a stop sequence); the engine may still have sent a step
            if step.error is not None:
                running.pop(decoder.index)
                items.put_nowait((decoder.index, EngineFailed(step.error)))
                return
            piece = decoder.feed(step.tokens)
            ended = decoder.stopped or step.finished
            if ended:
                piece += decoder.finish()
            logprobs = decoder.new_logprobs()
            if piece or logprobs:
                items.put_nowait((decoder.index, Delta(piece, logprobs)))
            if ended:
                request_id = running.pop(decoder.index)
                if not step.finished:
                    backend.cancel(request_id)  # a stop sequence: the engine would go on
                items.put_nowait((decoder.index, decoder.completion()))

        served.enter()
        try:
            for index in range(prompt.params.n):
                sampling = prompt.params.sampling(index)
                sampling.rules = served.rules
                decoder = ChoiceDecoder(backend.tokenizer, index=index, stops=prompt.params.stop, eos_ids=backend.eos_ids,
                                        max_new_tokens=prompt.max_new_tokens, prompt_tokens=len(prompt.input_ids),
                                        sampling=sampling)
                running[index] = ""  # registered before submit: a step may arrive as soon as it is submitted
                running[index] = backend.submit(prompt.input_ids, prompt.max_new_tokens, sampling,
                                                lambda step, d=decoder: on_step(d, step))
            remaining = prompt.params.n
            while remaining:
                index, item = await self._next(items, deadline)
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, Completion):
                    remaining -= 1
                yield index, item
        finally:
            for request_id in running.values():
                if request_id:
                    backend.cancel(request_id)
            served.leave()

    async def _next(self, items: asyncio.Queue, deadline: float) -> tuple:
        """The next item, or GenerationTimeout once `deadline` passes."""
        if time.monotonic() < deadline:
            try:
                return items.get_nowait()  # the common case under load: no wait, no timer task
            except asyncio.QueueEmpty:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(items.get(), deadline - time.monotonic())
        raise GenerationTimeout(f"the generation ran past request_timeout_s ({self.request_timeout_s:g} s) "
                                "and was stopped")

    def _count(self, completion: Completion) -> None:
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        self.metrics.completion_tokens.inc(completion.completion_tokens)

    def _answered(self, served: ServedModel, completion: Completion, started_ns: int,
                  origin: RequestOrigin | None, *, stream: bool) -> None:
        """Record the first answer `served` gave as a span under its load, in the load's trace."""
        if served.load_span is None or not served.claim_first_answer():
            return
        origin = origin or RequestOrigin()
        attributes = {
            "flywheel.model.id": served.info.id,
            "flywheel.model.source": served.info.source,
            "flywheel.model.uri": served.info.uri,
            "flywheel.checkpoint.sha256": served.info.sha256,
            "flywheel.model.loaded_at": served.info.loaded_at.isoformat(),
            "flywheel.completion.id": origin.completion_id,
            "flywheel.completion.stream": stream,
            "flywheel.completion.tokens": completion.completion_tokens,
            "flywheel.completion.prompt_tokens": completion.prompt_tokens,
            "flywheel.completion.finish_reason": completion.finish_reason,
        }
        links = []
        if origin.span is not None and origin.span.is_valid:
            attributes["flywheel.request.trace_id"] = f"{origin.span.trace_id:032x}"
            links.append(Link(origin.span, {"flywheel.link": "request"}))
        parent = trace.set_span_in_context(NonRecordingSpan(served.load_span))
        span = tracer().start_span("first answer", context=parent, attributes=attributes, links=links,
                                   start_time=started_ns)
        span.end()
        log.info("first answer served", model=served.info.id, sha256=served.info.sha256,
                 trace_id=served.info.trace_id, completion_id=origin.completion_id)

    async def close(self) -> None:
        """Stop every engine: the served model's and any still finishing before retirement."""
        models = list(self._retiring.values())
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.current is not None:
            models.append(self.current)
            self.current = None
        for served in models:
            # Shutting down: what is still generating is stopped, not finished.
            await asyncio.to_thread(served.backend.close, 10.0, True)
