"""The index of accepted datasets: which submission first got each dataset id accepted.

One small JSON file per dataset id under `<data_dir>/gatekeeper/accepted/`, created with an
atomic link-if-absent, so two submissions of the same content racing each other (HTTP, inbox
and NATS run concurrently) agree on which one came first. The dataset id is the sha256 of the
normalised content: the same rows submitted twice are one dataset and are trained once.
The newest entries (by file time) are the "recently accepted datasets" deep validation
compares rows with (recent.py).
"""

from __future__ import annotations

import heapq
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

import msgspec

from libs.common.events import utcnow

_SHA256 = re.compile(r"[0-9a-f]{64}")


class IndexEntry(msgspec.Struct, frozen=True, kw_only=True):
    dataset_id: str
    submission_id: str
    name: str
    uri: str
    schema: str = "chat_sft_v1"
    num_rows: int = 0
    accepted_at: datetime = msgspec.field(default_factory=utcnow)


def is_dataset_id(text: str) -> bool:
    return bool(_SHA256.fullmatch(text))


class AcceptedIndex:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, dataset_id: str) -> Path:
        if not is_dataset_id(dataset_id):
            raise ValueError(f"not a dataset id (sha256 hex): {dataset_id!r}")
        return self.folder / f"{dataset_id}.json"

    def get(self, dataset_id: str) -> IndexEntry | None:
        try:
            return msgspec.json.decode(self._path(dataset_id).read_bytes(), type=IndexEntry)
        except FileNotFoundError:
            return None

    def claim(self, entry: IndexEntry) -> IndexEntry:
        """Record `entry` unless its dataset is already indexed; return the entry that stands."""
        target = self._path(entry.dataset_id)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".claim-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(msgspec.json.encode(entry))
            # link() fails if the target exists: the first claim wins, complete or not at all.
            os.link(tmp, target)
            return entry
        except FileExistsError:
            existing = self.get(entry.dataset_id)
            assert existing is not None
            return existing
        finally:
            os.unlink(tmp)

    def recent(self, n: int) -> list[IndexEntry]:
        """The `n` most recently accepted datasets, newest first."""
        with os.scandir(self.folder) as found:
            files = [(entry.stat().st_mtime_ns, entry.name.removesuffix(".json")) for entry in found
                     if entry.name.endswith(".json") and is_dataset_id(entry.name.removesuffix(".json"))]
        return [entry for _, dataset_id in heapq.nlargest(n, files) if (entry := self.get(dataset_id)) is not None]
