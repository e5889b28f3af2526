"""Which checkpoint should be served: the promotion rule, a manual deploy, the rollback target.

A scored candidate replaces the champion only when it is better beyond the noise ON THE SAME
ITEMS, twice (a screen, then a confirmation on items the screen never saw), and regresses
nowhere. For an `EvalScored` and the champion record, in order:

1. the candidate is the champion: when the record holds another suite's score (or no per-item
   outcomes) it takes this one (`rescored`: the evaluator scored the champion on its suite);
   otherwise there is nothing to decide and the caller re-announces the champion;
2. the candidate's run was rolled back: refused, never promoted again;
3. its val loss is not finite, or its per-item outcomes do not hold its item count: refused;
4. no champion: promoted (the first champion);
5. the champion was scored on another suite version: kept, "champion not yet scored on suite
   X". Scores on two suites are not comparable and a new suite must not promote blindly; the
   evaluator scores the champion on its suite, and rule 1 records that;
6. the screen (libs.common.paired): the paired test on the selection suite's items. b = items the
   candidate gets right and the champion wrong, c = the other way round; if the candidate is no
   better, each of the b + c discordant items is a fair coin, so p = P(Binomial(b + c, 1/2) >= b)
   (the exact one-sided McNemar, or sign, test). Kept unless p <= SCREEN_ALPHA (0.01); nothing is
   spent;
7. no regression (`libs.common.events.score_regressions`): kept when any level's accuracy is
   down by more than max_level_drop (0.05, absolute) against the champion or against the best
   any champion had on this suite (`best_levels`), or, when max_loss_rise is set, the val loss
   is up by more than it (relative). Unset (the default) a val loss rise of more than 15% is
   stated in the reason but does not block;
8. the score carries no confirmation against this champion (`EvalScored.confirmation`: the
   evaluator saw another champion, or none): kept, nothing spent;
9. the confirmation: the same paired test on the confirmation suite's items at the levels where
   the screen saw the candidate ahead. The j-th confirmation against this champion
   (`claim_number`) is kept unless p <= alpha_j = alpha / (j (j + 1)) (`alpha_spent`; alpha
   defaults to 0.05);
10. otherwise promoted.
Every reason states the numbers: the screen's and the confirmation's counts and p-values, j and
alpha_j, each regression.

Why this way. Every candidate is compared with the same champion on the same fixed items, so
testing each at alpha would promote some candidate no better than the champion with probability
up to 1 - (1 - alpha)^k over k candidates. Spending alpha over candidates (alpha_k, summing to
alpha) fixes that but starves later candidates: in the 30-minute bench the 40th candidate
against one champion was tested at 3e-5, and no gain on 48 items reaches that. So candidates are
first screened on the selection suite (spending nothing), and only those past the screen are
tested, on items the screen never saw, at alpha_j for the j-th confirmation (a screen followed by
a confirmation on independent data, as in two-stage designs). The levels alpha_j sum to alpha
(1/(j(j+1)) = 1/j - 1/(j+1)), so by the union bound the chance that ANY candidate no better than
the champion is ever promoted over it is at most alpha, however many come, however dependent
their tests: the j-th confirmed candidate is chosen by selection-suite outcomes only, and the
confirmation items are independent of those, so its test is valid at alpha_j whichever candidate
it is. (The champion itself passed a confirmation on these items, which can only make it look
better there: a conservative bias.) The count belongs to the champion: a new one starts at
j = 1. A score decided again (a redelivery, the same checkpoint and suite version) keeps its j.

A manual deploy (`decide_manual`) is the operator's call instead of rules 2 and 6-9: it
needs only a score on the current suite (the newest score's) with a finite val loss and
per-item outcomes; the reason still states how the checkpoint compares. It tests nothing: no
confirmation number is spent.

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
from libs.common.paired import SCREEN_ALPHA, PairedTest, paired_test

__all__ = ["SCREEN_ALPHA", "PairedTest", "paired_test"]  # the comparison lives in libs.common.paired
from libs.common.records import ROLLED_BACK_KEPT, CandidatesTested, Champion

Outcome = Literal["promoted", "kept", "refused", "rescored", "already_champion"]

# Confirmed candidates' keys the count keeps (`CandidatesTested.keys`, ~90 bytes each). A score
# decided again after its key fell off is counted again: a smaller alpha_j, never a larger one.
TESTED_KEPT = 256


class NothingToRollBack(Exception):
    """There is no earlier champion to return to."""


class Decision(msgspec.Struct, frozen=True):
    outcome: Outcome
    reason: str
    # j: the number of the candidate's confirmation against this champion (rule 9); 0 when it
    # did not reach one. The caller counts it in `CANDIDATES_TESTED` (`claim_number`).
    candidate_number: int = 0

    @property
    def promote(self) -> bool:
        return self.outcome == "promoted"


# ---------------------------------------------------------------------------- alpha spending


def alpha_spent(j: int, alpha: float) -> float:
    """The level the j-th confirmation against a champion is tested at (j = 1, 2, ...).

    alpha / (j (j + 1)): these sum to alpha over all j. Chosen over 6 alpha / (pi^2 j^2), which
    sums to alpha too: that one is larger only for j = 1 (0.61 alpha against 0.5 alpha), this one
    for every j >= 2, so more power from the second confirmation on.
    """
    if j < 1:
        raise ValueError(f"confirmations are numbered from 1, not {j}")
    return alpha / (j * (j + 1))


def describe_spending(j: int, alpha: float) -> str:
    return (f"confirmation {j} against this champion: tested at alpha_{j} = {alpha_spent(j, alpha):.2g} "
            f"(alpha {alpha:g} spent over confirmations as alpha/(j(j+1)))")


def candidate_key(candidate: EvalScored) -> str:
    """What makes two scores the same candidate: its checkpoint on one suite version."""
    return f"{candidate.checkpoint_sha256}@{candidate.suite_version}"


def claim_number(tested: CandidatesTested | None, champion: Champion,
                 candidate: EvalScored) -> tuple[CandidatesTested, int]:
    """j for `candidate`'s confirmation against `champion`, and the record that counts it: its
    number if it was counted already (a redelivery, a second deployer), else the next one. Only a
    candidate that reaches the confirmation (`before_the_confirmation` is None) claims one.

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


