"""Which checkpoint should be served: the promotion rule, a manual deploy, the rollback target.

A scored candidate replaces the champion only when it is better beyond the noise ON THE SAME
ITEMS and regresses nowhere. For an `EvalScored` and the champion record, in order:

1. the candidate is the champion: when the record holds another suite's score (or no per-item
   outcomes) it takes this one (`rescored`: the evaluator scored the champion on its suite);
   otherwise there is nothing to decide and the caller re-announces the champion;
2. the candidate's run was rolled back: refused, never promoted again;
3. its val loss is not finite, or its per-item outcomes do not hold its item count: refused;
4. no champion: promoted (the first champion);
5. the champion was scored on another suite version: kept, "champion not yet scored on suite
   X". Scores on two suites are not comparable and a new suite must not promote blindly; the
   evaluator scores the champion on its suite, and rule 1 records that;
6. the paired test on the suite's items: b = items the candidate gets right and the champion
   wrong, c = the other way round. If the candidate is no better, each of the b + c discordant
   items is a fair coin, so p = P(Binomial(b + c, 1/2) >= b): the exact one-sided McNemar
   (sign) test. The k-th distinct candidate tested against this champion (`claim_number`) is
   kept unless p <= alpha_k = alpha / (k (k + 1)) (`alpha_spent`; alpha defaults to 0.05);
7. no regression (`libs.common.events.score_regressions`): kept when any level's accuracy is
   down by more than max_level_drop (0.05, absolute) against the champion or against the best
   any champion had on this suite (`best_levels`), or, when max_loss_rise is set, the val loss
   is up by more than it (relative). Unset (the default) a val loss rise of more than 15% is
   stated in the reason but does not block;
8. otherwise promoted.
Every reason states the numbers: k and alpha_k, the discordant counts, the p-value, each regression.

Why alpha_k: every candidate is tested against the same champion on the same fixed items, so
testing each at alpha would promote some candidate no better than the champion with
probability up to 1 - (1 - alpha)^k. The levels alpha_k sum to alpha (1/(k(k+1)) = 1/k - 1/(k+1)),
so by the union bound the chance that ANY candidate no better than the champion is ever promoted
over it is at most alpha, however many come and however dependent their tests are (plain
Bonferroni-style alpha spending). The count belongs to the champion: a new one starts at k = 1.
A score decided again (a redelivery, the same checkpoint and suite version) keeps its k.

A manual deploy (`decide_manual`) is the operator's call instead of rules 2, 6 and 7: it
needs only a score on the current suite (the newest score's) with a finite val loss and
per-item outcomes; the reason still states how the checkpoint compares. It tests nothing: no
candidate number is spent.

Rollback walks the champion history as a stack: a promotion pushes, a rollback pops back
to the checkpoint it restored. The target is the entry under the current one, so rolling
back twice goes two promotions back, not back and forth.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

import msgspec

from libs.common.events import EvalScored, LevelScore, decode_outcomes, score_regressions
from libs.common.records import ROLLED_BACK_KEPT, CandidatesTested, Champion

Outcome = Literal["promoted", "kept", "refused", "rescored", "already_champion"]

# Candidate keys the count keeps (`CandidatesTested.keys`, ~90 bytes each). A score decided
# again after its key fell off is counted again: a smaller alpha_k, never a larger one.
TESTED_KEPT = 256


class NothingToRollBack(Exception):
    """There is no earlier champion to return to."""


class Decision(msgspec.Struct, frozen=True):
    outcome: Outcome
    reason: str
    # k: the candidate's number among those tested against this champion (rule 6); 0 when no
    # paired test was made. The caller counts it in the champion record (`counted`).
    candidate_number: int = 0

    @property
    def promote(self) -> bool:
        return self.outcome == "promoted"


class PairedTest(msgspec.Struct, frozen=True):
    """The candidate against the champion on the same items."""

    items: int
    # Right where the other is wrong: the candidate (b), the champion (c).
    better: int
    worse: int
    p_value: float

    def describe(self) -> str:
        return (f"on the same {self.items} items the candidate is right where the champion is wrong on "
                f"{self.better} and wrong where it is right on {self.worse}: exact one-sided sign test "
                f"p = {self.p_value:.4f}")


def paired_test(candidate: list[bool], champion: list[bool]) -> PairedTest:
    """Exact one-sided McNemar test that `candidate` is right more often than `champion`, item by item."""
    if len(candidate) != len(champion):
        raise ValueError(f"{len(candidate)} outcomes against {len(champion)}: not the same items")
    better = sum(1 for mine, theirs in zip(candidate, champion) if mine and not theirs)
    worse = sum(1 for mine, theirs in zip(candidate, champion) if theirs and not mine)
    n = better + worse
    # Exact in integers, one division at the end.
    p = sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n
    return PairedTest(items=len(candidate), better=better, worse=worse, p_value=p)


# ---------------------------------------------------------------------------- alpha spending


def alpha_spent(k: int, alpha: float) -> float:
    """The level the k-th candidate tested against a champion is tested at (k = 1, 2, ...).

    alpha / (k (k + 1)): these sum to alpha over all k. Chosen over 6 alpha / (pi^2 k^2), which
    sums to alpha too: that one is larger only for k = 1 (0.61 alpha against 0.5 alpha), this one
    for every k >= 2, so more power from the second candidate on.
    """
    if k < 1:
        raise ValueError(f"candidates are numbered from 1, not {k}")
    return alpha / (k * (k + 1))


def describe_spending(k: int, alpha: float) -> str:
    return (f"candidate {k} against this champion: tested at alpha_{k} = {alpha_spent(k, alpha):.2g} "
            f"(alpha {alpha:g} spent over candidates as alpha/(k(k+1)))")


def candidate_key(candidate: EvalScored) -> str:
    """What makes two scores the same candidate: its checkpoint on one suite version."""
    return f"{candidate.checkpoint_sha256}@{candidate.suite_version}"


def claim_number(tested: CandidatesTested | None, champion: Champion,
                 candidate: EvalScored) -> tuple[CandidatesTested, int]:
    """k for `candidate` against `champion`, and the record that counts it: its number if it was
    counted already (a redelivery, a second deployer), else the next one.

    The number is claimed (compare-and-set) before the decision: a candidate decided against a
    champion that changed meanwhile has spent a number for nothing, which only lowers later levels.
    A key that fell off the newest TESTED_KEPT is counted again, at a smaller level: still safe.
    """
    if tested is None or tested.champion_event_id != champion.event_id:
        tested = CandidatesTested(champion_event_id=champion.event_id)
    key = candidate_key(candidate)
    if key in tested.keys:
        return tested, tested.count - len(tested.keys) + tested.keys.index(key) + 1
    counted = msgspec.structs.replace(tested, count=tested.count + 1, keys=[*tested.keys, key][-TESTED_KEPT:])
    return counted, counted.count


def best_levels(champion: Champion, suite_version: str) -> dict[str, LevelScore]:
    """Per level, the best score any champion had on `suite_version` (this one's included)."""
    return _best_of(champion.best_levels if champion.best_suite_version == suite_version else {},
                    champion.levels if champion.suite_version == suite_version else {})


def _below_best(candidate: EvalScored, champion: Champion, max_level_drop: float) -> list[str]:
    """Levels of `candidate` below the best champion so far on its suite by more than
    `max_level_drop`, but for those where that best is the champion's own score (compared anyway)."""
    own = champion.levels if champion.suite_version == candidate.suite_version else {}
    raised = {key: best for key, best in best_levels(champion, candidate.suite_version).items()
              if key not in own or best.accuracy > own[key].accuracy}
    return score_regressions(candidate.levels, candidate.val_loss, raised, None, max_level_drop=max_level_drop)


def _best_of(*scores: dict[str, LevelScore]) -> dict[str, LevelScore]:
    best: dict[str, LevelScore] = {}
    for levels in scores:
        for key, level in levels.items():
            if key not in best or level.accuracy > best[key].accuracy:
                best[key] = level
    return best


# ---------------------------------------------------------------------------- deciding


def describe_score(event: EvalScored) -> str:
    loss = f"{event.val_loss:.4f}" if event.val_loss is not None else "not finite"
    return (f"exact_match {event.exact_match:.3f} [95% {event.exact_match_low:.3f}, {event.exact_match_high:.3f}], "
            f"val_loss {loss}")


def describe_champion(champion: Champion) -> str:
    return f"champion exact_match {champion.exact_match:.3f}, val_loss {champion.val_loss:.4f}"


def _unusable(candidate: EvalScored) -> str | None:
    """Why this score can never make its checkpoint the champion, or None."""
    if candidate.val_loss is None:
        return f"val loss is not finite ({describe_score(candidate)})"
    try:
        candidate.item_outcomes()
    except ValueError as exc:
        return f"no usable per-item outcomes for its {candidate.num_examples} items ({exc})"
    return None


def _champion_outcomes(champion: Champion, suite_version: str, items: int | None = None) -> list[bool] | None:
    """The champion's per-item outcomes on `suite_version` (`items` of them, when given), or None
    when it has none there."""
    if champion.suite_version != suite_version or (items is not None and champion.num_examples != items):
        return None
    try:
        return decode_outcomes(champion.outcomes, champion.num_examples) if champion.outcomes else None
    except ValueError:
        return None


def before_the_test(candidate: EvalScored, champion: Champion | None) -> Decision | None:
    """The decision rules 1-5 make before any test, or None when `candidate` is tested against `champion`."""
    score = describe_score(candidate)
    if champion is not None and champion.checkpoint_sha256 == candidate.checkpoint_sha256:
        if _champion_outcomes(champion, candidate.suite_version) is not None:
            return Decision("already_champion", "candidate is already the champion")
        if why := _unusable(candidate):
            return Decision("refused", f"the champion's score on suite {candidate.suite_version} is unusable: {why}")
        return Decision("rescored", f"the champion scored on suite {candidate.suite_version} "
                                    f"(was {champion.suite_version or 'none'}): {score}")
    if champion is not None and candidate.run_id in champion.rolled_back_runs:
        return Decision("refused", f"run {candidate.run_id} was rolled back: its checkpoints are never promoted again")
    if why := _unusable(candidate):
        return Decision("refused", why)
    if champion is None:
        return Decision("promoted", f"first champion ({score})")
    if _champion_outcomes(champion, candidate.suite_version, candidate.num_examples) is None:
        return Decision("kept", (
            f"champion not yet scored on suite {candidate.suite_version} (its score is on suite "
            f"{champion.suite_version}): not comparable; waiting for the evaluator to score it there ({score})"
        ))
    return None


def decide(
    candidate: EvalScored, champion: Champion | None, *, candidate_number: int = 1,
    alpha: float = 0.05, max_level_drop: float = 0.05, max_loss_rise: float | None = None,
) -> Decision:
    """Whether `candidate`, the `candidate_number`-th tested against `champion` (`claim_number`),
    should replace it (rules 1-8 above), and why, in words."""
    if (early := before_the_test(candidate, champion)) is not None:
        return early
    assert champion is not None  # before_the_test decides when there is none
    score = describe_score(candidate)
    theirs = _champion_outcomes(champion, candidate.suite_version, candidate.num_examples)
    k = candidate_number
    level = alpha_spent(k, alpha)
    test = paired_test(candidate.item_outcomes(), theirs)
    regressions = score_regressions(
        candidate.levels, candidate.val_loss, champion.levels, champion.val_loss,
        max_level_drop=max_level_drop, max_loss_rise=math.inf if max_loss_rise is None else max_loss_rise,
    )
    below_best = _below_best(candidate, champion, max_level_drop)
    # Not blocking, but said: how the val loss moved (the evaluator's flag rule).
    flags = [] if max_loss_rise is not None else score_regressions({}, candidate.val_loss, {}, champion.val_loss)
    flagged = f"; flagged, not blocking: {'; '.join(flags)}" if flags else ""
    held = describe_champion(champion)
    spending = describe_spending(k, alpha)
    problems = []
    if test.p_value > level:
        problems.append(f"not better beyond the noise: {test.describe()} > alpha_{k} {level:.2g}")
    if regressions:
        problems.append("regressions: " + "; ".join(regressions))
    if below_best:
        problems.append(f"below the best champion so far on suite {candidate.suite_version}: " + "; ".join(below_best))
    if problems:
        return Decision("kept", f"{spending}; {'; '.join(problems)}{flagged} ({score} vs {held})", candidate_number=k)
    loss_rule = f", val loss not up more than {max_loss_rise:.0%}" if max_loss_rise is not None else ""
    return Decision("promoted", (
        f"{spending}; better beyond the noise: {test.describe()} <= alpha_{k} {level:.2g}; no level down more "
        f"than {max_level_drop * 100:g} points against the champion or the best champion so far{loss_rule}"
        f"{flagged} ({score} vs {held})"
    ), candidate_number=k)


def decide_manual(
    scores: list[EvalScored], current_suite: str | None, champion: Champion | None, wanted: str,
) -> tuple[Decision, EvalScored | None]:
    """A manual deploy of checkpoint `wanted` given its scores (any suite) and the current suite.

    Returns the decision and the score it stands on (None when refused for want of one).
    """
    if current_suite is None:
        return Decision("refused", "no checkpoint has been scored yet"), None
    current = next((s for s in scores if s.suite_version == current_suite), None)
    if current is None:
        elsewhere = sorted({s.suite_version for s in scores})
        scored = f"scored only on {', '.join(elsewhere)}" if elsewhere else "never scored"
        return Decision("refused", f"checkpoint {wanted} has not been scored on the current suite "
                                   f"{current_suite} ({scored})"), None
    if champion is not None and champion.checkpoint_sha256 == current.checkpoint_sha256:
        return decide(current, champion), current
    if why := _unusable(current):
        return Decision("refused", why), current
    notes = []
    if champion is not None:
        theirs = _champion_outcomes(champion, current_suite, current.num_examples)
        if theirs is not None:
            notes.append(paired_test(current.item_outcomes(), theirs).describe())
            notes.extend(score_regressions(current.levels, current.val_loss, champion.levels, champion.val_loss))
        if below_best := _below_best(current, champion, 0.05):
            notes.append(f"below the best champion so far on suite {current_suite}: {'; '.join(below_best)}")
        else:
            notes.append(f"the champion has no score on suite {current_suite} to compare with")
        if current.run_id in champion.rolled_back_runs:
            notes.append(f"run {current.run_id} was rolled back earlier")
    compared = f"; {'; '.join(notes)}" if notes else ""
    return Decision("promoted", f"manual deploy ({describe_score(current)}){compared}"), current


# ---------------------------------------------------------------------------- champion records


def crowned(candidate: EvalScored, previous: Champion | None, *, reason: str, event_id: str, now: datetime) -> Champion:
    """The champion record for a promoted candidate: no candidate tested against it yet;
    rolled-back runs and the best levels on its suite carry over."""
    return Champion(
        checkpoint_uri=candidate.checkpoint_uri,
        checkpoint_sha256=candidate.checkpoint_sha256,
        run_id=candidate.run_id,
        step=candidate.step,
        exact_match=candidate.exact_match,
        val_loss=candidate.val_loss,
        suite_version=candidate.suite_version,
        deployed_at=now,
        event_id=event_id,
        reason=reason,
        previous_checkpoint_uri=previous.checkpoint_uri if previous else "",
        eval_id=candidate.id,
        num_examples=candidate.num_examples,
        outcomes=candidate.outcomes,
        levels=candidate.levels,
        rolled_back_runs=previous.rolled_back_runs if previous else [],
        best_levels=_best_of(best_levels(previous, candidate.suite_version) if previous else {}, candidate.levels),
        best_suite_version=candidate.suite_version,
    )


def rescored(champion: Champion, score: EvalScored) -> Champion:
    """The champion record holding the champion's score on another suite; what is served is unchanged,
    and so is the count of candidates tested against it. The best levels start afresh on the new
    suite (unless a rollback brought them from it)."""
    return msgspec.structs.replace(
        champion, exact_match=score.exact_match, val_loss=score.val_loss, suite_version=score.suite_version,
        eval_id=score.id, num_examples=score.num_examples, outcomes=score.outcomes, levels=score.levels,
        best_levels=_best_of(best_levels(champion, score.suite_version), score.levels),
        best_suite_version=score.suite_version,
    )


def rolled_back(target: Champion, current: Champion, *, reason: str, event_id: str, now: datetime) -> Champion:
    """The champion record that restores `target` (an earlier champion's record) over `current`:
    its checkpoint and score, no candidate tested against it yet, the best levels so far kept, and
    `current`'s run never promoted again."""
    return msgspec.structs.replace(
        target, deployed_at=now, event_id=event_id, reason=reason, previous_checkpoint_uri=current.checkpoint_uri,
        kind="rollback", rolled_back_runs=with_rolled_back(current.rolled_back_runs, current.run_id),
        best_levels=best_levels(current, current.suite_version),
        best_suite_version=current.suite_version,
    )


def with_rolled_back(runs: list[str], run_id: str) -> list[str]:
    """`runs` with `run_id` added (once, newest last), at most ROLLED_BACK_KEPT."""
    return [*(r for r in runs if r != run_id), run_id][-ROLLED_BACK_KEPT:]


def rollback_target(history: list[Champion]) -> Champion | None:
    """The champion to return to, given the record history oldest first; None if there is none."""
    stack: list[Champion] = []
    for record in history:
        if record.kind == "rollback":
            while stack and stack[-1].checkpoint_sha256 != record.checkpoint_sha256:
                stack.pop()
            if not stack:  # restored a champion older than the kept history
                stack.append(record)
        elif not stack or stack[-1].checkpoint_sha256 != record.checkpoint_sha256:
            # A rescore rewrites the current champion's record: still one promotion.
            stack.append(record)
    return stack[-2] if len(stack) >= 2 else None
