"""The standard level: every row measured in tokens exactly as the trainer will encode it.

Checks (all rows that passed the quick checks, measured in batches):
- template          (error) the base model's chat template cannot render the conversation,
                    or not as stable prefixes, so the trainer cannot find its answer tokens
- token_length      (error) overlength policy "reject": the row is longer than max_length;
                    policy "truncate": not one answer token lies within the first max_length
                    tokens (there would be nothing left to learn from)
- token_truncation  (warning) policy "truncate": the row is longer than max_length and the
                    trainer cuts it there
max_length and the overlength policy are settings; keep max_length equal to the trainer's.

The length distribution (`LengthStats`, in the report at standard and deep): every measured
length; the summary has the quantiles, how many rows are over max_length, and a histogram of 8
equal bins up to max_length (inclusive) and one bin beyond. Lengths are counted per distinct
value, which stays small: a file of at most B bytes holds fewer than sqrt(2B) distinct lengths.

Exact and fast (`TokenCounter`). The trainer renders a chat row with the base model's chat
template and tokenizes the text (`libs.common.chat.encode_chat`, which also needs the template
to render the conversation as stable prefixes to find the answer tokens). Rendering every row
through jinja costs more than tokenizing it, so `TokenCounter` learns the template's layout
once: the text it writes before, between and after the contents, keyed by (previous role,
role, is last message, is after the last user message), from probe conversations; a row's
text is then a string concatenation. The layout is used only while it is proven right:
- at start, probes render exactly as the layout predicts, also with contents holding
  newlines, braces, quotes, the tokenizer's special tokens and every string literal of the
  template source, alone and in pairs. A literal that changes the rendering (Qwen3 treats
  `</think>` so) becomes a trigger: rows containing it are encoded in full. So do rows with
  whitespace at a content's edge when the template strips it. A template that transforms
  contents otherwise gets no layout at all;
- each conversation shape (its sequence of roles) is checked once for the prefix
  stability encode_chat needs (with probe contents: under a layout, stability depends on
  the shape alone);
- in every batch one row, in turn, is also rendered in full; a mismatch drops the layout for
  good and the batch is measured again in full.
Texts are tokenized in batches by the fast tokenizer, as encode_chat tokenizes them. Rows the
layout does not cover are measured by encode_chat itself. A completion row is its text,
without a template, plus the EOS the trainer appends (`libs.common.chat.encode_text`).
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec
import structlog

from libs.common.chat import ROLES, ChatMessage, TemplateError, assistant_char_spans, encode_chat, text_end_ids
from services.gatekeeper.checks import Batch, Check, LevelCheck
from services.gatekeeper.schemas import RowSchema

log = structlog.get_logger("gatekeeper.tokens")

Overlength = Literal["truncate", "reject"]

TEMPLATE = Check(
    "template", "standard", "error", "row",
    "the model's chat template renders the conversation as stable prefixes (the trainer needs them)",
)
TOKEN_LENGTH = Check(
    "token_length", "standard", "error", "row",
    "overlength=reject: at most max_length tokens; overlength=truncate: an answer token within the first max_length",
)
TOKEN_TRUNCATION = Check(
    "token_truncation", "standard", "warning", "row", "overlength=truncate: longer rows are cut at max_length"
)
STANDARD_CHECKS = (TEMPLATE, TOKEN_LENGTH, TOKEN_TRUNCATION)


class TokenLengths(LevelCheck):
    def __init__(self, schema: RowSchema, counter: TokenCounter, max_length: int, overlength: Overlength) -> None:
        self.schema = schema
        self.counter = counter
        self.max_length = max_length
        self.overlength = overlength
        self.stats = LengthStats(max_length)

    def __call__(self, batch: Batch) -> None:
        live = batch.live()
        if self.schema.kind == "chat":
            conversation = self.schema.conversation
            lengths = self.counter.measure_chats([conversation(batch.rows[i]) for i in live])
        else:
            text = self.schema.text
            end = len(text_end_ids(self.counter.tokenizer))  # the EOS encode_text appends
            lengths = [n + end for n in self.counter.count_texts([text(batch.rows[i]) for i in live])]
        measured = []
        for i, length in zip(live, lengths, strict=True):
            if isinstance(length, str):
                batch.error(i, TEMPLATE, length)
                continue
            measured.append(length)
            if length > self.max_length:
                self._over(batch, i, length)
        self.stats.add(measured)

    def _over(self, batch: Batch, i: int, length: int) -> None:
        if self.overlength == "reject":
            batch.error(i, TOKEN_LENGTH, f"the row is {length} tokens, over max_length {self.max_length}")
            return
        if self.schema.kind == "chat":
            messages = self.schema.conversation(batch.rows[i])
            if self.counter.trained_within(messages, self.max_length) == 0:
                batch.error(i, TOKEN_LENGTH, (
                    f"no answer token within the first {self.max_length} tokens (the row is {length} tokens): "
                    "truncated, it teaches nothing"
                ))
                return
        batch.warn(i, TOKEN_TRUNCATION, f"the row is {length} tokens; the trainer cuts it to {self.max_length}")


# ---------------------------------------------------------------------------- the length distribution

class Bin(msgspec.Struct, frozen=True):
    lo: int  # inclusive
    hi: int | None  # exclusive; None: no upper bound
    count: int


class LengthSummary(msgspec.Struct, kw_only=True):
    unit: str = "tokens"
    count: int = 0
    min: int = 0
    max: int = 0
    mean: float = 0.0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max_length: int = 0
    over_max_length: int = 0
    histogram: list[Bin] = []


class LengthStats:
    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.counts: Counter[int] = Counter()

    def add(self, lengths: Iterable[int]) -> None:
        self.counts.update(lengths)

    def summary(self) -> LengthSummary:
        total = sum(self.counts.values())
        if not total:
            return LengthSummary(max_length=self.max_length, histogram=self._histogram())
        values = sorted(self.counts)
        return LengthSummary(
            count=total, min=values[0], max=values[-1],
            mean=round(sum(v * n for v, n in self.counts.items()) / total, 2),
            p50=self._quantile(values, total, 0.5), p90=self._quantile(values, total, 0.9),
            p99=self._quantile(values, total, 0.99), max_length=self.max_length,
            over_max_length=sum(n for v, n in self.counts.items() if v > self.max_length),
            histogram=self._histogram(),
        )

    def _quantile(self, values: list[int], total: int, q: float) -> int:
        rank, seen = q * total, 0
        for value in values:
            seen += self.counts[value]
            if seen >= rank:
                return value
        return values[-1]

    def _histogram(self) -> list[Bin]:
        edges = [round(self.max_length * k / 8) for k in range(8)] + [self.max_length + 1]
        counts = [0] * len(edges)
        for value, n in self.counts.items():
            counts[bisect.bisect_right(edges, value) - 1] += n
        bins = [Bin(lo=lo, hi=hi, count=n) for lo, hi, n in zip(edges, edges[1:], counts, strict=False)]
        return [*bins, Bin(lo=self.max_length + 1, hi=None, count=counts[-1])]


# ---------------------------------------------------------------------------- token counts

# (previous role, role, is the last message, comes after the last user message)
Key = tuple[str | None, str, bool, bool]
_SENTINEL = "Fwq{}Zx"
# Contents that must render through the layout unchanged, or there is no layout.
_PLAIN_VARIANTS = ("a\n\nb", "a\tb", "{{ x }}", "{% if x %}", "'\"\\", "ünï ①⓪ 漢字", "-", "0")
# Contents with whitespace at an edge: some templates strip it (Qwen3 strips the newlines that
# start a final answer). If one renders differently, such rows are encoded in full.
_EDGE_VARIANTS = (" lead", "trail ", "\n\nnl\n\n", "\tx", "x\n", " ")
_LITERAL = re.compile(r"'((?:[^'\\\n]|\\.)*)'|\"((?:[^\"\\\n]|\\.)*)\"")
_PROBE_SHAPES = (("system", "user", "assistant"), ("user", "assistant", "user", "assistant"))
_MAX_SHAPES = 4096


class Layout:
    """A template's rendering as concatenation: glue[key] + content, for each message, + tail[last role]."""

    def __init__(self, glue: dict[Key, str], tail: dict[str, str]) -> None:
        self.glue = glue
        self.tail = tail
        # Contents the layout may not render: those containing a trigger literal, and (when
        # `edge_whitespace`) those starting or ending with whitespace.
        self.triggers: tuple[str, ...] = ()
        self.edge_whitespace = False

    def render(self, messages: Sequence) -> str | None:
        """The text, or None when this shape or content needs the real template."""
        last_user = -1
        for i, message in enumerate(messages):
            if message.role == "user":
                last_user = i
        parts = []
        previous = None
        last = len(messages) - 1
        for i, message in enumerate(messages):
            glue = self.glue.get((previous, message.role, i == last, 0 <= last_user < i))
            if glue is None:
                return None
            parts.append(glue)
            parts.append(message.content)
            previous = message.role
        tail = self.tail.get(previous)  # type: ignore[arg-type]
        if tail is None or (self.triggers or self.edge_whitespace) and not self._plain(messages):
            return None
        parts.append(tail)
        return "".join(parts)

    def _plain(self, messages: Sequence) -> bool:
        for message in messages:
            content = message.content
            if self.edge_whitespace and (content[:1].isspace() or content[-1:].isspace()):
                return False
            if any(trigger in content for trigger in self.triggers):
                return False
        return True


