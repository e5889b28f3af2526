"""Row fingerprints for duplicate detection, and the bounded index of recently accepted datasets.

- Exact: a 64-bit blake2b of the row's normalised line (the bytes the gatekeeper stores).
- Near: a MinHash signature of the row's text (case-folded, whitespace collapsed): 32
  minimums of independent hashes over its 5-byte shingles, computed for a whole batch at
  once with numpy. Two rows' signatures agree in about J of their 32 places, J being the
  Jaccard similarity of their shingle sets. Locality-sensitive hashing (8 bands of 4)
  proposes candidate pairs; the signatures confirm them.

The recent index holds the fingerprints of the last `recent_datasets` accepted datasets, up
to `recent_rows` rows (newest first), as one `<dataset_id>.v1.npz` per dataset under
`<data_dir>/gatekeeper/fingerprints/`. A file is written when a deep validation accepts a
dataset, or computed from the accepted dataset itself the first time a deep validation needs
it, so quick and standard submissions pay nothing. Memory: 136 bytes a row.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_HASHES = 32
BANDS = 8
ROWS_PER_BAND = NUM_HASHES // BANDS
SHINGLE = 5
VERSION = "v1"  # part of every stored file's name: change it when anything above changes

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


def save(folder: Path, dataset_id: str, prints: Fingerprints) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, exact=prints.exact, sigs=prints.sigs)
        os.replace(tmp, folder / f"{dataset_id}.{VERSION}.npz")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(folder: Path, dataset_id: str) -> Fingerprints | None:
    path = folder / f"{dataset_id}.{VERSION}.npz"
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
