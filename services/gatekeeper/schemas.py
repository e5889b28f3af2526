"""The row formats the gatekeeper accepts, deny by default and versioned, with each one's quick row checks.

- chat_sft_v1    chat conversations; the default when a submission names none
- syllo_v1       SYLLO word puzzles: chat rows plus the puzzle they pose
- completion_v1  plain `{"text": ...}` rows

A submission names its schema; a name not in `SCHEMAS` rejects it with the list of known ones.
A new format, or a new version of one, is a new class with a new name listed there: a schema
never changes under its name. `json_schemas` feeds the AsyncAPI document (`flywheel asyncapi`)
and `GET /specs`.

Decoding (reading.py asks the schema): a well-formed row takes the fast path, the schema's
strict msgspec decoder, which enforces the shape, the roles and the profile, and then only
`row_problems` (the content and turn checks) in Python. A line the strict decoder refuses is
decoded again generically and `from_object` says precisely what is wrong. Accepted rows are
written normalised: compact JSON, UTF-8, extra fields dropped, content untouched.

chat_sft_v1: one conversation per line, `{"messages": [{"role", "content"}, ...]}`, written as
`{"messages":[{"role":"...","content":"..."}]}` (plus `"profile"` when given), which
`libs.common.chat.ChatRow` reads. Quick row checks, in the order they run (errors unless marked):
- messages_field       the row has a `messages` list with at least one message
- message_shape        each message is an object with string `role` and `content`
- role                 each role is system, user or assistant
- profile              an optional `profile` names a known answer profile
- extra_fields         (warning) other fields are dropped
- content_nonempty     no content is empty or whitespace only
- has_assistant        at least one assistant turn
- last_turn_assistant  the conversation ends with an assistant turn (what is trained on)

syllo_v1: a SYLLO puzzle gives syllables to assemble into words. A row is a chat_sft_v1
conversation (same checks, same normalised form; the `profile` field is not part of it, every
row has the `syllo` profile) plus a required `puzzle`:

    {"messages": [...],
     "puzzle": {"syllables": ["ba", "na", "na", "ap", "ple"], "answers": ["banana", "apple"],
                "difficulty": 2}}

Quick row checks: those of chat_sft_v1 but profile, and
- puzzle   a `puzzle` object with `syllables` (1..64) and `answers` (1..32), lists of
           non-empty strings, and an optional integer `difficulty` >= 1

completion_v1: plain text to continue, one `{"text": "..."}` per line, written as `{"text":"..."}`.
Quick row checks:
- text_field        the row has a string `text`
- extra_fields      (warning) other fields are dropped
- content_nonempty  the text is not empty or whitespace only
Standard measures the text's tokens without a chat template, plus the EOS the trainer appends;
deep looks for duplicates (there is no prompt, so no answer leakage or profile). Their `schema`
travels in `dataset.accepted`, and the trainer trains them with loss on the whole text
(`libs.common.chat.encode_text`; `libs.common.chat.SCHEMA_KINDS` must name every schema here).

Answer profiles: what a well-formed answer looks like for a kind of task, checked at the deep
level (answer_format, checks/deep.py). A row's profile is explicit, never guessed from its
content: a chat_sft_v1 row names it in its `profile` field (`"profile": "binary"`), and every
syllo_v1 row has the `syllo` profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Protocol

import msgspec

from libs.common.chat import ROLES
from services.gatekeeper.checks import Check

Findings = list[tuple[Check, str]]
# (index of the row in its block, check, reason)
Problems = list[tuple[int, Check, str]]

# Answer profiles: those a chat_sft_v1 row may name, and every one (syllo_v1 rows have `syllo`).
CHAT_PROFILES: tuple[str, ...] = ("binary",)
PROFILES: tuple[str, ...] = (*CHAT_PROFILES, "syllo")


class RowSchema(Protocol):
    """A row format: how its rows are decoded and checked, seen by the level checks, and written."""

    name: str
    # "chat": rendered with the chat template; "text": tokenized as is.
    kind: Literal["chat", "text"]
    description: str
    row_type: type
    profiles: tuple[str, ...]  # answer profiles its rows may have (deep: answer_format)
    checks: tuple[Check, ...]  # its quick row checks

    decoder: msgspec.json.Decoder  # strict: decodes a row of the schema or raises
    def from_object(self, value: dict, found: Findings): ...
    def row_problems(self, rows: Sequence) -> Problems: ...
    def conversation(self, row): ...
    def text(self, row) -> str: ...
    def prompt_and_answer(self, row) -> tuple[str, str] | None: ...
    def profile(self, row) -> str | None: ...
    def encode(self, row) -> bytes: ...
    def encode_lines(self, rows: Sequence) -> bytes: ...


_encoder = msgspec.json.Encoder()


# ---------------------------------------------------------------------------- chat_sft_v1

MESSAGES_FIELD = Check("messages_field", "quick", "error", "row", "a `messages` list with at least one message")
MESSAGE_SHAPE = Check(
    "message_shape", "quick", "error", "row", "each message is an object with string role and content"
)
ROLE = Check("role", "quick", "error", "row", "each role is system, user or assistant")
PROFILE = Check("profile", "quick", "error", "row", f"an optional `profile` is one of: {', '.join(CHAT_PROFILES)}")
EXTRA_FIELDS = Check("extra_fields", "quick", "warning", "row", "fields the schema does not define are dropped")
CONTENT_NONEMPTY = Check("content_nonempty", "quick", "error", "row", "no content is empty or whitespace only")
HAS_ASSISTANT = Check("has_assistant", "quick", "error", "row", "at least one assistant turn")
LAST_TURN_ASSISTANT = Check("last_turn_assistant", "quick", "error", "row", "the last turn is the assistant's")

ChatProfile = Literal[CHAT_PROFILES]  # type: ignore[valid-type]


# gc=False: rows never take part in reference cycles, and untracked objects make decoding a
# block cheaper for the garbage collector (measured: ~2x on 64 KiB blocks).
class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One chat_sft_v1 row: system/user/assistant messages, the last one from the assistant."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    # Names the answer format the deep level checks (checks/deep.py); explicit, never guessed.
    profile: ChatProfile | None = None


class ChatSftV1:
    name = "chat_sft_v1"
    kind = "chat"
    description = "chat conversations for supervised fine-tuning; loss on assistant turns"
    row_type: type = ChatRow
    profiles: tuple[str, ...] = CHAT_PROFILES  # answer profiles a row may name
    fields = ("messages", "profile")
    checks: tuple[Check, ...] = (
        MESSAGES_FIELD, MESSAGE_SHAPE, ROLE, PROFILE, EXTRA_FIELDS, CONTENT_NONEMPTY, HAS_ASSISTANT,
        LAST_TURN_ASSISTANT,
    )

    def __init__(self) -> None:
        # Strict: the shape, the roles and the profile are enforced while decoding.
        self.decoder = msgspec.json.Decoder(self.row_type)

    # ------------------------------------------------------------------ decoding

    def from_object(self, value: dict, found: Findings):
        """Structural checks on a generically decoded object; the row if it has no errors."""
        extra = sorted(key for key in value if key not in self.fields)
        if extra:
            found.append((EXTRA_FIELDS, f"fields {extra} are not part of {self.name} and are dropped"))
        messages = self._messages(value, found)
        profile = self._profile(value, found)
        if messages is None or profile is False:
            return None
        return ChatRow(messages=messages, profile=profile)

    def _messages(self, value: dict, found: Findings) -> list[Message] | None:
        messages = value.get("messages")
        if "messages" not in value:
            found.append((MESSAGES_FIELD, "no `messages` field"))
            return None
        if not isinstance(messages, list):
            found.append((MESSAGES_FIELD, f"`messages` is {kind_of(messages)}, expected a list"))
            return None
        if not messages:
            found.append((MESSAGES_FIELD, "`messages` is empty"))
            return None
        ok = True
        extra_keys: set[str] = set()
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                found.append((MESSAGE_SHAPE, f"messages[{i}] is {kind_of(message)}, expected an object"))
                ok = False
                continue
            extra_keys.update(key for key in message if key not in ("role", "content"))
            for key in ("role", "content"):
                if key not in message:
                    found.append((MESSAGE_SHAPE, f"messages[{i}] has no `{key}`"))
                    ok = False
                elif not isinstance(message[key], str):
                    found.append((MESSAGE_SHAPE, f"messages[{i}].{key} is {kind_of(message[key])}, expected a string"))
                    ok = False
            role = message.get("role")
            if isinstance(role, str) and role not in ROLES:
                found.append((ROLE, f"messages[{i}].role is {_quote(role)}; allowed: {', '.join(ROLES)}"))
                ok = False
        if extra_keys:
            found.append((EXTRA_FIELDS, f"message fields {sorted(extra_keys)} are dropped"))
        return [Message(role=m["role"], content=m["content"]) for m in messages] if ok else None

    def _profile(self, value: dict, found: Findings) -> str | None | bool:
        """The row's profile, None when it names none, False when it names an unknown one."""
        profile = value.get("profile")
        if profile is None or profile in CHAT_PROFILES:
            return profile
        found.append((PROFILE, f"profile {_quote(profile)} is unknown; known: {', '.join(CHAT_PROFILES)}"))
        return False

    # ------------------------------------------------------------------ row checks

    def row_problems(self, rows: Sequence) -> Problems:
        """The quick checks strict decoding does not make: content and turns."""
        # Nearly every block is clean: a plain scan (the fastest form, measured) proves it.
        for row in rows:
            messages = row.messages
            if messages[-1].role != "assistant":
                break
            for message in messages:
                content = message.content
                if not content or content.isspace():
                    break
            else:
                continue
            break
        else:
            return []
        problems: Problems = []
        for i, row in enumerate(rows):
            messages = row.messages
            for j, message in enumerate(messages):
                if not message.content or message.content.isspace():
                    problems.append((i, CONTENT_NONEMPTY, f"messages[{j}] ({message.role}) has empty content"))
            if messages[-1].role != "assistant":
                if not any(message.role == "assistant" for message in messages):
                    problems.append((i, HAS_ASSISTANT, "no assistant turn: nothing to train on"))
                else:
                    problems.append((i, LAST_TURN_ASSISTANT,
                                     f"the last turn is {messages[-1].role!r}; it must be the assistant's"))
        return problems

    # ------------------------------------------------------------------ views for the level checks

    def conversation(self, row) -> list[Message]:
        return row.messages

    def text(self, row) -> str:
        """The row's text as compared for near duplicates."""
        return "\n".join(f"{m.role}: {m.content}" for m in row.messages)

    def prompt_and_answer(self, row) -> tuple[str, str]:
        """Everything before the final assistant turn, and that turn."""
        return "\n".join(m.content for m in row.messages[:-1]), row.messages[-1].content

    def profile(self, row) -> str | None:
        return row.profile

    # ------------------------------------------------------------------ encoding

    def encode(self, row) -> bytes:
        return _encoder.encode(row)

    def encode_lines(self, rows: Sequence) -> bytes:
        return _encoder.encode_lines(rows)


