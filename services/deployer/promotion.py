"""Which checkpoint should be served: the promotion policy and the rollback target.

Promotion, for a scored candidate against the current champion:
- no champion yet: promote;
- champion scored on a different suite version: the scores are not comparable, so the
  champion counts as absent and the candidate is promoted (a new suite starts a new race);
- the candidate is the champion already: nothing to decide (the caller re-announces it);
- exact_match equal (within 1e-9) and val_loss < champion's - min_loss_gain: promote;
- exact_match > champion's + min_gain: promote;
- anything else: keep the champion.

Rollback walks the champion history as a stack: a promotion pushes, a rollback pops back
to the checkpoint it restored. The target is the entry under the current one, so rolling
back twice goes two promotions back, not back and forth.
"""

from __future__ import annotations

import msgspec

from libs.common.events import EvalScored
from libs.common.records import Champion

TIE = 1e-9


class NothingToRollBack(Exception):
    """There is no earlier champion to return to."""


class Decision(msgspec.Struct, frozen=True):
    promote: bool
    reason: str
    # The candidate is the champion: nothing changes, but its announcement may be repeated.
    already_champion: bool = False


def decide(
    candidate: EvalScored, champion: Champion | None, *, min_gain: float = 0.0, min_loss_gain: float = 0.0,
) -> Decision:
    """Whether `candidate` should replace `champion`, and why, in words."""
    score = f"exact_match {candidate.exact_match:.4f}, val_loss {candidate.val_loss:.4f}"
    if champion is None:
        return Decision(True, f"first champion ({score})")
    if champion.suite_version != candidate.suite_version:
        return Decision(True, (
            f"champion was scored on suite {champion.suite_version}, candidate on {candidate.suite_version}: "
            f"not comparable, so the candidate starts the new suite's race ({score})"
        ))
    if champion.checkpoint_sha256 == candidate.checkpoint_sha256:
        return Decision(False, "candidate is already the champion", already_champion=True)
    held = f"champion exact_match {champion.exact_match:.4f}, val_loss {champion.val_loss:.4f}"
    # Float noise in a fraction of items is a tie, never a win.
    if abs(candidate.exact_match - champion.exact_match) <= TIE:
        if candidate.val_loss < champion.val_loss - min_loss_gain:
            return Decision(True, f"same exact match, lower val_loss: {score} vs {held} (min gain {min_loss_gain})")
        return Decision(False, f"same exact match, val_loss not lower by more than {min_loss_gain}: {score} vs {held}")
    if candidate.exact_match > champion.exact_match + min_gain:
        return Decision(True, f"better exact match: {score} vs {held} (min gain {min_gain})")
    return Decision(False, f"exact match not better by more than {min_gain}: {score} vs {held}")


def rollback_target(history: list[Champion]) -> Champion | None:
    """The champion to return to, given the record history oldest first; None if there is none."""
    stack: list[Champion] = []
    for record in history:
        if record.kind == "rollback":
            while stack and stack[-1].checkpoint_sha256 != record.checkpoint_sha256:
                stack.pop()
            if not stack:  # restored a champion older than the kept history
                stack.append(record)
        else:
            stack.append(record)
    return stack[-2] if len(stack) >= 2 else None
