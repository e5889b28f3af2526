"""Rows, files and a bus-free Gatekeeper for the gatekeeper tests."""

from __future__ import annotations

from pathlib import Path

import msgspec

from libs.common.artifacts import ArtifactStore
from services.gatekeeper.duplicates import AcceptedIndex, RecentDatasets
from services.gatekeeper.intake import Submission
from services.gatekeeper.pipeline import Gatekeeper, ValidationConfig
from services.gatekeeper.reading import Limits


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def good_rows(n: int, tag: str = "") -> list[dict]:
    return [chat(("user", f"What is {i} + {i}?{tag}"), ("assistant", str(2 * i))) for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(msgspec.json.encode(row) + b"\n" for row in rows)


def no_tokens():
    raise AssertionError("quick validation must not load the tokenizer")


def make_gatekeeper(root: Path, *, tokens=no_tokens, max_error_fraction: float = 0.1,
                    config: ValidationConfig | None = None, limits: Limits | None = None,
                    max_findings: int = 100, recent_datasets: int = 16, recent_rows: int = 100_000) -> Gatekeeper:
    store = ArtifactStore(root / "artifacts")
    index = AcceptedIndex(root / "gatekeeper" / "accepted")
    config = config or ValidationConfig(limits=limits or Limits())
    return Gatekeeper(
        store, index,
        RecentDatasets(index, store, root / "gatekeeper" / "fingerprints", max_datasets=recent_datasets,
                       max_rows=recent_rows),
        config=config, max_error_fraction=max_error_fraction, max_findings=max_findings, tokens=tokens,
    )


def submission(submission_id: str, *, source: str = "inline", level: str = "quick", **kw) -> Submission:
    kw.setdefault("name", submission_id)
    return Submission(submission_id=submission_id, channel="test", source=source, level=level, **kw)
