"""What one generation is, how many tokens it may produce, and the Backend protocol behind it.

A backend holds one loaded model and its batching engine. The server builds a fresh backend
for every deployment and swaps the reference once the new one answers, so a backend never
changes its weights in place. `load` and `close` block (the server runs them in a worker
thread); `submit` and `cancel` are called on the event loop and never block: the engine runs on
its own thread and hands each request's new tokens back to the loop (`StepOutput`).
`TransformersBackend` (transformers' continuous batching) is the one implementation today.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from libs.common.chat import ChatMessage
from services.inference.sampling import RowSampling, TokenLogprob

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling as the client asked for it; `max_tokens` None means "as many as allowed"."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Choices to generate for the prompt.
    n: int = 1
    # None: no log probabilities; 0: the chosen tokens'; k: and the k most likely at each position.
    top_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling(self, choice: int) -> RowSampling:
        """How choice `choice` picks its tokens: each choice of a seeded request has its own seed."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return RowSampling(temperature=self.temperature, top_p=self.top_p, seed=seed, top_logprobs=self.top_logprobs)


@dataclass(frozen=True)
class PreparedPrompt:
    """A tokenized conversation (generation prompt appended) with its token budget decided."""

    input_ids: list[int]
    max_new_tokens: int
    params: GenerationParams


@dataclass(frozen=True)
class Completion:
    """One finished choice."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    index: int = 0
    # Per generated token, when log probabilities were asked for.
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Delta:
    """New text of one choice, and the log probabilities of the tokens that came with it (if asked)."""

    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class BackendInfo:
    device: str
    dtype: str
    parameters: int
    max_positions: int
    engine: str = ""


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for a request: its new tokens, whether it is over, and why it failed."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None


class EngineFailed(RuntimeError):
    """The generation engine cannot take or finish requests."""


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the model's context."""


def new_token_budget(requested: int | None, limit: int, max_positions: int, prompt_tokens: int) -> int:
    """Tokens a request may generate: what it asked for, capped by the server limit and the context."""
    room = max_positions - prompt_tokens
    if room < 1:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens; this model's context is {max_positions} tokens, "
            "which leaves no room for a completion"
        )
    return min(requested or limit, limit, room)


class Backend(Protocol):
    name: str
    eos_ids: list[int]
    # A Hugging Face fast tokenizer: the server turns generated ids into text with it.
    tokenizer: Any

    def load(self, path: Path) -> None:
        """Load weights and tokenizer from a local model directory and start the engine (blocking)."""

    def describe(self) -> BackendInfo: ...

    def tokenize_chat(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt token ids: the model's chat template with the generation prompt added."""

    def tokenize_text(self, text: str) -> list[int]:
        """A plain text prompt's token ids (no special tokens added)."""

    def submit(self, input_ids: list[int], max_new_tokens: int, sampling: RowSampling,
               on_step: Callable[[StepOutput], None]) -> str:
        """Start a generation (on the event loop); `on_step` gets its tokens there. Returns its id."""

    def cancel(self, request_id: str) -> None:
        """Stop a generation; nothing more is delivered for it."""

    @property
    def healthy(self) -> bool: ...

    def close(self, timeout_s: float | None = None, hard: bool = False) -> None:
        """Stop the engine once the requests in flight are done, or at once when `hard` (blocking)."""
