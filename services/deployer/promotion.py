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
   (sign) test. Kept unless p <= alpha (default 0.05);
7. no regression (`libs.common.events.score_regressions`): kept when any level's accuracy is
   down by more than max_level_drop (0.05, absolute), or, when max_loss_rise is set, the val
   loss is up by more than it (relative). Unset (the default) a val loss rise of more than 15%
   is stated in the reason but does not block;
8. otherwise promoted.
Every reason states the numbers: the discordant counts, the p-value, each regression.

A manual deploy (`decide_manual`) is the operator's call instead of rules 2, 6 and 7: it
needs only a score on the current suite (the newest score's) with a finite val loss and
per-item outcomes; the reason still states how the checkpoint compares.

Rollback walks the champion history as a stack: a promotion pushes, a rollback pops back
to the checkpoint it restored. The target is the entry under the current one, so rolling
back twice goes two promotions back, not back and forth.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

import msgspec

from libs.common.events import EvalScored, decode_outcomes, score_regressions
from libs.common.records import ROLLED_BACK_KEPT, Champion

Outcome = Literal["promoted", "kept", "refused", "rescored", "already_champion"]


class NothingToRollBack(Exception):
    """There is no earlier champion to return to."""


class Decision(msgspec.Struct, frozen=True):
    outcome: Outcome
    reason: str

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


def decide(
    candidate: EvalScored, champion: Champion | None, *,
    alpha: float = 0.05, max_level_drop: float = 0.05, max_loss_rise: float | None = None,
) -> Decision:
    """Whether `candidate` should replace `champion` (rules 1-8 above), and why, in words."""
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
    theirs = _champion_outcomes(champion, candidate.suite_version, candidate.num_examples)
    if theirs is None:
        return Decision("kept", (
            f"champion not yet scored on suite {candidate.suite_version} (its score is on suite "
            f"{champion.suite_version}): not comparable; waiting for the evaluator to score it there ({score})"
        ))
    test = paired_test(candidate.item_outcomes(), theirs)
    regressions = score_regressions(
        candidate.levels, candidate.val_loss, champion.levels, champion.val_loss,
        max_level_drop=max_level_drop, max_loss_rise=math.inf if max_loss_rise is None else max_loss_rise,
    )
    # Not blocking, but said: how the val loss moved (the evaluator's flag rule).
    flags = [] if max_loss_rise is not None else score_regressions({}, candidate.val_loss, {}, champion.val_loss)
    flagged = f"; flagged, not blocking: {'; '.join(flags)}" if flags else ""
    held = describe_champion(champion)
    problems = []
    if test.p_value > alpha:
        problems.append(f"not better beyond the noise: {test.describe()} > alpha {alpha:g}")
    if regressions:
        problems.append("regressions: " + "; ".join(regressions))
    if problems:
        return Decision("kept", f"{'; '.join(problems)}{flagged} ({score} vs {held})")
    loss_rule = f", val loss not up more than {max_loss_rise:.0%}" if max_loss_rise is not None else ""
    return Decision("promoted", (
        f"better beyond the noise: {test.describe()} <= alpha {alpha:g}; no level down more than "
        f"{max_level_drop * 100:g} points{loss_rule}{flagged} ({score} vs {held})"
    ))


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
        else:
            notes.append(f"the champion has no score on suite {current_suite} to compare with")
        if current.run_id in champion.rolled_back_runs:
            notes.append(f"run {current.run_id} was rolled back earlier")
    compared = f"; {'; '.join(notes)}" if notes else ""
    return Decision("promoted", f"manual deploy ({describe_score(current)}){compared}"), current


# ---------------------------------------------------------------------------- champion records


def crowned(candidate: EvalScored, previous: Champion | None, *, reason: str, event_id: str, now: datetime) -> Champion:
    """The champion record for a promoted candidate; rolled-back runs carry over."""
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
    )


def rescored(champion: Champion, score: EvalScored) -> Champion:
    """The champion record holding the champion's score on another suite; what is served is unchanged."""
    return msgspec.structs.replace(
        champion, exact_match=score.exact_match, val_loss=score.val_loss, suite_version=score.suite_version,
        eval_id=score.id, num_examples=score.num_examples, outcomes=score.outcomes, levels=score.levels,
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
