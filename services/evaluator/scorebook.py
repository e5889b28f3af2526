"""The evaluator's record of what it has scored: one file per (checkpoint sha256, suite version).

A selection score's record (`ScoreRecord`) holds the exact `EvalScored` event that was published,
and the hard-examples submission if there was one, so a redelivered `CheckpointSaved`
republishes the same events (same ids: JetStream drops the duplicates) instead of scoring again.
A champion's sealed test score (`ChampionTestRecord`, in a scorebook of its own) holds its
`ChampionTested` event and whether it went out, so a restart publishes it if it did not, with the
same id, and never scores it again. A checkpoint's confirmation-suite results
(`ConfirmationRecord`, a third scorebook) grow level by level, so the champion is scored on each
confirmation level once. All keep the per-item outputs, so a score can be inspected
later, and every book keeps each suite version apart: a new version adds files, never replaces them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Generic, TypeVar

import msgspec

from libs.common.artifacts import is_sha256, write_atomically
from libs.common.events import ChampionTested, DatasetSubmitted, EvalScored
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


class ChampionTestRecord(msgspec.Struct, frozen=True):
    """A champion's score on the sealed test suite: the event, the per-item outputs, the profile it
    was asked under (its selection score's), and whether the event was published."""

    event: ChampionTested
    items: list[ItemResult]
    profile: str = "none"
    # Recorded before publishing (a crash in between: published on the next start, same id), and
    # marked once it went out, so a restart does not publish it again.
    published: bool = False


class ConfirmationRecord(msgspec.Struct, frozen=True):
    """A checkpoint's results on the confirmation suite, level by level as they were needed (a
    candidate past the screen, the champion it was compared with): each level's items in suite
    order, with their outputs."""

    checkpoint_sha256: str
    suite_version: str
    items: dict[str, list[ItemResult]] = {}

    def key(self) -> tuple[str, str]:
        return self.checkpoint_sha256, self.suite_version


R = TypeVar("R", ScoreRecord, ChampionTestRecord, ConfirmationRecord)


class Scorebook(Generic[R]):
    """Records of `kind` under `folder`, by (checkpoint sha256, suite version)."""

    def __init__(self, folder: Path, kind: type[R] = ScoreRecord) -> None:
        self.folder = folder
        self.kind = kind
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str, suite_version: str) -> Path:
        # Both parts arrive in events: refuse anything that could leave the folder.
        if not is_sha256(sha256) or not _VERSION.fullmatch(suite_version):
            raise ValueError(f"bad score key ({sha256!r}, {suite_version!r})")
        return self.folder / f"{sha256}--{suite_version}.json"

    def get(self, sha256: str, suite_version: str) -> R | None:
        path = self._path(sha256, suite_version)
        return self._read(path) if path.exists() else None

    def save(self, record: R) -> None:
        """Write atomically: a crash leaves the old state or the whole record, never half."""
        key = record.key() if isinstance(record, ConfirmationRecord) else (
            record.event.checkpoint_sha256, record.event.suite_version)
        path = self._path(*key)
        write_atomically(path, [msgspec.json.encode(record)])

    def profile_of(self, sha256: str) -> str:
        """The data profile a checkpoint was scored under before, on any suite ("none" if never scored)."""
        return next((record.profile for record in self.for_checkpoint(sha256)), "none")

    def for_checkpoint(self, sha256: str) -> list[R]:
        if not is_sha256(sha256):
            return []
        return [self._read(p) for p in sorted(self.folder.glob(f"{sha256}--*.json"))]

    def recent(self, limit: int) -> list[EvalScored | ChampionTested]:
        """The latest `limit` scores, newest first."""
        paths = sorted(self.folder.glob("*--*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [self._read(p).event for p in paths[:limit]]

    def _read(self, path: Path) -> R:
        return msgspec.json.decode(path.read_bytes(), type=self.kind)
