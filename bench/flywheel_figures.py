"""What `python -m bench.flywheel` recorded, as figures: levels gained, the champion's sealed-test
accuracy, false promotions, the tokens each level took, and whether the targets were met.

Pure functions over the records the benchmark keeps (one struct per kind, each with `t`, seconds
since the clock started); nothing here touches the bus, so the tests feed it hand-made lists.

The figures that judge the loop are not computed by the rules they judge:
- `false_promotions`: a promotion whose new champion, compared item by item with the champion
  it replaced on the SEALED TEST (`eval.tested`: items no decision ever saw), is right on no more
  items than it (b <= c, b: right where the replaced one is wrong, c: the other way round). The
  deployer screened on the selection suite and confirmed on the confirmation suite; this asks
  items neither ever saw. A promotion whose
  two champions were not both tested on one test version is counted in `untested_promotions`.
- `test_accuracy`: the final champion's sealed-test accuracy per level with its 95% interval.
- `levels_gained`: the curriculum's level changes (each judged by the champion's selection
  score); the sealed test says whether the level was really passed (`test_accuracy`).

The older figures stay, for comparison with earlier runs: `noise_promotions` re-runs the
paired test on the selection suite at the flat alpha (0.05; the deployer's screen there is at
0.1, so a promotion its confirmation carried may count), `champion_drops` compares selection-suite accuracies, and
`level1_accuracy` is the final champion's selection-suite binary/1: the suite it was picked by.
"""

from __future__ import annotations

import msgspec

from libs.common.events import decode_outcomes
from libs.common.paired import PairedTest, paired_test

