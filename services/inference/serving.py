"""The served model: load and verify a new one beside the old, swap, and run generations.

- A load runs in a worker thread while the current model keeps answering. The new model is
  served only after its artifact hash matched and it generated a token; then one reference
  assignment swaps it in. A failed load leaves the current model serving. Loads run one at a
  time; `withdraw` (a deployment that failed) waits for a load in progress before it decides.
- A request takes the current `ServedModel` once and keeps that reference to the end, so a
  swap never changes the model under a running generation; the old one is freed when its
  last request finishes.
- Generations run one at a time on a single worker thread: CPU torch calls do not pile up
  and the event loop stays free.
- The first answer a loaded model serves is recorded as a "first answer" span under its
  "model load" span, in the load's trace: for a deployment that is the dataset's own trace,
  which so runs from submission to the first answer served by the model the dataset produced.
  The request keeps its own trace (a `traceparent` it sent), which the span links to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from libs.common.artifacts import ArtifactStore
from libs.common.chat import ChatMessage
from libs.common.log import get_logger
from libs.common.tracing import current_trace_id, tracer
from services.inference.champion import ModelTarget, Source, needs_reload
from services.inference.generation import Backend, Completion, GenerationParams, PreparedPrompt, new_token_budget
from services.inference.metrics import InferenceMetrics

log = get_logger("inference.serving")

_PROBE = [ChatMessage(role="user", content="ping")]


class ReloadFailed(RuntimeError):
    """A new model could not be loaded or verified; the previous one is still served."""


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
    # The trace the load ran in (for a deployment: the deployment's own trace) and the event.
    trace_id: str
    event_id: str


@dataclass(frozen=True)
class ServedModel:
    backend: Backend
    target: ModelTarget
    info: ModelInfo
    # The "model load" span this model was loaded in: its first answer is recorded under it.
    load_span: SpanContext | None = None
    # Acquired once, never released: whoever gets it records the first answer.
    _first_answer: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def claim_first_answer(self) -> bool:
        """True exactly once per loaded model, whichever thread or task asks first."""
        return self._first_answer.acquire(blocking=False)


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
    ) -> None:
        self.store = store
        self.base_model = base_model
        self.backend_factory = backend_factory
        self.metrics = metrics
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.current: ServedModel | None = None
        self.last_error = ""
        self._reload_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

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
            try:
                # A copy of the context goes with the thread, so the load's spans nest here.
                served = await asyncio.to_thread(self._load, target, current_trace_id(), span.get_span_context())
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old model
                self.metrics.reloads.labels("failed").inc()
                self.last_error = f"loading {target.source} {target.uri or ''}: {exc}".strip()
                log.error("model load failed; keeping the current model", target=target.uri,
                          source=target.source, error=repr(exc),
                          serving=self.current.info.id if self.current else None)
                raise ReloadFailed(self.last_error) from exc
        self.current = served
        self.last_error = ""
        self.metrics.reloads.labels("ok").inc()
        log.info("model loaded", **msgspec.to_builtins(served.info))
        return served.info

    def _load(self, target: ModelTarget, trace_id: str, load_span: SpanContext | None = None) -> ServedModel:
        if target.source == "champion":
            path = self.store.verify(target.uri, target.sha256)
        else:
            path = self.base_model()
            target = replace(target, uri=path.resolve().as_uri())
        backend = self.backend_factory()
        backend.load(path)
        probe = PreparedPrompt(backend.tokenize_chat(_PROBE), 1, GenerationParams(max_tokens=1, temperature=0))
        if backend.generate(probe).completion_tokens != 1:
            raise ReloadFailed(f"{path}: the loaded model did not generate a token")
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
            trace_id=trace_id,
            event_id=target.event_id,
        )
        return ServedModel(backend, target, info, load_span if load_span and load_span.is_valid else None)

    # ------------------------------------------------------------------ generating

    async def prepare(self, served: ServedModel, messages: list[ChatMessage],
                      params: GenerationParams) -> PreparedPrompt:
        """Tokenize and budget a request; raises PromptTooLong."""
        # On the generation thread: a fast tokenizer must not encode and decode concurrently.
        loop = asyncio.get_running_loop()
        input_ids = await loop.run_in_executor(self._executor, served.backend.tokenize_chat, messages)
        budget = new_token_budget(params.max_tokens, self.max_tokens_limit, served.info.max_positions, len(input_ids))
        return PreparedPrompt(input_ids, budget, params)

    async def complete(self, served: ServedModel, prompt: PreparedPrompt,
                       origin: RequestOrigin | None = None) -> Completion:
        started_ns = time.time_ns()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            completion = await loop.run_in_executor(self._executor, served.backend.generate, prompt, cancel)
        finally:
            cancel.set()  # stops the worker early if this request was abandoned
        self._count(completion)
        self._answered(served, completion, started_ns, origin, stream=False)
        return completion

    async def stream(self, served: ServedModel, prompt: PreparedPrompt,
                     origin: RequestOrigin | None = None) -> AsyncIterator[str | Completion]:
        """Text pieces as they are generated, then the Completion. Closing it cancels the generation."""
        started_ns = time.time_ns()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def on_done(future: asyncio.Future) -> None:
            # Runs after every on_text callback (both come through the loop in order), so the
            # end marker is last. Reading the exception keeps an abandoned failure from being
            # reported as never retrieved; a reader that stays gets it from result().
            if not future.cancelled():
                future.exception()
            pieces.put_nowait(None)

        future = loop.run_in_executor(self._executor, served.backend.stream, prompt, on_text, cancel)
        future.add_done_callback(on_done)
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            completion = future.result()
        finally:
            cancel.set()
        self._count(completion)
        self._answered(served, completion, started_ns, origin, stream=True)
        yield completion

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
        self._executor.shutdown(wait=False, cancel_futures=True)
