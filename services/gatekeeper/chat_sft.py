"""Schema `chat_sft_v1`: one conversation per line, `{"messages": [{"role", "content"}, ...]}`.

Quick row checks, in the order they run (errors unless marked):
- messages_field       the row has a `messages` list with at least one message
- message_shape        each message is an object with string `role` and `content`
- role                 each role is system, user or assistant
- profile              an optional `profile` names a known answer profile (profiles.py)
- extra_fields         (warning) other fields are dropped
- content_nonempty     no content is empty or whitespace only
- has_assistant        at least one assistant turn
- last_turn_assistant  the conversation ends with an assistant turn (what is trained on)

A well-formed row takes the fast path (decoding.py): the strict msgspec decoder, which
enforces the shape, the roles and the profile, then only the content and turn checks in
Python. A line the strict decoder refuses is decoded again generically and `from_object`
says precisely what is wrong. Accepted rows are written normalised: compact JSON, UTF-8,
extra fields dropped, content untouched, `{"messages":[{"role":"...","content":"..."}]}`
(plus `"profile"` when given), which `libs.common.chat.ChatRow` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

from libs.common.chat import ROLES
from services.gatekeeper.checks import Check
from services.gatekeeper.profiles import CHAT_PROFILES

Findings = list[tuple[Check, str]]
# (index of the row in its block, check, reason)
Problems = list[tuple[int, Check, str]]

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
    # Names the answer format the deep level checks (profiles.py); explicit, never guessed.
    profile: ChatProfile | None = None


_encoder = msgspec.json.Encoder()


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