def learn_layout(render, template_source: str, special_tokens: Sequence[str]) -> Layout | None:
    """The template's layout, proven on probes, or None when it is not concatenative.

    `render` takes [(role, content), ...] and returns the template's text.
    """
    glue: dict[Key, str] = {}
    tail: dict[str, str] = {}
    shapes = [s for n in (1, 2, 3, 4) for s in itertools.product(ROLES, repeat=n)]
    shapes += [("system", "user", "assistant", "user", "assistant"), ("user", "assistant") * 3]
    learned = 0
    for shape in shapes:
        contents = [_SENTINEL.format(i) for i in range(len(shape))]
        try:
            text = render(list(zip(shape, contents, strict=True)))
        except Exception:  # noqa: BLE001 - a template may refuse shapes; those rows are encoded in full
            continue
        pieces = _split(text, contents)
        if pieces is None:
            return None
        last_user = max((i for i, role in enumerate(shape) if role == "user"), default=-1)
        for i, role in enumerate(shape):
            key = (shape[i - 1] if i else None, role, i == len(shape) - 1, 0 <= last_user < i)
            if glue.setdefault(key, pieces[i]) != pieces[i]:
                return None
        if tail.setdefault(shape[-1], pieces[-1]) != pieces[-1]:
            return None
        learned += 1
    if not learned:
        return None
    layout = Layout(glue, tail)
    if not all(_agrees(layout, render, variant) for variant in _PLAIN_VARIANTS):
        return None
    layout.edge_whitespace = not all(_agrees(layout, render, variant) for variant in _EDGE_VARIANTS)
    literals = {_unescape(next(g for g in m.groups() if g is not None)) for m in _LITERAL.finditer(template_source)}
    literals = sorted(literal for literal in literals | set(special_tokens) if literal.strip())
    triggers = {literal for literal in literals
                if not all(_agrees(layout, render, v) for v in (literal, f"a {literal} b", f"{literal}\nx"))}
    layout.triggers = tuple(sorted(triggers))
    # A template may test two literals together (Qwen3: a user turn that starts with
    # <tool_response> and ends with </tool_response> is not a query): try every pair.
    for first, second in itertools.permutations(literals, 2):
        if not _agrees(layout, render, f"{first}x{second}"):
            layout.triggers = tuple(sorted({*layout.triggers, first, second}))
    return layout


