"""The promotion rule over many candidates, simulated (no bus): a candidate no better than the
champion is EVER promoted with probability at most alpha, however many are tested against it, and
the power left for a real gain. The figures stated in services/deployer/settings.py and README.md
are the ones asserted here.

The model: 480 items, 48 at each of 10 levels; every item of a level is right with the level's true
accuracy (0.3 to 0.95), independently. The champion's outcomes are drawn once per sequence (what
the deployer holds); each candidate's afresh. The real `decide`, counting candidates in the
champion record as the deployer does, decides a whole sequence and samples of each power scenario;
the bulk goes through `compare`, the same rule on per-level counts (numpy), checked to agree with
`decide` wherever both ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import numpy as np

from libs.common.events import EvalScored, LevelScore, encode_outcomes
from libs.common.records import Champion
from services.deployer.promotion import alpha_spent, claim_number, crowned, decide

ALPHA = 0.05
MAX_LEVEL_DROP = 0.05
PER_LEVEL = 48
TRUE_ACCURACY = {"binary/1": 0.95, "binary/2": 0.9, "binary/3": 0.85, "binary/4": 0.8, "binary/5": 0.7,
                 "syllo/1": 0.6, "syllo/2": 0.5, "syllo/3": 0.4, "syllo/4": 0.35, "syllo/5": 0.3}
TRUE = np.array(list(TRUE_ACCURACY.values()))
ITEMS = PER_LEVEL * len(TRUE)
CANDIDATES = 2000  # tested one after another against one champion
SEQUENCES = 1000
# A candidate 10 points better on one level's 48 items (syllo/1: 0.6 -> 0.7), the others equal.
ONE_LEVEL_BETTER = np.where(np.array(list(TRUE_ACCURACY)) == "syllo/1", TRUE + 0.1, TRUE)
# A candidate 10 points better on every level (binary/1: 0.95 -> 1.0).
EVERY_LEVEL_BETTER = np.minimum(TRUE + 0.1, 1.0)
# The power stated in settings.py and README.md: at least this often promoted as the k-th candidate.
STATED_POWER = {
    "one level": {1: 0.015, 10: 0.0005, 20: 0.0001},
    "every level": {1: 0.65, 10: 0.45, 20: 0.35},
}
NOW = datetime(2025, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------- the rule on counts


def _sign_test_tails(max_n: int) -> np.ndarray:
    """tails[n, b] = P(Binomial(n, 1/2) >= b) for b = 0..n+1, computed as `paired_test` computes
    its p-value (exact integers, one division), so the two agree to the last bit."""
    tails = np.zeros((max_n + 1, max_n + 2))
    row = [1]
    for n in range(max_n + 1):
        if n:
            row = [1, *(row[j - 1] + row[j] for j in range(1, n)), 1]
        suffix, whole = 0, 2**n
        for b in range(n, -1, -1):
            suffix += row[b]
            tails[n, b] = suffix / whole
    return tails


TAILS = _sign_test_tails(ITEMS)


def wins_needed(levels: list[float]) -> np.ndarray:
    """needed[i, n]: the fewest of n discordant items the candidate must win for p <= levels[i]."""
    needed = np.empty((len(levels), ITEMS + 1), dtype=np.int16)
    for n in range(ITEMS + 1):
        # tails[n] falls with b: count the b whose p-value is still above the level.
        needed[:, n] = np.searchsorted(-TAILS[n, :n + 2], -np.asarray(levels), side="left")
    return needed


@dataclass(frozen=True)
class Compared:
    """Candidates against the champion, from counts per level (last axis of what `compare` takes)."""

    discordant: np.ndarray  # n = b + c
    wins: np.ndarray  # b: right where the champion is wrong
    regressed: np.ndarray  # some level down more than MAX_LEVEL_DROP

    def passed(self, needed: np.ndarray) -> np.ndarray:
        """The sign test, given `needed`: the wins needed per n (rows broadcast against the candidates)."""
        needed = np.broadcast_to(needed, (*self.discordant.shape, needed.shape[-1]))
        return self.wins >= np.take_along_axis(needed, self.discordant[..., None], axis=-1)[..., 0]

    def promoted(self, needed: np.ndarray) -> np.ndarray:
        # With one champion the best champion so far is the champion: one regression check covers both.
        return self.passed(needed) & ~self.regressed


def compare(won: np.ndarray, lost: np.ndarray) -> Compared:
    """`won`/`lost`: per level, the candidate's discordant items (right where the champion is wrong,
    wrong where it is right)."""
    # A level's drop is (lost - won) / PER_LEVEL: never within 1e-9 of a drop of 5 points on 48
    # items, so this agrees with score_regressions' float arithmetic (checked against `decide`).
    regressed = ((lost - won).max(-1) / PER_LEVEL > MAX_LEVEL_DROP + 1e-9)
    return Compared(discordant=(won + lost).sum(-1), wins=won.sum(-1), regressed=regressed)


def compare_items(champion: np.ndarray, candidate: np.ndarray) -> Compared:
    """`compare` on per-item outcomes (last axis: the items in suite order)."""
    theirs, mine = (a.reshape(*a.shape[:-1], len(TRUE), PER_LEVEL) for a in np.broadcast_arrays(champion, candidate))
    return compare((mine & ~theirs).sum(-1), (theirs & ~mine).sum(-1))


def wilson_upper(hits: int, n: int, z: float = 2.5758) -> float:
    """Upper end of the Wilson score interval (z = 2.5758: 99%, two-sided)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    return centre + z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))


