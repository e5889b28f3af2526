"""Schema `chat_sft_v1`: one conversation per line, `{"messages": [{"role", "content"}, ...]}`.

Row checks, in the order they run (all errors unless marked):

quick
- messages_field       the row has a `messages` list with at least one message
- message_shape        each message is an object with string `role` and `content`
- role                 each role is system, user or assistant
- extra_fields         (warning) fields other than messages / role / content are dropped
- content_nonempty     no content is empty or whitespace only
- has_assistant        at least one assistant turn
- last_turn_assistant  the conversation ends with an assistant turn (what is trained on)
standard
- token_length         some assistant token lies within the first max_tokens tokens, as the
                       trainer encodes the row (`libs.common.chat.encode_chat`)
- token_truncation     (warning) the row is longer than max_tokens and will be truncated

A well-formed row takes the fast path (one strict msgspec decode); anything unusual is decoded
again generically so each problem gets its own precise finding. Accepted rows are written in
the normalised form `{"messages":[{"role":"...","content":"..."}]}` (compact JSON, UTF-8,
extra fields dropped, content untouched), which `libs.common.chat.ChatRow` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import msgspec

from libs.common.chat import IGNORE_INDEX, ROLES, encode_chat
from libs.common.events import ValidationLevel
from services.gatekeeper.checks import Check, runs_at

Findings = list[tuple[Check, str]]
RowRule = Callable[["Row"], Iterable[tuple[Check, str]]]

MESSAGES_FIELD = Check("messages_field", "quick", "error", "row", "a `messages` list with at least one message")
MESSAGE_SHAPE = Check(
    "message_shape", "quick", "error", "row", "each message is an object with string role and content"
)
ROLE = Check("role", "quick", "error", "row", "each role is system, user or assistant")
EXTRA_FIELDS = Check("extra_fields", "quick", "warning", "row", "fields other than messages/role/content are dropped")
CONTENT_NONEMPTY = Check("content_nonempty", "quick", "error", "row", "no content is empty or whitespace only")
HAS_ASSISTANT = Check("has_assistant", "quick", "error", "row", "at least one assistant turn")
LAST_TURN_ASSISTANT = Check("last_turn_assistant", "quick", "error", "row", "the last turn is the assistant's")
TOKEN_LENGTH = Check(
    "token_length", "standard", "error", "row", "some assistant token lies within the first max_tokens tokens"
)
TOKEN_TRUNCATION = Check(
    "token_truncation", "standard", "warning", "row", "the row fits in max_tokens (else the trainer truncates it)"
)


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class Row(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    messages: list[Message]


_strict = msgspec.json.Decoder(Row)
_encoder = msgspec.json.Encoder()


class TokenBudget:
    """Measures a row as the trainer will encode it, truncated at `max_tokens`."""

    def __init__(self, tokenizer, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def measure(self, messages: list[Message]) -> tuple[int, int]:
        """(tokens in the whole row, assistant tokens among the first max_tokens)."""
        # No truncation here: the full length is part of the finding's reason.
        encoded = encode_chat(self.tokenizer, messages, max_length=1 << 30)
        trained = sum(1 for label in encoded.labels[: self.max_tokens] if label != IGNORE_INDEX)
        return len(encoded.input_ids), trained


class ChatSftV1:
    name = "chat_sft_v1"
    description = "chat conversations for supervised fine-tuning; loss on assistant turns"
    checks: tuple[Check, ...] = (
        MESSAGES_FIELD, MESSAGE_SHAPE, ROLE, EXTRA_FIELDS, CONTENT_NONEMPTY, HAS_ASSISTANT, LAST_TURN_ASSISTANT,
        TOKEN_LENGTH, TOKEN_TRUNCATION,
    )

    def decode(self, line: bytes) -> Row | None:
        """The row if `line` is a plain well-formed row, else None (take the slow path)."""
        try:
            return _strict.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
            return None

    def from_object(self, value: dict, found: Findings) -> Row | None:
        """Structural checks on a generically decoded object; the row if it has no errors."""
        messages = value.get("messages")
        extra = sorted(key for key in value if key != "messages")
        if extra:
            found.append((EXTRA_FIELDS, f"fields {extra} are not part of chat_sft_v1 and are dropped"))
        if "messages" not in value:
            found.append((MESSAGES_FIELD, "no `messages` field"))
            return None
        if not isinstance(messages, list):
            found.append((MESSAGES_FIELD, f"`messages` is {_kind(messages)}, expected a list"))
            return None
        if not messages:
            found.append((MESSAGES_FIELD, "`messages` is empty"))
            return None
        ok = True
        extra_keys: set[str] = set()
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                found.append((MESSAGE_SHAPE, f"messages[{i}] is {_kind(message)}, expected an object"))
                ok = False
                continue
            extra_keys.update(key for key in message if key not in ("role", "content"))
            for key in ("role", "content"):
                if key not in message:
                    found.append((MESSAGE_SHAPE, f"messages[{i}] has no `{key}`"))
                    ok = False
                elif not isinstance(message[key], str):
                    found.append((MESSAGE_SHAPE, f"messages[{i}].{key} is {_kind(message[key])}, expected a string"))
                    ok = False
            role = message.get("role")
            if isinstance(role, str) and role not in ROLES:
                found.append((ROLE, f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}"))
                ok = False
        if extra_keys:
            found.append((EXTRA_FIELDS, f"message fields {sorted(extra_keys)} are dropped"))
        if not ok:
            return None
        return Row(messages=[Message(role=m["role"], content=m["content"]) for m in messages])

    def rules(self, level: ValidationLevel, tokens: Callable[[], TokenBudget]) -> list[RowRule]:
        """The row rules that run at `level`, in order; `tokens` is only called when needed."""
        rules: list[RowRule] = [_content_nonempty, _turns]
        if runs_at(TOKEN_LENGTH.level, level):
            rules.append(_token_rule(tokens()))
        return rules

    def encode(self, row: Row) -> bytes:
        return _encoder.encode(row)


def _content_nonempty(row: Row) -> Iterable[tuple[Check, str]]:
    for i, message in enumerate(row.messages):
        if not message.content.strip():
            yield CONTENT_NONEMPTY, f"messages[{i}] ({message.role}) has empty content"


def _turns(row: Row) -> Iterable[tuple[Check, str]]:
    if not row.messages:
        yield MESSAGES_FIELD, "`messages` is empty"
    elif not any(message.role == "assistant" for message in row.messages):
        yield HAS_ASSISTANT, "no assistant turn: nothing to train on"
    elif row.messages[-1].role != "assistant":
        yield LAST_TURN_ASSISTANT, f"the last turn is {row.messages[-1].role!r}; it must be the assistant's"


def _token_rule(tokens: TokenBudget) -> RowRule:
    def check(row: Row) -> Iterable[tuple[Check, str]]:
        total, trained = tokens.measure(row.messages)
        if trained == 0:
            yield TOKEN_LENGTH, (
                f"no assistant token within the first {tokens.max_tokens} tokens (the row is {total} tokens)"
            )
        elif total > tokens.max_tokens:
            yield TOKEN_TRUNCATION, f"the row is {total} tokens; training truncates it to {tokens.max_tokens}"

    return check


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
