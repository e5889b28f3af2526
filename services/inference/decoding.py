"""Generated token ids -> the text a client sees, token by token.

`tokenizers`' `DecodeStream` turns one token at a time into the new text it adds (constant work
per token, multi-byte characters held back until they are complete); `StopScanner` decides
which of that text is certain (the stop sequences, never returned, as in the OpenAI API).
A choice ends at a stop sequence (finish "stop", the engine is told to stop it), at EOS ("stop")
or at its token budget ("length").
"""

from __future__ import annotations

from services.inference.generation import Completion
from services.inference.sampling import RowSampling, TokenLogprob
from services.inference.stopping import StopScanner


class ChoiceDecoder:
    """One choice's text as its tokens arrive."""

    def __init__(self, tokenizer, *, index: int, stops: tuple[str, ...], eos_ids: list[int], max_new_tokens: int,
                 prompt_tokens: int, sampling: RowSampling) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.index = index
        self.scanner = StopScanner(stops)
        self.eos_ids = set(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens = prompt_tokens
        self.sampling = sampling
        self.tokens: list[int] = []
        self.hit_eos = False
        self._stream = DecodeStream(skip_special_tokens=True)
        self._text = ""
        self._logprobs_sent = 0

    @property
    def stopped(self) -> bool:
        """A stop sequence or EOS ended it: no token after this one counts."""
        return self.scanner.stopped or self.hit_eos

    def feed(self, tokens: list[int]) -> str:
        """The text these new tokens make certain ("" if none)."""
        piece = ""
        for token in tokens:
            if self.stopped:
                break
            self.tokens.append(token)
            if token in self.eos_ids:
                self.hit_eos = True
                break
            added = self._stream.step(self.tokenizer._tokenizer, token)
            if added:
                self._text += added
                piece += self.scanner.feed(self._text)
        return piece

    def new_logprobs(self) -> list[TokenLogprob] | None:
        """The log probabilities of the tokens counted since the last call (None: not asked for)."""
        if self.sampling.top_logprobs is None:
            return None
        # The sampler records a token's entry before the engine hands the token over, maybe one more.
        end = min(len(self.tokens), len(self.sampling.logprobs))
        fresh = self.sampling.logprobs[self._logprobs_sent:end]
        self._logprobs_sent = end
        return fresh

    def finish(self) -> str:
        """Generation ended: whatever was held back for a possible stop sequence is final now, and so
        are bytes the decode stream still held for a character they never completed (decoded as
        U+FFFD, as a whole decode of the tokens gives them)."""
        piece = ""
        whole = self.tokenizer.decode([t for t in self.tokens if t not in self.eos_ids], skip_special_tokens=True)
        if not self.stopped and len(whole) > len(self._text) and whole.startswith(self._text):
            self._text = whole
            piece = self.scanner.feed(whole)
        return piece + self.scanner.finish()

    def completion(self) -> Completion:
        stopped = self.stopped or len(self.tokens) < self.max_new_tokens
        logprobs = None
        if self.sampling.top_logprobs is not None:
            logprobs = self.sampling.logprobs[: len(self.tokens)]
        return Completion(
            text=self.scanner.text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens),
            index=self.index,
            logprobs=logprobs,
        )
