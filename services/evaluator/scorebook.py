"""The evaluator's record of what it has scored: one file per (checkpoint sha256, suite version).

The record holds the exact `EvalScored` event that was published, and the hard-examples
submission if there was one, so a redelivered `CheckpointSaved` republishes the same events
(same ids: JetStream drops the duplicates) instead of scoring again, and the per-item outputs,
so a score can be inspected later.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from libs.common.artifacts import is_sha256, write_atomically
from libs.common.events import DatasetSubmitted, EvalScored
from services.evaluator.scoring import ItemResult

_VERSION = re.compile(r"[A-Za-z0-9_.-]+")


class ScoreRecord(msgspec.Struct, frozen=True):
    event: EvalScored
    items: list[ItemResult]
    # The training problems it failed, submitted as a dataset (None: too few, or not probed).
    hard_examples: DatasetSubmitted | None = None
    # The data profile it was scored under (its run's, `CheckpointSaved.profile`): a rescore on
    # another suite (the champion's) finds it here.
    profile: str = "none"


class Scorebook:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str, suite_version: str) -> Path:
        # Both parts arrive in events: refuse anything that could leave the folder.
        if not is_sha256(sha256) or not _VERSION.fullmatch(suite_version):
            raise ValueError(f"bad score key ({sha256!r}, {suite_version!r})")
        return self.folder / f"{sha256}--{suite_version}.json"

    def get(self, sha256: str, suite_version: str) -> ScoreRecord | None:
        path = self._path(sha256, suite_version)
        return msgspec.json.decode(path.read_bytes(), type=ScoreRecord) if path.exists() else None

    def save(self, record: ScoreRecord) -> None:
        """Write atomically: a crash leaves the old state or the whole record, never half."""
        path = self._path(record.event.checkpoint_sha256, record.event.suite_version)
        write_atomically(path, [msgspec.json.encode(record)])

    def profile_of(self, sha256: str) -> str:
        """The data profile a checkpoint was scored under before, on any suite ("none" if never scored)."""
        return next((record.profile for record in self.for_checkpoint(sha256)), "none")

    def for_checkpoint(self, sha256: str) -> list[ScoreRecord]:
        if not is_sha256(sha256):
            return []
        return [self._read(p) for p in sorted(self.folder.glob(f"{sha256}--*.json"))]

    def recent(self, limit: int) -> list[EvalScored]:
        """The latest `limit` scores, newest first."""
        paths = sorted(self.folder.glob("*--*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [self._read(p).event for p in paths[:limit]]

    @staticmethod
    def _read(path: Path) -> ScoreRecord:
        return msgspec.json.decode(path.read_bytes(), type=ScoreRecord)