def _unescape(literal: str) -> str:
    """A jinja string literal's value ('\\n' in the source is a newline)."""
    try:
        return literal.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in literal else literal
    except UnicodeDecodeError:
        return literal


def _split(text: str, sentinels: list[str]) -> list[str] | None:
    pieces, position = [], 0
    for sentinel in sentinels:
        found = text.find(sentinel, position)
        if found < 0 or text.count(sentinel) != 1:
            return None
        pieces.append(text[position:found])
        position = found + len(sentinel)
    pieces.append(text[position:])
    return pieces


def _agrees(layout: Layout, render, content: str) -> bool:
    """Whether `content` in every position of the probe shapes renders as the layout says."""
    for shape in _PROBE_SHAPES:
        conversation = [(role, content) for role in shape]
        try:
            expected = render(conversation)
        except Exception:  # noqa: BLE001 - refused shapes are encoded in full anyway
            continue
        rendered = layout.render([ChatMessage(role, c) for role, c in conversation])
        if rendered is not None and rendered != expected:  # None: encoded in full, so right
            return False
    return True


class TokenCounter:
    """Exact token counts of rows, in batches, with the base model's tokenizer and chat template."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # A private copy of the fast (Rust) tokenizer under transformers' wrapper: the same
        # tokens, without building offsets we do not need. Private, because the wrapper
        # switches truncation on and off in the shared one with each call (encode_chat
        # truncates), which would silently cap our counts, and it does so from any thread.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = type(backend).from_str(backend.to_str()) if backend is not None else None
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
        # Serialises the wrapper's calls, for the same reason.
        self._wrapper_lock = threading.Lock()
        self._batches = 0
        self._shapes: dict[tuple[str, ...], str | None] = {}
        special = [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
        self.layout = learn_layout(self._render, tokenizer.chat_template or "", special)
        if self.layout is None:
            log.warning("the chat template is not a plain concatenation: every row is encoded in full")

    def _render(self, pairs: list[tuple[str, str]]) -> str:
        messages = [{"role": role, "content": content} for role, content in pairs]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def measure_chats(self, conversations: Sequence[Sequence]) -> list[int | str]:
        """Each conversation's length in tokens, or why the trainer cannot encode it."""
        layout = self.layout
        out: list[int | str] = [0] * len(conversations)
        texts, where = [], []
        for i, messages in enumerate(conversations):
            text = layout.render(messages) if layout is not None else None
            if text is None:
                out[i] = self._measure_in_full(messages)
                continue
            problem = self._shape_problem(messages)
            if problem is None:
                texts.append(text)
                where.append(i)
            else:
                out[i] = problem
        if texts:
            self._batches += 1
            probe = self._batches % len(texts)
            if not self._confirmed(conversations[where[probe]], texts[probe]):
                log.warning("the chat template layout disagreed with a full rendering; encoding every row in full")
                self.layout = None
                return self.measure_chats(conversations)
        for i, length in zip(where, self.count_texts(texts), strict=True):
            out[i] = length
        return out

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        """Token counts of texts, as the trainer tokenizes them (no special tokens added)."""
        if not texts:
            return []
        if self._backend is not None:
            return [len(e) for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        with self._wrapper_lock:
            return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def trained_within(self, messages: Sequence, max_length: int) -> int:
        """Assistant tokens left after the trainer truncates the row to `max_length` tokens."""
        with self._wrapper_lock:
            return encode_chat(self.tokenizer, _chat(messages), max_length=max_length).num_trained_tokens

    # ------------------------------------------------------------------ internals

    def _measure_in_full(self, messages: Sequence) -> int | str:
        try:
            with self._wrapper_lock:
                return len(encode_chat(self.tokenizer, _chat(messages), max_length=1 << 30).input_ids)
        except TemplateError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - the template's own complaint is the reason
            return f"the chat template refused the conversation: {type(exc).__name__}: {exc}"

    def _shape_problem(self, messages: Sequence) -> str | None:
        shape = tuple(message.role for message in messages)
        if shape not in self._shapes:
            probe = [ChatMessage(role, _SENTINEL.format(i)) for i, role in enumerate(shape)]
            try:
                assistant_char_spans(self.tokenizer, probe)
                problem = None
            except TemplateError as exc:
                problem = str(exc)
            if len(self._shapes) >= _MAX_SHAPES:
                return problem
            self._shapes[shape] = problem
        return self._shapes[shape]

    def _confirmed(self, messages: Sequence, text: str) -> bool:
        try:
            return text == self._render([(m.role, m.content) for m in messages])
        except Exception:  # noqa: BLE001 - the layout rendered what the template refuses
            return False


def _chat(messages: Sequence) -> list[ChatMessage]:
    return [ChatMessage(role=m.role, content=m.content) for m in messages]
