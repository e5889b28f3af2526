"""Scores to decide on, built from per-item outcomes: half the items at binary/1, half at binary/2."""

from __future__ import annotations

from datetime import UTC, datetime

from libs.common.events import Confirmation, EvalScored, LevelScore, encode_outcomes
from libs.common.paired import confirmation_levels
from libs.common.records import Champion

SUITE = "binary-v1-aaaaaaaaaaaa"
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def base(n: int = 40) -> list[bool]:
    """Every other item right (half of each level)."""
    return [i % 2 == 0 for i in range(n)]


def levels_of(correct: list[bool]) -> dict[str, LevelScore]:
    half = len(correct) // 2
    levels = {}
    for name, part in (("binary/1", correct[:half]), ("binary/2", correct[half:])):
        right = sum(part)
        levels[name] = LevelScore(correct=right, total=len(part), accuracy=right / len(part), low=0.0, high=1.0)
    return levels


def flipped(correct: list[bool], *, gain: list[int] = (), lose: list[int] = ()) -> list[bool]:
    """`correct` with the items at `gain` made right and those at `lose` made wrong."""
    out = list(correct)
    for i in gain:
        assert not out[i]
        out[i] = True
    for i in lose:
        assert out[i]
        out[i] = False
    return out


def better(correct: list[bool], gained: int) -> list[bool]:
    """`correct` with its first `gained` wrong items made right (alternating levels: no level drops)."""
    return flipped(correct, gain=[i for i, ok in enumerate(correct) if not ok][:gained])


def confirmed(correct: list[bool], champion_correct: list[bool], against: str = "a") -> Confirmation | None:
    """The confirmation the evaluator attaches when the confirmation suite's items go as the
    selection suite's did (the same outcomes, item for item) at the levels where the candidate is
    ahead of `champion_correct`; None when it is ahead nowhere."""
    levels = confirmation_levels(levels_of(correct), levels_of(champion_correct))
    if not levels:
        return None
    half = len(correct) // 2
    parts = {"binary/1": slice(0, half), "binary/2": slice(half, len(correct))}
    mine = [ok for level in levels for ok in correct[parts[level]]]
    theirs = [ok for level in levels for ok in champion_correct[parts[level]]]
    return Confirmation(suite_version="confirm-v1", champion_sha256=against * 64, levels=levels,
                        num_examples=len(mine), outcomes=encode_outcomes(mine), champion_outcomes=encode_outcomes(theirs))


def scored(sha: str = "b", correct: list[bool] | None = None, *, val_loss: float | None = 1.0,
           suite_version: str = SUITE, run_id: str = "", outcomes: str | None = None,
           against: str | None = "a", champion_correct: list[bool] | None = None,
           confirmation: Confirmation | None = None) -> EvalScored:
    """A score on the selection suite; with `against` (a champion's sha letter), the mirrored
    confirmation against that champion (`confirmed`; its selection outcomes `champion_correct`,
    the base's by default), unless `confirmation` is given."""
    correct = base() if correct is None else correct
    if confirmation is None and against is not None:
        confirmation = confirmed(correct, base(len(correct)) if champion_correct is None else champion_correct, against)
    return EvalScored(
        id=f"eval-{sha}-{suite_version}", run_id=run_id or f"run-{sha}", step=1,
        checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64,
        suite="binary", suite_version=suite_version, exact_match=sum(correct) / len(correct), val_loss=val_loss,
        num_examples=len(correct), levels=levels_of(correct),
        outcomes=encode_outcomes(correct) if outcomes is None else outcomes, confirmation=confirmation,
    )


def champion(sha: str = "a", correct: list[bool] | None = None, *, val_loss: float = 1.0, kind: str = "promotion",
             suite_version: str = SUITE, rolled_back_runs: tuple[str, ...] = ()) -> Champion:
    correct = base() if correct is None else correct
    return Champion(
        checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64, run_id="r1", step=1,
        exact_match=sum(correct) / len(correct), val_loss=val_loss, suite_version=suite_version, deployed_at=NOW,
        event_id=f"e-{sha}", kind=kind, num_examples=len(correct), outcomes=encode_outcomes(correct),
        levels=levels_of(correct), rolled_back_runs=list(rolled_back_runs),
    )
