"""Two checkpoints on the same items: the paired sign test, the screen, and which levels a
confirmation scores.

A candidate is promoted over the champion in two stages (services/deployer/promotion.py):

1. the screen, on the selection suite: the candidate's paired test against the champion there
   has p <= SCREEN_ALPHA. The screen only decides whether a confirmation is worth running; it
   spends nothing, so it need not control any error rate (every candidate is screened on the
   same items, and many pass it by luck over time);
2. the confirmation, on the confirmation suite: items the screen never saw, independent of the
   screen's outcome. The j-th confirmation against a champion is a paired test at
   alpha / (j (j + 1)) (alpha spending over confirmations, not over candidates).

The evaluator runs the screen to know whether to score the confirmation suite at all (it is
twice the size of the selection suite), and the deployer runs it again to decide: one function,
so the two agree. `confirmation_levels` picks the levels the confirmation scores: those where
the screen saw the candidate ahead. That choice depends on selection items only, never on the
confirmation items, so the confirmation's test stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec

from libs.common.events import LevelScore

# The screen's level. Once a model improves, every candidate after it beats a stale champion on
# the selection suite; at 0.1 each of them spent a confirmation, and in a 30-minute bench the
# 24th confirmation against one champion was tested at 9e-5 while the level-1 confirmation items
# (29) could show at most ~1e-4. At 0.01 a candidate is confirmed only when the selection suite
# already shows strong evidence: equal candidates spend a confirmation 0.4% of the time (2.4% at
# 0.1), a real gain from 50% to 90% on one level still passes the screen 88% of the time
# (tests/services/deployer/test_false_promotions.py states both).
SCREEN_ALPHA = 0.01


class PairedTest(msgspec.Struct, frozen=True):
    """One model against another on the same items."""

    items: int
    # Right where the other is wrong: the candidate (b), the champion (c).
    better: int
    worse: int
    p_value: float

    def describe(self) -> str:
        return (f"on the same {self.items} items the candidate is right where the champion is wrong on "
                f"{self.better} and wrong where it is right on {self.worse}: exact one-sided sign test "
                f"p = {self.p_value:.4f}")


def paired_test(candidate: Sequence[bool], champion: Sequence[bool]) -> PairedTest:
    """Exact one-sided McNemar test that `candidate` is right more often than `champion`, item by item.

    b = items the candidate gets right and the champion wrong, c = the other way round. If the
    candidate is no better, each of the b + c discordant items is a fair coin, so
    p = P(Binomial(b + c, 1/2) >= b).
    """
    if len(candidate) != len(champion):
        raise ValueError(f"{len(candidate)} outcomes against {len(champion)}: not the same items")
    better = sum(1 for mine, theirs in zip(candidate, champion) if mine and not theirs)
    worse = sum(1 for mine, theirs in zip(candidate, champion) if theirs and not mine)
    n = better + worse
    # Exact in integers, one division at the end.
    p = sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n
    return PairedTest(items=len(candidate), better=better, worse=worse, p_value=p)


def screened(candidate: Sequence[bool], champion: Sequence[bool]) -> PairedTest | None:
    """The selection-suite test when it passes the screen (p <= SCREEN_ALPHA), else None."""
    test = paired_test(candidate, champion)
    return test if test.p_value <= SCREEN_ALPHA else None


def confirmation_levels(candidate: Mapping[str, LevelScore], champion: Mapping[str, LevelScore]) -> list[str]:
    """The levels a confirmation scores: where the candidate got more selection items right than
    the champion, in the candidate's order."""
    return [key for key, score in candidate.items() if key in champion and score.correct > champion[key].correct]
