"""What `python -m bench.flywheel` recorded, as figures: levels gained, promotions beyond the noise,
champion drops, the champion's level-1 accuracy, and whether the targets were met.

Pure functions over the records the benchmark keeps (one struct per kind, each with `t`, seconds
since the clock started); nothing here touches the bus, so the tests feed it hand-made lists.

A promotion is *noise* when the candidate did not beat the previous champion beyond chance:
the deployer's own paired test (`services.deployer.promotion.paired_test`, the exact one-sided
sign test on the items where the two disagree), recomputed from both checkpoints' per-item
outcomes on the same suite, gives p > alpha. When those outcomes are missing (an evaluation
the benchmark did not see, two suites), the whole-suite 95% Wilson intervals decide instead: a
promotion whose interval overlaps the previous champion's is noise. The first champion has no
predecessor and is never noise.
"""

from __future__ import annotations

import msgspec

from libs.common.events import decode_outcomes
from services.deployer.promotion import PairedTest, paired_test

# On two cores with the embedded tiny model and the services' default training settings, in 30 minutes.
TARGET_MINUTES = 30
TARGETS = {
    "levels_gained": {"binary": 2},
    "level1_accuracy": 0.9,
    "noise_promotions": 0,
    "champion_drops": 0,
}
LEVEL1 = "binary/1"
# A float difference this small is a tie (as in libs.common.events).
_TIE = 1e-9

# ---------------------------------------------------------------------------- records


class LevelAccuracy(msgspec.Struct, kw_only=True, frozen=True):
    """One level's accuracy with its 95% Wilson interval, and its val loss (None: not finite)."""

    accuracy: float
    low: float
    high: float
    correct: int = 0
    total: int = 0
    val_loss: float | None = None


class Evaluation(msgspec.Struct, kw_only=True, frozen=True):
    """One `eval.scored`: a checkpoint's scores on the suite."""

    t: float
    run_id: str
    step: int
    checkpoint_sha256: str
    suite_version: str
    exact_match: float
    exact_match_low: float
    exact_match_high: float
    val_loss: float | None
    levels: dict[str, LevelAccuracy]
    # Each skill's curriculum level when the checkpoint was scored (what it had been practising).
    curriculum: dict[str, int] = {}
    num_examples: int = 0
    # Per-item results (EvalScored.outcomes): what the paired test compares.
    outcomes: str = ""
    regressions: list[str] = []


class Promotion(msgspec.Struct, kw_only=True, frozen=True):
    """One `model.deployed`: a new champion (a redelivered announcement is recorded once)."""

    t: float
    event_id: str
    checkpoint_sha256: str
    checkpoint_uri: str
    run_id: str
    step: int
    exact_match: float
    val_loss: float
    reason: str


class LevelChange(msgspec.Struct, kw_only=True, frozen=True):
    """One `curriculum.level_changed`."""

    t: float
    skill: str
    previous_level: int
    level: int
    accuracy: float
    reason: str


class Training(msgspec.Struct, kw_only=True, frozen=True):
    """One `training.finished`."""

    t: float
    run_id: str
    dataset_id: str
    global_step: int
    final_loss: float
    duration_s: float


class Decision(msgspec.Struct, kw_only=True, frozen=True):
    """One of the deployer's decisions (`DEPLOY_DECISIONS` in KV), when the benchmark first saw it."""

    t: float
    id: str
    outcome: str
    reason: str
    checkpoint_sha256: str
    run_id: str = ""


# ---------------------------------------------------------------------------- promotions


class PromotionCheck(msgspec.Struct, kw_only=True, frozen=True):
    """A promotion weighed against the champion it replaced."""

    promotion: Promotion
    previous: Promotion | None
    # The paired test on the same items; None when both checkpoints' outcomes were not at hand.
    test: PairedTest | None
    # Whether the whole-suite 95% intervals overlap; None when either evaluation is missing.
    intervals_overlap: bool | None
    noise: bool
    # The champion's accuracy fell below the previous champion's.
    drop: bool


def _scores_of(sha256: str, evaluations: list[Evaluation]) -> list[Evaluation]:
    return [e for e in evaluations if e.checkpoint_sha256 == sha256]


def _on_same_suite(candidate: list[Evaluation], previous: list[Evaluation]) -> tuple[Evaluation, Evaluation] | None:
    """The newest pair of evaluations of the two checkpoints on one suite."""
    for mine in reversed(candidate):
        for theirs in reversed(previous):
            if mine.suite_version == theirs.suite_version:
                return mine, theirs
    return None


