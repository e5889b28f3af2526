"""Schema `completion_v1`: plain text to continue, one `{"text": "..."}` per line.

Quick row checks:
- text_field        the row has a string `text`
- extra_fields      (warning) other fields are dropped
- content_nonempty  the text is not empty or whitespace only
Standard measures the text's tokens without a chat template; deep looks for duplicates (there
is no prompt, so no answer leakage or profile). Rows are written as `{"text":"..."}`.
The trainer reads chat rows only today; completion datasets are validated and stored, and
their `schema` travels in `dataset.accepted`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from services.gatekeeper.chat_sft import CONTENT_NONEMPTY, EXTRA_FIELDS, Findings, Problems, kind_of
from services.gatekeeper.checks import Check

TEXT_FIELD = Check("text_field", "quick", "error", "row", "a string `text` field")


class TextRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One completion_v1 row: a text the model learns to continue."""

    text: str


_encoder = msgspec.json.Encoder()


class CompletionV1:
    name = "completion_v1"
    kind = "text"
    description = "plain text for continued pre-training (validated and stored; the trainer reads chat rows)"
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