# ---------------------------------------------------------------------------- the real rule


def score(name: str, correct: list[bool]) -> EvalScored:
    levels = {}
    for i, key in enumerate(TRUE_ACCURACY):
        right = sum(correct[i * PER_LEVEL:(i + 1) * PER_LEVEL])
        levels[key] = LevelScore(correct=right, total=PER_LEVEL, accuracy=right / PER_LEVEL, low=0.0, high=1.0)
    sha = name.encode().hex().rjust(64, "0")
    return EvalScored(
        id=f"eval-{name}", run_id=f"run-{name}", step=1, checkpoint_uri=f"file:///ckpt/{name}",
        checkpoint_sha256=sha, suite="binary+syllo", suite_version="v1", exact_match=sum(correct) / len(correct),
        val_loss=1.0, num_examples=len(correct), levels=levels, outcomes=encode_outcomes(correct),
    )


def first_champion(correct: list[bool]) -> Champion:
    return crowned(score("champion", correct), None, reason="first champion", event_id="e", now=NOW)


def decided(champion_items: np.ndarray, candidate_items: np.ndarray, k: int) -> bool:
    """Whether `decide` promotes the candidate as the k-th tested against the champion."""
    held = first_champion(champion_items.tolist())
    decision = decide(score(f"candidate-{k}", candidate_items.tolist()), held, candidate_number=k, alpha=ALPHA,
                      max_level_drop=MAX_LEVEL_DROP)
    assert decision.candidate_number == k
    return decision.promote


# ---------------------------------------------------------------------------- no better: never promoted


def test_decide_and_the_counts_agree_over_a_whole_sequence():
    """One champion, 2,000 equal candidates through the real `decide`, each numbered as the deployer
    numbers it (`claim_number`): the rule on counts decides every one the same."""
    rng = np.random.default_rng(7)
    p = np.repeat(TRUE, PER_LEVEL)
    champion_items = rng.random(ITEMS) < p
    candidates = rng.random((CANDIDATES, ITEMS)) < p
    held = first_champion(champion_items.tolist())
    tested, outcomes = None, []
    for i, items in enumerate(candidates):
        candidate = score(f"c{i}", items.tolist())
        tested, k = claim_number(tested, held, candidate)  # as the deployer does, before deciding
        decision = decide(candidate, held, candidate_number=k, alpha=ALPHA, max_level_drop=MAX_LEVEL_DROP)
        assert decision.candidate_number == i + 1
        if i % 50 == 0:  # decided again (a redelivery): the same number, the same decision
            again, k_again = claim_number(tested, held, candidate)
            assert again is tested and decide(candidate, held, candidate_number=k_again, alpha=ALPHA,
                                              max_level_drop=MAX_LEVEL_DROP) == decision
        outcomes.append(decision.promote)
    needed = wins_needed([alpha_spent(k, ALPHA) for k in range(1, CANDIDATES + 1)])
    assert outcomes == compare_items(champion_items, candidates).promoted(needed).tolist()
    assert tested.count == CANDIDATES