def kind_of(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _quote(value: object) -> str:
    """A value for a reason, cut short: a reason must stay readable whatever the row holds."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- syllo_v1

MAX_SYLLABLES = 64
MAX_ANSWERS = 32
PUZZLE = Check(
    "puzzle", "quick", "error", "row",
    f"a `puzzle` with syllables (1..{MAX_SYLLABLES}) and answers (1..{MAX_ANSWERS}), lists of non-empty strings, "
    "and an optional integer difficulty >= 1",
)

Word = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Puzzle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    syllables: Annotated[list[Word], msgspec.Meta(min_length=1, max_length=MAX_SYLLABLES)]
    answers: Annotated[list[Word], msgspec.Meta(min_length=1, max_length=MAX_ANSWERS)]
    difficulty: Annotated[int, msgspec.Meta(ge=1)] | None = None


class SylloRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One syllo_v1 row: a chat conversation and the puzzle it solves."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    puzzle: Puzzle


class SylloV1(ChatSftV1):
    name = "syllo_v1"
    description = "SYLLO word puzzles: chat rows plus the puzzle (syllables, answers, difficulty)"
    row_type = SylloRow
    profiles = ("syllo",)
    fields = ("messages", "puzzle")
    checks: tuple[Check, ...] = (*(c for c in ChatSftV1.checks if c is not PROFILE), PUZZLE)

    def from_object(self, value: dict, found: Findings):
        extra = sorted(key for key in value if key not in self.fields)
        if extra:
            found.append((EXTRA_FIELDS, f"fields {extra} are not part of {self.name} and are dropped"))
        messages = self._messages(value, found)
        puzzle = _puzzle(value, found)
        if messages is None or puzzle is None:
            return None
        return SylloRow(messages=messages, puzzle=puzzle)

    def profile(self, row) -> str:
        return "syllo"


def _puzzle(value: dict, found: Findings) -> Puzzle | None:
    puzzle = value.get("puzzle")
    if not isinstance(puzzle, dict):
        found.append((PUZZLE, "no `puzzle` object" if puzzle is None else f"`puzzle` is {kind_of(puzzle)}"))
        return None
    try:
        return msgspec.convert(puzzle, Puzzle)
    except msgspec.ValidationError as exc:
        found.append((PUZZLE, f"puzzle: {exc}"))
        return None


# ---------------------------------------------------------------------------- completion_v1

TEXT_FIELD = Check("text_field", "quick", "error", "row", "a string `text` field")


class TextRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One completion_v1 row: a text the model learns to continue."""

    text: str


class CompletionV1:
    name = "completion_v1"
    kind = "text"
    description = "plain text for continued pre-training; loss on the whole text"
    row_type: type = TextRow
    profiles: tuple[str, ...] = ()
    checks: tuple[Check, ...] = (TEXT_FIELD, EXTRA_FIELDS, CONTENT_NONEMPTY)

    def __init__(self) -> None:
        self.decoder = msgspec.json.Decoder(TextRow)

    def from_object(self, value: dict, found: Findings):
        extra = sorted(key for key in value if key != "text")
        if extra:
            found.append((EXTRA_FIELDS, f"fields {extra} are not part of {self.name} and are dropped"))
        if "text" not in value:
            found.append((TEXT_FIELD, "no `text` field"))
            return None
        if not isinstance(value["text"], str):
            found.append((TEXT_FIELD, f"`text` is {kind_of(value['text'])}, expected a string"))
            return None
        return TextRow(text=value["text"])

    def row_problems(self, rows: Sequence) -> Problems:
        return [(i, CONTENT_NONEMPTY, "`text` is empty") for i, row in enumerate(rows) if not row.text.strip()]

    def conversation(self, row) -> None:
        return None

    def text(self, row) -> str:
        return row.text

    def prompt_and_answer(self, row) -> None:
        return None

    def profile(self, row) -> None:
        return None

    def encode(self, row) -> bytes:
        return _encoder.encode(row)

    def encode_lines(self, rows: Sequence) -> bytes:
        return _encoder.encode_lines(rows)


# ---------------------------------------------------------------------------- the registry

DEFAULT_SCHEMA = "chat_sft_v1"

SCHEMAS: dict[str, RowSchema] = {schema.name: schema for schema in (ChatSftV1(), SylloV1(), CompletionV1())}


class UnknownSchema(LookupError):
    pass


def lookup(name: str) -> RowSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise UnknownSchema(f"unknown schema {shown!r}; known: {', '.join(SCHEMAS)}") from None


def json_schemas() -> dict[str, dict]:
    """Each schema's row as JSON Schema (one line of a dataset), with its description."""
    kinds = [schema.row_type for schema in SCHEMAS.values()]
    refs, components = msgspec.json.schema_components(kinds, ref_template="#/components/schemas/{name}")
    out = {}
    for schema, ref in zip(SCHEMAS.values(), refs, strict=True):
        row = dict(components.pop(ref["$ref"].rsplit("/", 1)[1]))
        row["description"] = (f"One line of a {schema.name} dataset (JSON lines): {schema.description}. "
                              "Other fields are dropped, with a warning in the report.")
        # The strict decoder refuses unknown fields only to send the row down the path that
        # reports and drops them; a row with them is still accepted.
        row["additionalProperties"] = True
        out[schema.name] = row
    if "Message" in components:
        components["Message"] = {**components["Message"], "additionalProperties": True}
    return {**out, **components}
