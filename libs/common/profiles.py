"""Data profiles: a row transform a dataset names at submission, plus the rules its model is generated with.

A submission names a profile (`DatasetSubmitted.profile`, default "none"); the gatekeeper checks
the name and copies it onto `dataset.accepted`; the trainer applies it to the accepted rows
before tokenizing (`apply_profile`) and records it on the checkpoints; the evaluator (and
inference) prompt with its system prompt and generate under its `GenerationRules`
(`libs.common.profile_logits` turns them into a transformers LogitsProcessor). One object per
profile holds all three, so what a model is trained on and how it is asked cannot drift apart.

Not to be confused with a chat_sft_v1 row's own `profile` field ("binary"): that names the
answer format the gatekeeper's deep level checks; this names a transform of whole datasets.

Profiles (SEED-SYSTEM.md, "Data profiles"):
- `none`: rows as they are, no system prompt, no generation rules.
- `emoji_think`: `<think>`/`</think>` tags are removed from every assistant turn and the
  profile's system prompt is injected into every row. Half of the rows (one of each pair of
  indices 2k, 2k+1, chosen by a hash) also learn an emoji protocol: each assistant turn starts
  with a thinking emoji (one of ten) repeated 2-8 times and a newline, and ends with a newline
  and a stop emoji (one of ten others) repeated 2-4 times; each user turn gets the matching
  instructions, the counts written as words ("think with 🤔 /five/ times", "emit 🛑 /twice/").
  At generation: a penalty on `<think>` tags, escalating penalties on every token once a stop
  emoji has appeared twice, and a reward for EOS there.
- `regime3`: the profile's system prompt is injected; every assistant turn is wrapped in
  `<<ANS_START>> … <<ANS_END>>` (a missing marker is added; the content is expected in the
  canonical `(op arg1 arg2)` form already and is not rewritten). No generation rules.

Deterministic: a row's transform depends on the row and its index alone; every choice comes
from sha256("<profile>:<index>"), never from a random generator's state, so the same dataset
trains on the same text on every run, every resume and every machine. The index is the row's
0-based position in the accepted dataset file (`DatasetAccepted.uri`).

A system prompt goes into the row's first message: the profile's prompt, a blank line, then
the row's own system message when it has one (the row's instructions are kept, after the
profile's), else a new system message in front.

Pure and importable without torch (the gatekeeper and the CLI use it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import msgspec

from libs.common.chat import ChatMessage, ChatRow

# ---------------------------------------------------------------------------- generation rules


class GenerationRules(msgspec.Struct, frozen=True, kw_only=True):
    """How a profile's model must be generated from; the defaults change nothing.

    - `think_tags` (texts) lose `think_penalty` from their logits: a tag that is one token
      always, a tag of several tokens on the token that would continue it (see profile_logits).
    - Once one of `stop_sequences` has appeared in the generated text, every later token but EOS
      loses `post_stop_penalty * post_stop_escalation ** n` (n: tokens generated since), and EOS
      gains `eos_reward`.
    """

    think_tags: tuple[str, ...] = ()
    think_penalty: float = 0.0
    stop_sequences: tuple[str, ...] = ()
    post_stop_penalty: float = 0.0
    post_stop_escalation: float = 1.0
    eos_reward: float = 0.0

    @property
    def neutral(self) -> bool:
        """True when the rules change no logit."""
        think = bool(self.think_tags) and self.think_penalty != 0.0
        stop = bool(self.stop_sequences) and (self.post_stop_penalty != 0.0 or self.eos_reward != 0.0)
        return not (think or stop)


NO_RULES = GenerationRules()

# ---------------------------------------------------------------------------- the profiles


class Profile:
    """One profile: its name, its row transform, its system prompt and its generation rules."""

    name: str = "none"
    description: str = "rows as they are"
    system_prompt: str = ""
    rules: GenerationRules = NO_RULES

    def transform(self, row: ChatRow, index: int) -> ChatRow:
        """The row as the trainer trains on it; `index` is its 0-based position in the dataset."""
        return row

    def prompted(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """`messages` with the profile's system prompt: how its model is asked (training and scoring alike)."""
        return with_system_prompt(messages, self.system_prompt)

    def answer(self, text: str) -> str:
        """The part of a generated text that states the answer: the profile's own wrapping removed."""
        return text

    def __repr__(self) -> str:
        return f"<profile {self.name}>"


