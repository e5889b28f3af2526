"""The recently accepted datasets that deep validation compares rows with, and their fingerprints.

Recent: the `max_datasets` newest entries of the accepted index, newest first, while their
rows add up to at most `max_rows` (a bound on memory: 136 bytes a row). Each dataset's
fingerprints are read from `<folder>/<dataset_id>.v1.npz`; a dataset accepted without a deep
validation has none yet, and gets them here, once, from its stored (normalised) rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog

from libs.common.artifacts import ArtifactError, ArtifactStore
from services.gatekeeper import fingerprints
from services.gatekeeper.fingerprints import Fingerprints, RecentIndex
from services.gatekeeper.index import AcceptedIndex, IndexEntry
from services.gatekeeper.schemas import SCHEMAS

log = structlog.get_logger("gatekeeper.recent")
_BATCH_ROWS = 4096


class RecentDatasets:
    def __init__(self, index: AcceptedIndex, store: ArtifactStore, folder: Path, *, max_datasets: int,
                 max_rows: int) -> None:
        self.index = index
        self.store = store
        self.folder = Path(folder)
        self.max_datasets = max_datasets
        self.max_rows = max_rows

    def load(self) -> RecentIndex:
        datasets: list[tuple[str, Fingerprints]] = []
        rows = 0
        for entry in self.index.recent(self.max_datasets) if self.max_datasets else []:
            if rows + entry.num_rows > self.max_rows:
                break
            prints = fingerprints.load(self.folder, entry.dataset_id) or self._compute(entry)
            if prints is None:
                continue
            datasets.append((entry.dataset_id, prints))
            rows += len(prints)
        return RecentIndex(datasets)

    def remember(self, dataset_id: str, prints: Fingerprints) -> None:
        """Keep the fingerprints a deep validation computed for a dataset it accepted."""
        fingerprints.save(self.folder, dataset_id, prints)

    def _compute(self, entry: IndexEntry) -> Fingerprints | None:
        schema = SCHEMAS.get(entry.schema)
        try:
            path = self.store.verify(entry.uri, entry.dataset_id)
        except ArtifactError as exc:
            log.warning("accepted dataset unreadable; left out of the recent index", error=str(exc))
            return None
        if schema is None:
            return None
        keys: list[int] = []
        sigs: list[np.ndarray] = []
        with open(path, "rb") as fh:
            while batch := fh.readlines(_BATCH_ROWS * 256):
                keys.extend(fingerprints.exact_key(line.rstrip(b"\n")) for line in batch)
                rows = [schema.decoder.decode(line) for line in batch]
                sigs.append(fingerprints.signatures([schema.text(row) for row in rows]))
        prints = Fingerprints(np.array(keys, np.uint64),
                              np.concatenate(sigs) if sigs else np.empty((0, fingerprints.NUM_HASHES), np.uint32))
        fingerprints.save(self.folder, entry.dataset_id, prints)
        return prints