def test_candidates_no_better_than_the_champion_are_ever_promoted_with_probability_at_most_alpha():
    rng = np.random.default_rng(20250101)
    needed = wins_needed([alpha_spent(k, ALPHA) for k in range(1, CANDIDATES + 1)])
    needed_before = wins_needed([ALPHA] * CANDIDATES)  # the rule before alpha was spent: alpha for each
    ever = {"rule": 0, "sign test alone": 0, "rule before": 0}
    chunk = 100
    for _ in range(SEQUENCES // chunk):
        # Per level, the champion's right items, then each candidate's wins and losses against it.
        right = rng.binomial(PER_LEVEL, TRUE, size=(chunk, 1, len(TRUE)))
        won = rng.binomial(PER_LEVEL - right, TRUE, size=(chunk, CANDIDATES, len(TRUE)))
        lost = rng.binomial(right, 1 - TRUE, size=(chunk, CANDIDATES, len(TRUE)))
        compared = compare(won, lost)
        passed = compared.passed(needed)
        ever["rule"] += int((passed & ~compared.regressed).any(-1).sum())
        ever["sign test alone"] += int(passed.any(-1).sum())
        ever["rule before"] += int(compared.promoted(needed_before).any(-1).sum())
    print(f"sequences of {CANDIDATES} equal candidates with a false promotion, of {SEQUENCES}: {ever}; "
          f"99% Wilson upper bounds: rule {wilson_upper(ever['rule'], SEQUENCES):.4f}, "
          f"sign test alone {wilson_upper(ever['sign test alone'], SEQUENCES):.4f}")
    # The rule: at most alpha, with the estimate's own slack (99% Wilson upper bound).
    assert wilson_upper(ever["rule"], SEQUENCES) <= ALPHA
    # The union bound holds for the sign test alone too (the regression checks only keep more
    # candidates out), but the sum of the alpha_k (0.04998 over 2,000) is nearly reached there:
    # 1,000 sequences bound the estimate, not its upper end.
    assert ever["sign test alone"] / SEQUENCES <= ALPHA
    # The simulation sees the defect it guards against: at alpha for each, most sequences promote.
    assert ever["rule before"] >= 0.5 * SEQUENCES


# ---------------------------------------------------------------------------- better: promoted


def test_a_real_gain_is_promoted_with_the_stated_power():
    rng = np.random.default_rng(11)
    first_20 = range(1, 21)
    for name, better, reps in (("one level", ONE_LEVEL_BETTER, 200_000),
                               ("every level", EVERY_LEVEL_BETTER, 20_000)):
        # A fresh champion for each candidate: the power of the k-th candidate, whatever came before.
        right = rng.binomial(PER_LEVEL, TRUE, size=(reps, len(TRUE)))
        compared = compare(rng.binomial(PER_LEVEL - right, better), rng.binomial(right, 1 - better))

        def power_at(levels: list[float]) -> np.ndarray:
            return np.array([compared.promoted(row).mean() for row in wins_needed(levels)])

        power = power_at([alpha_spent(k, ALPHA) for k in first_20])
        # On the same draws: the other spending that sums to alpha, 6 alpha / (pi^2 k^2); alpha for each.
        other = power_at([6 / math.pi**2 * ALPHA / k**2 for k in first_20])
        [before] = power_at([ALPHA])
        print(f"{name} better: power as the 1st/10th/20th candidate {power[0]:.4f} / {power[9]:.4f} / "
              f"{power[19]:.4f}, mean over the first 20 {power.mean():.4f}; with 6 alpha/(pi^2 k^2): "
              f"{other[0]:.4f} / {other[9]:.4f} / {other[19]:.4f}, mean {other.mean():.4f}; at alpha {before:.4f}")
        for k, stated in STATED_POWER[name].items():
            assert power[k - 1] >= stated, (name, k)
        assert power.mean() > other.mean()  # why alpha / (k (k + 1))


def test_decide_and_the_counts_agree_on_better_candidates():
    rng = np.random.default_rng(5)
    p = np.repeat(TRUE, PER_LEVEL)
    for better, ks in ((ONE_LEVEL_BETTER, (1,)), (EVERY_LEVEL_BETTER, (1, 10, 20))):
        q = np.repeat(better, PER_LEVEL)
        for k in ks:
            champions, candidates = rng.random((150, ITEMS)) < p, rng.random((150, ITEMS)) < q
            real = [decided(champion, candidate, k) for champion, candidate in zip(champions, candidates)]
            needed = wins_needed([alpha_spent(k, ALPHA)])
            assert real == compare_items(champions, candidates).promoted(needed).tolist()
            if better is EVERY_LEVEL_BETTER:
                assert 0 < sum(real) < len(real)  # both outcomes checked