def with_system_prompt(messages: Sequence[ChatMessage], prompt: str) -> list[ChatMessage]:
    """The profile's `prompt` first in the system message (the row's own, if any, after a blank line)."""
    if not prompt:
        return list(messages)
    if messages and messages[0].role == "system":
        first = messages[0].content
        return [ChatMessage("system", f"{prompt}\n\n{first}" if first.strip() else prompt), *messages[1:]]
    return [ChatMessage("system", prompt), *messages]


def choices(profile: str, index: int, count: int) -> list[int]:
    """`count` deterministic 64-bit numbers for row `index` of `profile`, from sha256("<profile>:<index>")."""
    digest = b""
    block = 0
    while len(digest) < 8 * count:
        digest += hashlib.sha256(f"{profile}:{index}:{block}".encode()).digest()
        block += 1
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "big") for i in range(count)]


# ---------------------------------------------------------------------------- emoji_think

THINKING_EMOJIS: tuple[str, ...] = ("🤔", "💭", "🧠", "💡", "🎯", "🔍", "🤨", "🧐", "⚡", "✨")
STOP_EMOJIS: tuple[str, ...] = ("🛑", "⛔", "🚫", "❌", "🔴", "⏹️", "🔚", "✋", "🚦", "🛡️")
THINK_COUNTS = range(2, 9)
STOP_COUNTS = range(2, 5)
_THINK_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_STOP_WORDS = {2: "twice", 3: "three times", 4: "four times"}
_THINK_TAG = re.compile(r"</?think>")


def _emoji_pattern(emojis: Sequence[str]) -> str:
    # A model may drop the variation selector (U+FE0F) of "⏹️" and "🛡️": either form counts.
    return "|".join(re.escape(e.rstrip("\ufe0f")) + "\ufe0f?" for e in emojis)


_LEADING_THOUGHT = re.compile(rf"^\s*(?:{_emoji_pattern(THINKING_EMOJIS)})+[ \t]*\n?")
_TRAILING_STOP = re.compile(rf"\s*(?:{_emoji_pattern(STOP_EMOJIS)})+\s*$")


class EmojiPlan(msgspec.Struct, frozen=True):
    """What emoji_think does to one row: nothing beyond the common part, or this protocol."""

    think: str
    think_count: int
    stop: str
    stop_count: int

    @property
    def instruction(self) -> str:
        return (f"For this task, think with {self.think} /{_THINK_WORDS[self.think_count]}/ times.\n"
                f"When finished, emit {self.stop} /{_STOP_WORDS[self.stop_count]}/ to signal completion.")

    @property
    def prefix(self) -> str:
        return self.think * self.think_count + "\n"

    @property
    def suffix(self) -> str:
        return "\n" + self.stop * self.stop_count


