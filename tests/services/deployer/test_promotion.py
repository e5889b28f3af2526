"""The promotion policy and the rollback target: every branch, no bus."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from libs.common.events import EvalScored
from libs.common.records import Champion
from services.deployer.promotion import decide, rollback_target

SUITE = "binary-v1-aaaaaaaaaaaa"


def scored(sha: str = "b", exact_match: float = 0.5, val_loss: float = 1.0, suite_version: str = SUITE) -> EvalScored:
    return EvalScored(
        run_id="r", step=1, checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64, suite="binary",
        suite_version=suite_version, exact_match=exact_match, val_loss=val_loss, num_examples=10,
    )


def champion(sha: str = "a", exact_match: float = 0.5, val_loss: float = 1.0, kind: str = "promotion",
             suite_version: str = SUITE) -> Champion:
    return Champion(
        checkpoint_uri=f"file:///ckpt/{sha}", checkpoint_sha256=sha * 64, run_id="r", step=1, exact_match=exact_match,
        val_loss=val_loss, suite_version=suite_version, deployed_at=datetime(2025, 1, 1, tzinfo=UTC),
        event_id=f"e-{sha}", kind=kind,
    )


def test_first_candidate_is_promoted():
    decision = decide(scored(), None)
    assert decision.promote and "first champion" in decision.reason


def test_champion_from_another_suite_counts_as_absent():
    decision = decide(scored(exact_match=0.1), champion(exact_match=0.9, suite_version="binary-v1-old"))
    assert decision.promote and "not comparable" in decision.reason


def test_the_champion_itself_is_not_promoted_again():
    decision = decide(scored(sha="a", exact_match=0.9), champion(sha="a"))
    assert not decision.promote and decision.already_champion


@pytest.mark.parametrize(("exact_match", "val_loss", "min_gain", "min_loss_gain", "promote", "words"), [
    (0.6, 2.0, 0.0, 0.0, True, "better exact match"),
    (0.55, 0.5, 0.1, 0.0, False, "not better by more than 0.1"),
    (0.7, 2.0, 0.1, 0.0, True, "better exact match"),
    (0.5, 0.9, 0.0, 0.0, True, "lower val_loss"),
    (0.5 + 1e-12, 0.9, 0.0, 0.0, True, "lower val_loss"),  # a float tie is a tie
    (0.5, 1.0, 0.0, 0.0, False, "val_loss not lower"),  # strictly lower is required
    (0.5, 0.95, 0.0, 0.1, False, "val_loss not lower"),
    (0.5, 0.85, 0.0, 0.1, True, "lower val_loss"),
    (0.4, 0.1, 0.0, 0.0, False, "exact match not better"),
])
def test_policy(exact_match, val_loss, min_gain, min_loss_gain, promote, words):
    decision = decide(scored(exact_match=exact_match, val_loss=val_loss), champion(),
                      min_gain=min_gain, min_loss_gain=min_loss_gain)
    assert decision.promote is promote and not decision.already_champion
    assert words in decision.reason


def test_announcement_is_the_same_every_time():
    record = champion()
    assert record.announcement() == record.announcement()
    assert record.announcement().id == "e-a" and record.announcement().time == record.deployed_at


def test_rollback_target_walks_the_history_as_a_stack():
    a, b, c = champion("a"), champion("b"), champion("c")
    assert rollback_target([]) is None
    assert rollback_target([a]) is None
    assert rollback_target([a, b]) == a
    assert rollback_target([a, b, c]) == b
    back_to_b = champion("b", kind="rollback")
    assert rollback_target([a, b, c, back_to_b]) == a  # twice back, not back and forth
    assert rollback_target([a, b, champion("a", kind="rollback")]) is None
    # History truncated by the bucket: the restored champion is older than what is kept.
    assert rollback_target([b, c, champion("z", kind="rollback"), a]).checkpoint_sha256 == "z" * 64


def test_champion_record_round_trips_and_ignores_nothing_it_needs():
    record = champion()
    assert msgspec.json.decode(msgspec.json.encode(record), type=Champion) == record
