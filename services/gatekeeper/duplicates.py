"""Duplicates (deep): exact and near, within the file and against recently accepted datasets.

- exact_duplicate (error)            the row, normalised, is identical to an earlier row of
                                     the file: dropped, so it is not trained twice
- accepted_duplicate (error)         the row is identical to a row of a recently accepted
                                     dataset (named in the reason)
- near_duplicate (warning)           the row's text is at least `threshold` similar
                                     (estimated Jaccard of 5-byte shingles) to an earlier row
- accepted_near_duplicate (warning)  the same, against recently accepted datasets
- dedup_capacity (warning)           the file has more rows than `max_rows`: later rows were
                                     not compared (memory stays bounded)

Exact duplicates are decided row by row as the file streams (they drop rows). Near
duplicates only warn, so they are searched once at the end, with numpy over the kept rows'
signatures (fingerprints.py): 136 bytes a row, at most `max_rows` rows.
"""

from __future__ import annotations

import numpy as np

from services.gatekeeper.checks import Batch, Check, Tally
from services.gatekeeper.fingerprints import (
    NUM_HASHES,
    Fingerprints,
    RecentIndex,
    earliest_similar,
    exact_key,
    signatures,
)
from services.gatekeeper.schemas import RowSchema

EXACT_DUPLICATE = Check("exact_duplicate", "deep", "error", "row", "no row repeats an earlier row of the file")
ACCEPTED_DUPLICATE = Check(
    "accepted_duplicate", "deep", "error", "row", "no row repeats a row of a recently accepted dataset"
)
NEAR_DUPLICATE = Check(
    "near_duplicate", "deep", "warning", "row", "no row is nearly the same as an earlier row of the file"
)
ACCEPTED_NEAR_DUPLICATE = Check(
    "accepted_near_duplicate", "deep", "warning", "row",
    "no row is nearly the same as a row of a recently accepted dataset",
)
DEDUP_CAPACITY = Check(
    "dedup_capacity", "deep", "warning", "file", "all rows fit in the duplicate index (max_dedup_rows)"
)
DUPLICATE_CHECKS = (EXACT_DUPLICATE, ACCEPTED_DUPLICATE, NEAR_DUPLICATE, ACCEPTED_NEAR_DUPLICATE, DEDUP_CAPACITY)


class Duplicates:
    def __init__(self, schema: RowSchema, recent: RecentIndex, *, threshold: float, max_rows: int) -> None:
        self.schema = schema
        self.recent = recent
        self.threshold = threshold
        self.max_rows = max_rows
        self._first_line: dict[int, int] = {}  # exact key -> line of its first row
        self._keys: list[np.ndarray] = []
        self._sigs: list[np.ndarray] = []
        self._lines: list[np.ndarray] = []
        self._kept = 0
        self._full_at = 0  # the line at which the index filled up
        # Datasets that supplied accepted_duplicate matches (a resubmission names its original).
        self.matched_datasets: set[str] = set()

    def __call__(self, batch: Batch) -> None:
        encode = self.schema.encode
        batch.lines = [b""] * len(batch.rows)
        live = batch.live()
        keys = []
        for i in live:
            line = encode(batch.rows[i])
            batch.lines[i] = line
            keys.append(exact_key(line))
        recent = self.recent.exact_matches(np.array(keys, np.uint64)) if len(self.recent) else None
        kept, kept_keys = [], []
        for n, (i, key) in enumerate(zip(live, keys)):
            if recent is not None and recent[n] >= 0:
                dataset_id, line = self.recent.where(int(recent[n]))
                self.matched_datasets.add(dataset_id)
                batch.error(i, ACCEPTED_DUPLICATE, f"the same row is line {line} of accepted dataset {dataset_id}")
                continue
            first = self._first_line.get(key)
            if first is not None:
                batch.error(i, EXACT_DUPLICATE, f"the same row as line {first}")
                continue
            if self._kept < self.max_rows:
                self._first_line[key] = batch.numbers[i]
                kept.append(i)
                kept_keys.append(key)
                self._kept += 1
            elif not self._full_at:
                self._full_at = batch.numbers[i]
        if kept:
            self._keys.append(np.array(kept_keys, np.uint64))
            self._sigs.append(signatures([self.schema.text(batch.rows[i]) for i in kept]))
            self._lines.append(np.array([batch.numbers[i] for i in kept], np.int64))

    def finish(self, tally: Tally) -> None:
        if self._full_at:
            tally.add(0, DEDUP_CAPACITY, (
                f"the duplicate index holds {self.max_rows} rows (max_dedup_rows): rows from line {self._full_at} on "
                "were not compared with each other"
            ))
        if not self._sigs:
            return
        sigs = np.concatenate(self._sigs)
        lines = np.concatenate(self._lines)
        earlier, similarity = earliest_similar(sigs, self.threshold)
        for row in np.nonzero(earlier >= 0)[0]:
            tally.add(int(lines[row]), NEAR_DUPLICATE,
                      f"{similarity[row]:.0%} similar to line {int(lines[earlier[row]])}")
        found, similarity = self.recent.similar(sigs, self.threshold)
        for row in np.nonzero(found >= 0)[0]:
            dataset_id, line = self.recent.where(int(found[row]))
            tally.add(int(lines[row]), ACCEPTED_NEAR_DUPLICATE,
                      f"{similarity[row]:.0%} similar to line {line} of accepted dataset {dataset_id}")

    def fingerprints(self) -> Fingerprints | None:
        """The kept rows' fingerprints, in order, when every row fitted in the index."""
        if self._full_at:
            return None
        if not self._keys:
            return Fingerprints(np.empty(0, np.uint64), np.empty((0, NUM_HASHES), np.uint32))
        return Fingerprints(np.concatenate(self._keys), np.concatenate(self._sigs))