class EmojiThink(Profile):
    name = "emoji_think"
    description = ("half the rows think with an emoji prefix and end with a stop emoji suffix, as their user turn "
                   "asks; <think> tags stripped; penalties on <think> and on anything after the stop at generation")
    system_prompt = (
        "You are a careful assistant. When the user asks you to think with an emoji a number of times, start "
        "your answer with that emoji repeated exactly that many times on a line of its own. When the user asks "
        "you to emit a stop emoji when finished, end your answer with that emoji repeated exactly as asked, "
        "and write nothing after it. Never write <think> tags."
    )
    rules = GenerationRules(
        think_tags=("<think>", "</think>"),
        think_penalty=80.0,
        # Every stop suffix starts with its emoji twice: from there on, the answer is over. "⏹️" and
        # "🛡️" count without their variation selector too.
        stop_sequences=tuple(dict.fromkeys(form * 2 for stop in STOP_EMOJIS for form in (stop, stop.rstrip("\ufe0f")))),
        post_stop_penalty=100.0,
        post_stop_escalation=10.0,
        eos_reward=50.0,
    )

    def plan(self, index: int) -> EmojiPlan | None:
        """The emoji protocol row `index` learns, or None: one row of each pair (2k, 2k+1) gets one."""
        pick, think, think_count, stop, stop_count = choices(self.name, index // 2, 5)
        if pick % 2 != index % 2:
            return None
        return EmojiPlan(
            think=THINKING_EMOJIS[think % len(THINKING_EMOJIS)],
            think_count=THINK_COUNTS[think_count % len(THINK_COUNTS)],
            stop=STOP_EMOJIS[stop % len(STOP_EMOJIS)],
            stop_count=STOP_COUNTS[stop_count % len(STOP_COUNTS)],
        )

    def transform(self, row: ChatRow, index: int) -> ChatRow:
        plan = self.plan(index)
        messages = []
        for message in self.prompted(row.messages):
            content = message.content
            if message.role == "assistant":
                content = _THINK_TAG.sub("", content).strip()
                if plan is not None:
                    content = plan.prefix + content + plan.suffix
            elif message.role == "user" and plan is not None:
                content = content.rstrip() + "\n\n" + plan.instruction
            messages.append(ChatMessage(message.role, content))
        return ChatRow(messages=messages)

    def answer(self, text: str) -> str:
        return _TRAILING_STOP.sub("", _LEADING_THOUGHT.sub("", text, count=1), count=1).strip()


# ---------------------------------------------------------------------------- regime3

ANS_START = "<<ANS_START>>"
ANS_END = "<<ANS_END>>"


class Regime3(Profile):
    name = "regime3"
    description = "answers in canonical (op arg1 arg2) form between <<ANS_START>> and <<ANS_END>>"
    system_prompt = (
        "You are a symbolic reasoning assistant. Write every operation in canonical form: (op arg1 arg2). "
        f"Wrap your final answer in {ANS_START} ... {ANS_END}."
    )

    def transform(self, row: ChatRow, index: int) -> ChatRow:
        return ChatRow(messages=[
            ChatMessage("assistant", with_markers(m.content)) if m.role == "assistant" else m
            for m in self.prompted(row.messages)
        ])

    def answer(self, text: str) -> str:
        """The text between the markers (from the start marker to the end when the end is missing)."""
        start = text.find(ANS_START)
        if start < 0:
            return text.strip()
        inner = text[start + len(ANS_START) :]
        end = inner.find(ANS_END)
        return (inner if end < 0 else inner[:end]).strip()


def with_markers(content: str) -> str:
    """`content` between the answer markers, adding whichever is missing."""
    content = content.strip()
    if ANS_START not in content:
        content = f"{ANS_START} {content}"
    if ANS_END not in content:
        content = f"{content} {ANS_END}"
    return content


# ---------------------------------------------------------------------------- the registry

DEFAULT_PROFILE = "none"
PROFILES: dict[str, Profile] = {p.name: p for p in (Profile(), EmojiThink(), Regime3())}


class UnknownProfile(ValueError):
    pass


def get_profile(name: str) -> Profile:
    """The profile called `name`; UnknownProfile naming the known ones when there is none."""
    try:
        return PROFILES[name]
    except KeyError:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise UnknownProfile(f"unknown profile {shown!r}; known: {', '.join(PROFILES)}") from None


def apply_profile(rows: Sequence[ChatRow], name: str, start: int = 0) -> list[ChatRow]:
    """Each row transformed by profile `name`; row i has index `start + i` (0-based in the dataset file).

    `start` lets a caller that reads the file in chunks keep every row's index.
    """
    profile = get_profile(name)
    return [profile.transform(row, start + i) for i, row in enumerate(rows)]
