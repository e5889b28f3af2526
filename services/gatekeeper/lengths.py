"""The token length distribution of a submission's rows, for its report (standard and deep).

Every row that passed the quick checks is measured as the trainer encodes it; the summary has
the quantiles, how many rows are over max_length, and a histogram of 8 equal bins up to
max_length (inclusive) and one bin beyond. Lengths are counted per distinct value, which stays
small: a file of at most B bytes holds fewer than sqrt(2B) distinct lengths.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

import msgspec


class Bin(msgspec.Struct, frozen=True):
    lo: int  # inclusive
    hi: int | None  # exclusive; None: no upper bound
    count: int


class LengthSummary(msgspec.Struct, kw_only=True):
    unit: str = "tokens"
    count: int = 0
    min: int = 0
    max: int = 0
    mean: float = 0.0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max_length: int = 0
    over_max_length: int = 0
    histogram: list[Bin] = []


class LengthStats:
    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.counts: Counter[int] = Counter()

    def add(self, lengths: Iterable[int]) -> None:
        self.counts.update(lengths)

    def summary(self) -> LengthSummary:
        total = sum(self.counts.values())
        if not total:
            return LengthSummary(max_length=self.max_length, histogram=self._histogram())
        values = sorted(self.counts)
        return LengthSummary(
            count=total, min=values[0], max=values[-1],
            mean=round(sum(v * n for v, n in self.counts.items()) / total, 2),
            p50=self._quantile(values, total, 0.5), p90=self._quantile(values, total, 0.9),
            p99=self._quantile(values, total, 0.99), max_length=self.max_length,
            over_max_length=sum(n for v, n in self.counts.items() if v > self.max_length),
            histogram=self._histogram(),
        )

    def _quantile(self, values: list[int], total: int, q: float) -> int:
        rank, seen = q * total, 0
        for value in values:
            seen += self.counts[value]
            if seen >= rank:
                return value
        return values[-1]

    def _histogram(self) -> list[Bin]:
        edges = [round(self.max_length * k / 8) for k in range(8)] + [self.max_length + 1]
        counts = [0] * len(edges)
        for value, n in self.counts.items():
            counts[bisect.bisect_right(edges, value) - 1] += n
        bins = [Bin(lo=lo, hi=hi, count=n) for lo, hi, n in zip(edges, edges[1:], counts)]
        return [*bins, Bin(lo=self.max_length + 1, hi=None, count=counts[-1])]