def before_the_confirmation(
    candidate: EvalScored, champion: Champion, *, max_level_drop: float = 0.05, max_loss_rise: float | None = None,
) -> Decision | None:
    """The decision rules 6-8 make (the screen, the regression guards, a missing confirmation), or
    None when `candidate` is confirmed against `champion` (rule 9). Call after `before_the_test`."""
    score, held = describe_score(candidate), describe_champion(champion)
    theirs = _champion_outcomes(champion, candidate.suite_version, candidate.num_examples)
    assert theirs is not None, "before_the_test keeps a candidate the champion has no outcomes to compare with"
    screen = paired_test(candidate.item_outcomes(), theirs)
    regressions = score_regressions(
        candidate.levels, candidate.val_loss, champion.levels, champion.val_loss,
        max_level_drop=max_level_drop, max_loss_rise=math.inf if max_loss_rise is None else max_loss_rise,
    )
    below_best = _below_best(candidate, champion, max_level_drop)
    problems = []
    if screen.p_value > SCREEN_ALPHA:
        problems.append(f"not past the screen on the selection suite: {screen.describe()} > {SCREEN_ALPHA:g}")
    if regressions:
        problems.append("regressions: " + "; ".join(regressions))
    if below_best:
        problems.append(f"below the best champion so far on suite {candidate.suite_version}: " + "; ".join(below_best))
    if problems:
        return Decision("kept", f"{'; '.join(problems)}; no confirmation spent ({score} vs {held})")
    confirmation = candidate.confirmation
    if confirmation is None or confirmation.champion_sha256 != champion.checkpoint_sha256:
        against = f"champion {confirmation.champion_sha256[:12]}" if confirmation else "no champion"
        return Decision("kept", (
            f"past the screen ({screen.describe()} <= {SCREEN_ALPHA:g}) but confirmed against {against}, not this "
            f"one ({champion.checkpoint_sha256[:12]}): the evaluator scores a confirmation against the champion it "
            f"sees; no confirmation spent ({score} vs {held})"))
    try:
        confirmation.item_outcomes()
    except ValueError as exc:
        return Decision("refused", f"its confirmation has no usable per-item outcomes ({exc})")
    return None


def decide(
    candidate: EvalScored, champion: Champion | None, *, candidate_number: int = 1,
    alpha: float = 0.05, max_level_drop: float = 0.05, max_loss_rise: float | None = None,
) -> Decision:
    """Whether `candidate` should replace `champion` (rules 1-10 above), and why, in words;
    `candidate_number` is j, its confirmation's number against `champion` (`claim_number`), used
    only when it reaches the confirmation."""
    if (early := before_the_test(candidate, champion)) is not None:
        return early
    assert champion is not None  # before_the_test decides when there is none
    if (kept := before_the_confirmation(candidate, champion, max_level_drop=max_level_drop,
                                        max_loss_rise=max_loss_rise)) is not None:
        return kept
    assert candidate.confirmation is not None  # before_the_confirmation keeps a candidate without one
    score, held = describe_score(candidate), describe_champion(champion)
    screen = paired_test(candidate.item_outcomes(), _champion_outcomes(champion, candidate.suite_version) or [])
    confirmation = candidate.confirmation
    j = candidate_number
    level = alpha_spent(j, alpha)
    test = paired_test(*confirmation.item_outcomes())
    # Not blocking, but said: how the val loss moved (the evaluator's flag rule).
    flags = [] if max_loss_rise is not None else score_regressions({}, candidate.val_loss, {}, champion.val_loss)
    flagged = f"; flagged, not blocking: {'; '.join(flags)}" if flags else ""
    spending = describe_spending(j, alpha)
    screened_in = f"past the screen on the selection suite ({screen.describe()} <= {SCREEN_ALPHA:g})"
    on = f"on the confirmation suite at {', '.join(confirmation.levels)}"
    if test.p_value > level:
        return Decision("kept", (f"{screened_in}; {spending}; not confirmed {on}: {test.describe()} > alpha_{j} "
                                 f"{level:.2g}{flagged} ({score} vs {held})"), candidate_number=j)
    loss_rule = f", val loss not up more than {max_loss_rise:.0%}" if max_loss_rise is not None else ""
    return Decision("promoted", (
        f"{screened_in}; {spending}; confirmed {on}: {test.describe()} <= alpha_{j} {level:.2g}; no level down "
        f"more than {max_level_drop * 100:g} points against the champion or the best champion so far{loss_rule}"
        f"{flagged} ({score} vs {held})"
    ), candidate_number=j)


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