# On two cores with the embedded tiny model and the services' default training settings, in 30 minutes.
TARGET_MINUTES = 30
TARGETS = {
    "levels_gained": {"binary": 2},
    "test_accuracy": {"binary/1": 0.9, "binary/2": 0.8},
    "false_promotions": 0,
    "novel_share": 1.0,
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
    # Real (non-padding) tokens the run trained.
    tokens: int = 0


class SealedScore(msgspec.Struct, kw_only=True, frozen=True):
    """One `eval.tested`: a champion's score on a sealed test version."""

    t: float
    checkpoint_sha256: str
    run_id: str
    suite_version: str
    exact_match: float
    exact_match_low: float
    exact_match_high: float
    levels: dict[str, LevelAccuracy]
    num_examples: int
    outcomes: str


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


# ---------------------------------------------------------------------------- the sealed test


class SealedCheck(msgspec.Struct, kw_only=True, frozen=True):
    """A promotion weighed on the sealed test against the champion it replaced."""

    promotion: Promotion
    previous: Promotion
    # Right where the replaced champion is wrong (better), and the other way round (worse); None: not both tested.
    better: int | None = None
    worse: int | None = None
    suite_version: str = ""

    @property
    def tested(self) -> bool:
        return self.better is not None

    @property
    def false(self) -> bool:
        """SealedScore, and not a gain on the items no decision saw."""
        return self.better is not None and self.worse is not None and self.better <= self.worse


def _tests_of(sha256: str, tests: list[SealedScore]) -> dict[str, SealedScore]:
    """A checkpoint's newest sealed-test score per test version."""
    return {t.suite_version: t for t in tests if t.checkpoint_sha256 == sha256}


def check_sealed(promotions: list[Promotion], tests: list[SealedScore]) -> list[SealedCheck]:
    """Every promotion after the first, against the champion it replaced, on their newest common test version."""
    checks = []
    for previous, promotion in zip(promotions, promotions[1:]):
        mine, theirs = _tests_of(promotion.checkpoint_sha256, tests), _tests_of(previous.checkpoint_sha256, tests)
        common = [version for version in mine if version in theirs]
        if not common:
            checks.append(SealedCheck(promotion=promotion, previous=previous))
            continue
        a, b = mine[common[-1]], theirs[common[-1]]
        try:
            pair = paired_test(decode_outcomes(a.outcomes, a.num_examples), decode_outcomes(b.outcomes, b.num_examples))
        except ValueError:  # no outcomes, or not the same items
            checks.append(SealedCheck(promotion=promotion, previous=previous))
            continue
        checks.append(SealedCheck(promotion=promotion, previous=previous, better=pair.better, worse=pair.worse,
                                  suite_version=common[-1]))
    return checks


def sealed_accuracy(promotions: list[Promotion], tests: list[SealedScore]) -> dict[str, dict] | None:
    """The final champion's newest sealed-test score per level, with its 95% interval; None when untested."""
    if not promotions:
        return None
    mine = [t for t in tests if t.checkpoint_sha256 == promotions[-1].checkpoint_sha256]
    if not mine:
        return None
    return {key: {"accuracy": round(s.accuracy, 4), "low": round(s.low, 4), "high": round(s.high, 4),
                  "correct": s.correct, "total": s.total} for key, s in sorted(mine[-1].levels.items())}


def champion_tests_over_time(promotions: list[Promotion], tests: list[SealedScore]
                             ) -> list[tuple[float, float, SealedScore | None]]:
    """(from, to, its newest sealed-test score or None) for each champion's reign, in order; `to` of
    the last is infinity."""
    reigns = []
    for i, promotion in enumerate(promotions):
        end = promotions[i + 1].t if i + 1 < len(promotions) else float("inf")
        mine = [t for t in tests if t.checkpoint_sha256 == promotion.checkpoint_sha256]
        reigns.append((promotion.t, end, mine[-1] if mine else None))
    return reigns


# ---------------------------------------------------------------------------- levels


def levels_gained(changes: list[LevelChange], skills: list[str]) -> dict[str, int]:
    """Levels each skill rose by (every practised skill listed, 0 when it never rose)."""
    gained = dict.fromkeys(skills, 0)
    for change in changes:
        gained[change.skill] = gained.get(change.skill, 0) + change.level - change.previous_level
    return gained


def tokens_to_level(changes: list[LevelChange], trainings: list[Training]) -> list[dict]:
    """Each level change with the training tokens of every run finished before it (the runs its champion
    could come from): what a slower machine must match at the same count."""
    return [{"skill": c.skill, "level": c.level, "minutes": round(c.t / 60, 2),
             "tokens": sum(run.tokens for run in trainings if run.t <= c.t)} for c in changes]


def champion_accuracy(promotions: list[Promotion], evaluations: list[Evaluation], key: str = LEVEL1) -> float | None:
    """The last champion's accuracy at `key` in its newest evaluation; None without a champion or a score there."""
    if not promotions:
        return None
    for evaluation in reversed(_scores_of(promotions[-1].checkpoint_sha256, evaluations)):
        if key in evaluation.levels:
            return evaluation.levels[key].accuracy
    return None


# ---------------------------------------------------------------------------- the summary


def summarise(*, minutes: float, evaluations: list[Evaluation], promotions: list[Promotion],
              changes: list[LevelChange], trainings: list[Training], skills: list[str],
              tests: list[SealedScore] = (), novelty: dict | None = None,
              alpha: float = 0.05, ready_s: float | None = None) -> dict:
    """The benchmark's final JSON object: its figures, the targets and which were met."""
    checks = check_promotions(promotions, evaluations, alpha=alpha)
    sealed = check_sealed(promotions, list(tests))
    gained = levels_gained(changes, skills)
    level1 = champion_accuracy(promotions, evaluations)
    tested = sealed_accuracy(promotions, list(tests))
    false = sum(c.false for c in sealed)
    share = (novelty or {}).get("share")
    last = evaluations[-1] if evaluations else None
    return {
        "minutes": round(minutes, 2),
        "ready_s": None if ready_s is None else round(ready_s, 1),
        "trainings": len(trainings),
        "evaluations": len(evaluations),
        "levels_gained": gained,
        "test_accuracy": tested,
        "false_promotions": false,
        "untested_promotions": sum(not c.tested for c in sealed),
        "novel_share": share,
        "novel_items": (novelty or {}).get("items"),
        "train_tokens": sum(run.tokens for run in trainings),
        "tokens_to_level": tokens_to_level(changes, trainings),
        "level1_accuracy": level1,
        "promotions": len(promotions),
        "noise_promotions": sum(c.noise for c in checks),
        # Informative beside the paired test: promotions whose whole-suite intervals still overlap.
        "overlapping_promotions": sum(c.intervals_overlap is True for c in checks),
        "champion_drops": sum(c.drop for c in checks),
        "champion_exact_match": promotions[-1].exact_match if promotions else None,
        "last_exact_match": last.exact_match if last else None,
        "alpha": alpha,
        "targets": {"minutes": TARGET_MINUTES, **TARGETS},
        "met": {
            "levels_gained": all(gained.get(skill, 0) >= n for skill, n in TARGETS["levels_gained"].items()),
            "test_accuracy": tested is not None and all(
                key in tested and tested[key]["accuracy"] >= bar for key, bar in TARGETS["test_accuracy"].items()),
            "false_promotions": false <= TARGETS["false_promotions"] and all(c.tested for c in sealed),
            "novel_share": share is not None and share >= TARGETS["novel_share"],
        },
    }