def _paired(mine: Evaluation, theirs: Evaluation) -> PairedTest | None:
    if not (mine.num_examples and theirs.num_examples):
        return None
    try:
        return paired_test(decode_outcomes(mine.outcomes, mine.num_examples),
                           decode_outcomes(theirs.outcomes, theirs.num_examples))
    except ValueError:  # no outcomes, or not the same items
        return None


def check_promotions(promotions: list[Promotion], evaluations: list[Evaluation], *,
                     alpha: float = 0.05) -> list[PromotionCheck]:
    """Each promotion, in order, weighed against the champion before it (see the module docstring)."""
    checks = []
    for i, promotion in enumerate(promotions):
        previous = promotions[i - 1] if i else None
        test, overlap = None, None
        if previous is not None:
            pair = _on_same_suite(_scores_of(promotion.checkpoint_sha256, evaluations),
                                  _scores_of(previous.checkpoint_sha256, evaluations))
            if pair:
                mine, theirs = pair
                test = _paired(mine, theirs)
                overlap = mine.exact_match_low <= theirs.exact_match_high and theirs.exact_match_low <= mine.exact_match_high
        if previous is None:
            noise = False
        elif test is not None:
            noise = test.p_value > alpha + _TIE
        else:
            # No paired numbers: only intervals that do not overlap show a gain beyond the noise.
            noise = overlap is not False
        drop = previous is not None and promotion.exact_match < previous.exact_match - _TIE
        checks.append(PromotionCheck(promotion=promotion, previous=previous, test=test,
                                     intervals_overlap=overlap, noise=noise, drop=drop))
    return checks


# ---------------------------------------------------------------------------- levels


def levels_gained(changes: list[LevelChange], skills: list[str]) -> dict[str, int]:
    """Levels each skill rose by (every practised skill listed, 0 when it never rose)."""
    gained = dict.fromkeys(skills, 0)
    for change in changes:
        gained[change.skill] = gained.get(change.skill, 0) + change.level - change.previous_level
    return gained


def champion_accuracy(promotions: list[Promotion], evaluations: list[Evaluation], key: str = LEVEL1) -> float | None:
    """The last champion's accuracy at `key` in its newest evaluation; None without a champion or a score there."""
    if not promotions:
        return None
    for evaluation in reversed(_scores_of(promotions[-1].checkpoint_sha256, evaluations)):
        if key in evaluation.levels:
            return evaluation.levels[key].accuracy
    return None


def champion_over_time(promotions: list[Promotion], evaluations: list[Evaluation]
                       ) -> list[tuple[float, Evaluation | None, Promotion]]:
    """(time it became champion, its newest evaluation or None, the promotion), in order."""
    return [(p.t, (_scores_of(p.checkpoint_sha256, evaluations) or [None])[-1], p) for p in promotions]


# ---------------------------------------------------------------------------- the summary


def summarise(*, minutes: float, evaluations: list[Evaluation], promotions: list[Promotion],
              changes: list[LevelChange], trainings: list[Training], skills: list[str],
              alpha: float = 0.05, ready_s: float | None = None) -> dict:
    """The benchmark's final JSON object: its figures, the targets and which were met."""
    checks = check_promotions(promotions, evaluations, alpha=alpha)
    gained = levels_gained(changes, skills)
    level1 = champion_accuracy(promotions, evaluations)
    noise = sum(c.noise for c in checks)
    drops = sum(c.drop for c in checks)
    last = evaluations[-1] if evaluations else None
    return {
        "minutes": round(minutes, 2),
        "ready_s": None if ready_s is None else round(ready_s, 1),
        "trainings": len(trainings),
        "evaluations": len(evaluations),
        "levels_gained": gained,
        "level1_accuracy": level1,
        "promotions": len(promotions),
        "noise_promotions": noise,
        # Informative beside the paired test: promotions whose whole-suite intervals still overlap.
        "overlapping_promotions": sum(c.intervals_overlap is True for c in checks),
        "champion_drops": drops,
        "champion_exact_match": promotions[-1].exact_match if promotions else None,
        "last_exact_match": last.exact_match if last else None,
        "alpha": alpha,
        "targets": {"minutes": TARGET_MINUTES, **TARGETS},
        "met": {
            "levels_gained": all(gained.get(skill, 0) >= n for skill, n in TARGETS["levels_gained"].items()),
            "level1_accuracy": level1 is not None and level1 >= TARGETS["level1_accuracy"],
            "noise_promotions": noise <= TARGETS["noise_promotions"],
            "champion_drops": drops <= TARGETS["champion_drops"],
        },
    }
