"""The Hugging Face transformers backend: `model.generate` on one conversation at a time.

One stopping-criteria hook does the per-token work. transformers calls stopping criteria
after every token with the whole sequence (before its streamer, in 5.x), so this hook decodes
the completion so far, hands certain text to the stream, and ends generation on a stop
sequence or a cancelled request in the same step: what is streamed and where generation stops
always agree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from libs.common.chat import ChatMessage
from libs.common.models import load_model, load_tokenizer, pick_device
from services.inference.generation import BackendInfo, Completion, PreparedPrompt
from services.inference.stopping import StopScanner


class _Watcher:
    """A StoppingCriteria: decode, stream, and stop on a stop sequence or cancellation."""

    def __init__(self, tokenizer, prompt_len: int, stops: tuple[str, ...], on_text: Callable[[str], None],
                 cancel: threading.Event | None) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.scanner = StopScanner(stops)
        self.on_text = on_text
        self.cancel = cancel
        self.generated: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.generated = input_ids[0, self.prompt_len:].tolist()
        # Decoding the whole completion each step (not token by token) keeps multi-token
        # characters and tokenizer-specific spacing right; completions are short.
        piece = self.scanner.feed(self.tokenizer.decode(self.generated, skip_special_tokens=True))
        if piece:
            self.on_text(piece)
        done = self.scanner.stopped or (self.cancel is not None and self.cancel.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class TransformersBackend:
    def __init__(self, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.model = None
        self.tokenizer = None
        self._eos: set[int] = set()

    def load(self, path: Path) -> None:
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, self.device)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos = set(eos) if isinstance(eos, list) else {eos}

    def describe(self) -> BackendInfo:
        config = self.model.config
        return BackendInfo(
            device=self.device,
            dtype=str(self.model.dtype).removeprefix("torch."),
            parameters=sum(p.numel() for p in self.model.parameters()),
            max_positions=int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length),
        )

    def tokenize_chat(self, messages: list[ChatMessage]) -> list[int]:
        plain = [{"role": m.role, "content": m.content} for m in messages]
        text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        # The template already wrote every special token the model expects.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompt: PreparedPrompt, cancel: threading.Event | None = None) -> Completion:
        return self.stream(prompt, lambda _text: None, cancel)

    def stream(self, prompt: PreparedPrompt, on_text: Callable[[str], None],
               cancel: threading.Event | None = None) -> Completion:
        import torch
        from transformers import StoppingCriteriaList

        prompt_len = len(prompt.input_ids)
        watcher = _Watcher(self.tokenizer, prompt_len, prompt.params.stop, on_text, cancel)
        if cancel is not None and cancel.is_set():
            return Completion("", "stop", prompt_len, 0)
        params = prompt.params
        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.seed is not None and not params.greedy:
            # The global generator: fine because generations run one at a time.
            torch.manual_seed(params.seed)
        input_ids = torch.tensor([prompt.input_ids], device=self.device)
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=prompt.max_new_tokens,
                do_sample=not params.greedy,
                stopping_criteria=StoppingCriteriaList([watcher]),
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        piece = watcher.scanner.finish()
        if piece:
            on_text(piece)
        hit_eos = bool(watcher.generated) and watcher.generated[-1] in self._eos
        stopped = watcher.scanner.stopped or hit_eos or len(watcher.generated) < prompt.max_new_tokens
        return Completion(
            text=watcher.scanner.text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt_len,
            completion_tokens=len(watcher.generated),
        )
