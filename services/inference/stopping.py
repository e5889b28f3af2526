"""Where generated text ends (stop sequences) and which part of it is safe to stream yet.

The decoded text grows token by token. A piece may only be sent once it can no longer turn
out to be the start of a stop sequence (the stop text itself is never returned, as in the
OpenAI API) and once it is not a half-decoded character: byte-level tokenizers decode an
incomplete UTF-8 sequence as U+FFFD until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str]) -> int:
    """The index where the earliest stop sequence starts in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else -1


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopScanner:
    """Feed it the whole decoded completion after every token; it returns the new safe text."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._sent = 0
        self._text = ""

    @property
    def text(self) -> str:
        """Everything sent so far: the final completion once finished."""
        return self._text[: self._sent]

    def feed(self, text: str) -> str:
        """The text that became certain with this update ("" if none); sets `stopped` on a stop sequence."""
        if self.stopped:
            return ""
        self._text = text
        cut = find_stop(text, self.stops)
        if cut >= 0:
            self.stopped = True
            return self._advance(cut)
        safe = len(text) - _held_suffix(text, self.stops)
        # An unfinished character decodes as exactly one trailing U+FFFD (a maximal invalid
        # subpart); any earlier U+FFFD is final.
        if safe > self._sent and text[safe - 1] == _REPLACEMENT:
            safe -= 1
        return self._advance(safe)

    def finish(self) -> str:
        """Generation ended without a stop sequence: whatever was held back is final now."""
        return "" if self.stopped else self._advance(len(self._text))

    def _advance(self, end: int) -> str:
        piece = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece
