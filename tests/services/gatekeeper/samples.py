"""Rows, files and a bus-free Gatekeeper for the gatekeeper tests."""

from __future__ import annotations

from pathlib import Path

import msgspec

from libs.common.artifacts import ArtifactStore
from services.gatekeeper.index import AcceptedIndex
from services.gatekeeper.submissions import Gatekeeper, Submission
from services.gatekeeper.validation import Limits


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def good_rows(n: int, tag: str = "") -> list[dict]:
    return [chat(("user", f"What is {i} + {i}?{tag}"), ("assistant", str(2 * i))) for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(msgspec.json.encode(row) + b"\n" for row in rows)


def no_tokens():
    raise AssertionError("quick validation must not load the tokenizer")


def make_gatekeeper(root: Path, *, tokens=no_tokens, max_error_fraction: float = 0.1,
                    limits: Limits = Limits(), max_findings: int = 1000) -> Gatekeeper:
    return Gatekeeper(
        ArtifactStore(root / "artifacts"), AcceptedIndex(root / "gatekeeper" / "accepted"),
        limits=limits, max_error_fraction=max_error_fraction, max_findings=max_findings, tokens=tokens,
    )


def submission(submission_id: str, *, source: str = "inline", level: str = "quick", **kw) -> Submission:
    kw.setdefault("name", submission_id)
    return Submission(submission_id=submission_id, channel="test", source=source, level=level, **kw)
