"""What one generation is, how many tokens it may produce, and the Backend protocol behind it.

A backend holds one loaded model. The server builds a fresh backend for every deployment and
swaps the reference once the new one answers, so a backend never changes its weights in
place. Its methods are blocking: the server calls them from worker threads, never from the
event loop. `TransformersBackend` is the one implementation today; a vLLM one fits the same
protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from libs.common.chat import ChatMessage

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling as the client asked for it; `max_tokens` None means "as many as allowed"."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class PreparedPrompt:
    """A tokenized conversation (generation prompt appended) with its token budget decided."""

    input_ids: list[int]
    max_new_tokens: int
    params: GenerationParams


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class BackendInfo:
    device: str
    dtype: str
    parameters: int
    max_positions: int


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
    def load(self, path: Path) -> None:
        """Load weights and tokenizer from a local model directory."""

    def describe(self) -> BackendInfo: ...

    def tokenize_chat(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt token ids: the model's chat template with the generation prompt added."""

    def generate(self, prompt: PreparedPrompt, cancel: threading.Event | None = None) -> Completion: ...

    def stream(
        self, prompt: PreparedPrompt, on_text: Callable[[str], None], cancel: threading.Event | None = None
    ) -> Completion:
        """Generate, handing each new piece of final text to `on_text` as soon as it is certain."""
