"""Duplicates: rows seen before (deep), and datasets accepted before (every level).

Rows, at the deep level, within the file and against recently accepted datasets:
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
signatures: 136 bytes a row, at most `max_rows` rows.

Fingerprints:
- Exact: a 64-bit blake2b of the row's normalised line (the bytes the gatekeeper stores).
- Near: a MinHash signature of the row's text (case-folded, whitespace collapsed): 32
  minimums of independent hashes over its 5-byte shingles, computed for a whole batch at
  once with numpy. Two rows' signatures agree in about J of their 32 places, J being the
  Jaccard similarity of their shingle sets. Locality-sensitive hashing (8 bands of 4)
  proposes candidate pairs; the signatures confirm them.

The recently accepted datasets (`RecentDatasets`): the `recent_datasets` newest entries of the
accepted index, newest first, while their rows add up to at most `recent_rows` (a bound on
memory: 136 bytes a row). Their fingerprints are kept as one `<dataset_id>.v1.npz` per dataset
under `<data_dir>/gatekeeper/fingerprints/`. A file is written when a deep validation accepts
a dataset, or computed from the accepted dataset itself (its stored, normalised rows) the
first time a deep validation needs it, so quick and standard submissions pay nothing.

Datasets, at every level (`AcceptedIndex`): which submission first got each dataset id
accepted. One small JSON file per dataset id under `<data_dir>/gatekeeper/accepted/`, created
with an atomic link-if-absent, so two submissions of the same content racing each other (HTTP,
inbox and NATS run concurrently) agree on which one came first. The dataset id is the sha256 of
the normalised content: the same rows submitted twice are one dataset and are trained once.
An entry is claimed with `announced` false and rewritten (atomically, keeping its modification
time, which orders `recent`) once its `dataset.accepted` was published, so an acceptance whose
announcement failed or was cut short by a crash is found again and announced (pipeline.py).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np
import structlog

from libs.common.artifacts import ArtifactError, ArtifactStore, atomic_file, is_sha256
from libs.common.events import utcnow
from services.gatekeeper.checks import Batch, Check, LevelCheck, Tally
from services.gatekeeper.schemas import SCHEMAS, RowSchema

log = structlog.get_logger("gatekeeper.recent")

# ---------------------------------------------------------------------------- the deep checks

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


class Duplicates(LevelCheck):
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
        for n, (i, key) in enumerate(zip(live, keys, strict=True)):
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


# ---------------------------------------------------------------------------- fingerprints

NUM_HASHES = 32
BANDS = 8
ROWS_PER_BAND = NUM_HASHES // BANDS
SHINGLE = 5
FINGERPRINTS_VERSION = "v1"  # part of every stored file's name: change it when anything above changes

# Fixed, so signatures stored by one process compare with those of another.
_seeds = np.random.default_rng(0x5EED_F1E7).integers(1, 2**63, size=(3, NUM_HASHES), dtype=np.uint64)
_MULTIPLIERS = _seeds[0] | np.uint64(1)
_OFFSETS = _seeds[1]
_BAND_MULTIPLIERS = (_seeds[2][:ROWS_PER_BAND] | np.uint64(1)).reshape(1, 1, ROWS_PER_BAND)


def exact_key(line: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little")


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the rolling hash's bits over all 64."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def signatures(texts: Sequence[str]) -> np.ndarray:
    """MinHash signatures, shape (len(texts), NUM_HASHES), uint32."""
    n = len(texts)
    if not n:
        return np.empty((0, NUM_HASHES), np.uint32)
    data = [normalise(text).encode().ljust(SHINGLE, b"\0") for text in texts]
    lengths = np.fromiter(map(len, data), np.int64, n)
    buf = np.frombuffer(b"".join(data), np.uint8).astype(np.uint64)
    windows = len(buf) - SHINGLE + 1
    h = np.zeros(windows, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(SHINGLE):
            h = h * np.uint64(1099511628211) + buf[j:j + windows]
        h = _mix(h)
        counts = lengths - SHINGLE + 1
        starts = np.cumsum(lengths) - lengths
        segments = np.cumsum(counts) - counts
        # The shingles of text k start at starts[k] and never cross into the next text.
        taken = h[np.arange(counts.sum()) + np.repeat(starts - segments, counts)]
        out = np.empty((n, NUM_HASHES), np.uint32)
        for p in range(NUM_HASHES):
            out[:, p] = np.minimum.reduceat((taken * _MULTIPLIERS[p] + _OFFSETS[p]) >> np.uint64(32), segments)
    return out


def band_keys(sigs: np.ndarray) -> np.ndarray:
    """One 64-bit key per band, shape (n, BANDS): rows sharing a key are candidates."""
    with np.errstate(over="ignore"):
        banded = sigs.reshape(len(sigs), BANDS, ROWS_PER_BAND).astype(np.uint64)
        return (banded * _BAND_MULTIPLIERS).sum(axis=2, dtype=np.uint64)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of paired signatures (row by row)."""
    return (a == b).mean(axis=1)


def earliest_similar(sigs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the earliest earlier row at least `threshold` similar (-1: none), and the similarity."""
    n = len(sigs)
    best = np.full(n, n, np.int64)
    best_similarity = np.zeros(n)
    if n < 2:
        return np.full(n, -1, np.int64), best_similarity
    keys = band_keys(sigs)
    position = np.arange(n)
    for band in range(BANDS):
        order = np.argsort(keys[:, band], kind="stable")
        ordered = keys[order, band]
        group_start = np.r_[True, ordered[1:] != ordered[:-1]]
        # Stable sort: a group's first member is its earliest row.
        first = order[np.maximum.accumulate(np.where(group_start, position, 0))]
        candidate = np.empty(n, np.int64)
        candidate[order] = first
        rows = np.nonzero(candidate < position)[0]
        sim = similarity(sigs[rows], sigs[candidate[rows]])
        ok = sim >= threshold
        rows, found, sim = rows[ok], candidate[rows[ok]], sim[ok]
        better = found < best[rows]
        best[rows[better]] = found[better]
        best_similarity[rows[better]] = sim[better]
    return np.where(best < n, best, -1), best_similarity


# ---------------------------------------------------------------------------- recent datasets


@dataclass(frozen=True)
class Fingerprints:
    exact: np.ndarray  # (n,) uint64, in row order
    sigs: np.ndarray  # (n, NUM_HASHES) uint32

    def __len__(self) -> int:
        return len(self.exact)


def save_fingerprints(folder: Path, dataset_id: str, prints: Fingerprints) -> None:
    with atomic_file(folder / f"{dataset_id}.{FINGERPRINTS_VERSION}.npz") as fh:
        np.savez(fh, exact=prints.exact, sigs=prints.sigs)


def load_fingerprints(folder: Path, dataset_id: str) -> Fingerprints | None:
    path = folder / f"{dataset_id}.{FINGERPRINTS_VERSION}.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return Fingerprints(exact=data["exact"], sigs=data["sigs"])


class RecentIndex:
    """Fingerprints of recent datasets, searchable a batch at a time."""

    def __init__(self, datasets: Sequence[tuple[str, Fingerprints]]) -> None:
        self.dataset_ids = [dataset_id for dataset_id, _ in datasets]
        sizes = [len(prints) for _, prints in datasets]
        self._offsets = np.cumsum([0, *sizes])
        exact = np.concatenate([p.exact for _, p in datasets]) if datasets else np.empty(0, np.uint64)
        self._sigs = np.concatenate([p.sigs for _, p in datasets]) if datasets else np.empty((0, NUM_HASHES), np.uint32)
        self._exact_order = np.argsort(exact, kind="stable")
        self._exact = exact[self._exact_order]
        keys = band_keys(self._sigs)
        self._band_order = [np.argsort(keys[:, b], kind="stable") for b in range(BANDS)]
        self._band_keys = [keys[order, b] for b, order in enumerate(self._band_order)]

    def __len__(self) -> int:
        return len(self._exact)

    def where(self, row: int) -> tuple[str, int]:
        """(dataset id, line number) of a row of the index."""
        dataset = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return self.dataset_ids[dataset], row - int(self._offsets[dataset]) + 1

    def exact_matches(self, keys: np.ndarray) -> np.ndarray:
        """For each key, a row of the index with the same key, or -1."""
        if not len(self._exact):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self._exact, keys), len(self._exact) - 1)
        return np.where(self._exact[at] == keys, self._exact_order[at], -1)

    def similar(self, sigs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """For each signature, a row of the index at least `threshold` similar (-1: none), and the similarity."""
        found = np.full(len(sigs), -1, np.int64)
        best = np.zeros(len(sigs))
        if not len(self._exact) or not len(sigs):
            return found, best
        keys = band_keys(sigs)
        for band in range(BANDS):
            ordered = self._band_keys[band]
            at = np.minimum(np.searchsorted(ordered, keys[:, band]), len(ordered) - 1)
            hit = np.nonzero(ordered[at] == keys[:, band])[0]
            candidate = self._band_order[band][at[hit]]
            sim = similarity(sigs[hit], self._sigs[candidate])
            better = sim > np.maximum(best[hit], threshold - 1e-9)
            found[hit[better]] = candidate[better]
            best[hit[better]] = sim[better]
        return found, best


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
            prints = load_fingerprints(self.folder, entry.dataset_id) or self._compute(entry)
            if prints is None:
                continue
            datasets.append((entry.dataset_id, prints))
            rows += len(prints)
        return RecentIndex(datasets)

    def remember(self, dataset_id: str, prints: Fingerprints) -> None:
        """Keep the fingerprints a deep validation computed for a dataset it accepted."""
        save_fingerprints(self.folder, dataset_id, prints)

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
                keys.extend(exact_key(line.rstrip(b"\n")) for line in batch)
                rows = [schema.decoder.decode(line) for line in batch]
                sigs.append(signatures([schema.text(row) for row in rows]))
        prints = Fingerprints(np.array(keys, np.uint64),
                              np.concatenate(sigs) if sigs else np.empty((0, NUM_HASHES), np.uint32))
        save_fingerprints(self.folder, entry.dataset_id, prints)
        return prints


# ---------------------------------------------------------------------------- accepted datasets

class IndexEntry(msgspec.Struct, frozen=True, kw_only=True):
    dataset_id: str
    submission_id: str
    name: str
    uri: str
    schema: str = "chat_sft_v1"
    num_rows: int = 0
    accepted_at: datetime = msgspec.field(default_factory=utcnow)
    # False from the claim until `dataset.accepted` was published (acked by JetStream). Entries
    # written before the field existed were claimed and announced in one go: they read as True.
    announced: bool = True


class AcceptedIndex:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, dataset_id: str) -> Path:
        if not is_sha256(dataset_id):
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
        # Not atomic_file: a claim must never replace an existing entry (see below).
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

    def replace(self, entry: IndexEntry) -> None:
        """Overwrite the entry of `entry`'s dataset (a claim taken over), keeping its place in `recent`."""
        self._rewrite(entry)

    def mark_announced(self, dataset_id: str) -> IndexEntry | None:
        """Record that the dataset's acceptance was announced; the entry as it now stands."""
        entry = self.get(dataset_id)
        if entry is None or entry.announced:
            return entry
        entry = msgspec.structs.replace(entry, announced=True)
        self._rewrite(entry)
        return entry

    def _rewrite(self, entry: IndexEntry) -> None:
        target = self._path(entry.dataset_id)
        try:
            mtime_ns = target.stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = None
        with atomic_file(target) as fh:
            fh.write(msgspec.json.encode(entry))
        if mtime_ns is not None:  # `recent` orders by acceptance, not by the last rewrite
            os.utime(target, ns=(mtime_ns, mtime_ns))

    def unannounced(self) -> list[IndexEntry]:
        """Every entry whose announcement has not gone out (yet), oldest first."""
        with os.scandir(self.folder) as found:
            files = sorted((entry.stat().st_mtime_ns, entry.name.removesuffix(".json")) for entry in found
                           if entry.name.endswith(".json") and is_sha256(entry.name.removesuffix(".json")))
        return [entry for _, dataset_id in files if (entry := self.get(dataset_id)) is not None and not entry.announced]

    def recent(self, n: int) -> list[IndexEntry]:
        """The `n` most recently accepted datasets, newest first."""
        with os.scandir(self.folder) as found:
            files = [(entry.stat().st_mtime_ns, entry.name.removesuffix(".json")) for entry in found
                     if entry.name.endswith(".json") and is_sha256(entry.name.removesuffix(".json"))]
        return [entry for _, dataset_id in heapq.nlargest(n, files) if (entry := self.get(dataset_id)) is not None]
