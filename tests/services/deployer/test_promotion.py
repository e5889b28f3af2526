"""The promotion rule, the manual deploy and the rollback target: every rule, failing and passing, no bus."""

from __future__ import annotations

import math

import msgspec
import pytest

from libs.common.events import Confirmation, encode_outcomes
from libs.common.records import ROLLED_BACK_KEPT, CandidatesTested, Champion
from services.deployer.promotion import (
    TESTED_KEPT,
    alpha_spent,
    before_the_confirmation,
    before_the_test,
    best_levels,
    claim_number,
    crowned,
    decide,
    decide_manual,
    paired_test,
    rescored,
    rollback_target,
    rolled_back,
    with_rolled_back,
)
from tests.services.deployer.candidates import NOW, SUITE, base, champion, confirmed, flipped, levels_of
from tests.services.deployer.candidates import scored as _scored

# 40 items: the first 20 at binary/1, the last 20 at binary/2; the base gets every other one right.
N = 40
BASE = base(N)
WRONG = [i for i in range(N) if not BASE[i]]  # 1, 3, 5, ...: items the base gets wrong
RIGHT = [i for i in range(N) if BASE[i]]


def scored(sha: str = "b", correct: list[bool] = BASE, **kwargs):
    return _scored(sha, correct, **({"run_id": "r2"} | kwargs))


# ---------------------------------------------------------------------------- the paired test


@pytest.mark.parametrize(("better", "worse", "p"), [
    (0, 0, 1.0),  # no discordant item: no evidence at all
    (5, 0, 1 / 32),
    (4, 0, 1 / 16),
    (6, 1, 8 / 128),  # P(X >= 6 | n=7) = (7 + 1) / 2^7
    (8, 1, 10 / 512),
    (1, 5, 63 / 64),
])
def test_paired_test_is_the_exact_one_sided_sign_test(better, worse, p):
    candidate = [True] * better + [False] * worse + [True, False]  # two concordant items count for nothing
    champion_ = [False] * better + [True] * worse + [True, False]
    test = paired_test(candidate, champion_)
    assert (test.better, test.worse, test.items) == (better, worse, better + worse + 2)
    assert test.p_value == pytest.approx(p, rel=1e-12)


def test_paired_test_needs_the_same_items():
    with pytest.raises(ValueError, match="not the same items"):
        paired_test([True], [True, False])


def test_better_beyond_the_noise_is_promoted_and_the_reason_has_the_numbers():
    decision = decide(scored(correct=flipped(BASE, gain=WRONG[:7])), champion())
    assert decision.promote and decision.candidate_number == 1
    assert decision.reason.startswith(
        "past the screen on the selection suite (on the same 40 items the candidate is right where the champion is "
        "wrong on 7 and wrong where it is right on 0: exact one-sided sign test p = 0.0078 <= 0.01); confirmation 1 "
        "against this champion: tested at alpha_1 = 0.025 (alpha 0.05 spent over confirmations as alpha/(j(j+1))); "
        "confirmed on the confirmation suite at binary/1: on the same 20 items the candidate is right where the "
        "champion is wrong on 7 and wrong where it is right on 0")
    assert "p = 0.0078 <= alpha_1 0.025" in decision.reason


@pytest.mark.parametrize(("gain", "lose"), [
    (6, 0),  # p = 0.0156: above the screen's 0.01
    (5, 0),  # p = 0.0312
    (6, 1),  # p = 0.0625: a higher accuracy, but not beyond the noise
    (0, 0),  # the same answers
    (2, 5),  # worse
])
def test_a_gain_within_the_noise_keeps_the_champion_and_spends_nothing(gain, lose):
    # All on binary/1 (items 0-19): the confirmation (mirroring the selection items) is there too.
    candidate = flipped(BASE, gain=WRONG[:gain], lose=RIGHT[:lose])
    decision = decide(scored(correct=candidate), champion())
    assert decision.outcome == "kept" and "not past the screen" in decision.reason
    assert decision.candidate_number == 0
    assert f"right where the champion is wrong on {gain} and wrong where it is right on {lose}" in decision.reason


def test_alpha_is_the_tests_level():
    # Past the screen (p = 0.0078), confirmed on 5 of 5 discordant items: p = 0.0312.
    candidate = scored(correct=flipped(BASE, gain=WRONG[:7]), confirmation=confirmed(flipped(BASE, gain=WRONG[:5]), BASE))
    kept = decide(candidate, champion())
    assert kept.outcome == "kept" and "not confirmed" in kept.reason and "p = 0.0312 > alpha_1 0.025" in kept.reason
    assert decide(candidate, champion(), alpha=0.125).promote  # alpha_1 = 0.0625


def test_the_screen_and_the_confirmation_are_separate_tests():
    seven = flipped(BASE, gain=WRONG[:7])  # p = 0.0078 on the selection suite
    held = champion()
    # The confirmation suite says otherwise: only 3 of its discordant items go the candidate's way.
    against = scored(correct=seven, confirmation=Confirmation(
        suite_version="confirm-v1", champion_sha256="a" * 64, levels=["binary/1"], num_examples=4,
        outcomes=encode_outcomes([True, True, True, False]), champion_outcomes=encode_outcomes([False, False, False, True])))
    decision = decide(against, held)
    assert decision.outcome == "kept" and decision.candidate_number == 1 and "not confirmed" in decision.reason
    assert "on the same 4 items the candidate is right where the champion is wrong on 3 and wrong where it is " \
           "right on 1: exact one-sided sign test p = 0.3125 > alpha_1" in decision.reason
    # A screen missed spends nothing, whatever a confirmation would have said.
    missed = scored(correct=flipped(BASE, gain=WRONG[:6]), confirmation=confirmed(seven, BASE))
    assert decide(missed, held).candidate_number == 0
    assert before_the_confirmation(missed, held) is not None
    # No confirmation against this champion (the evaluator saw another, or none): nothing spent.
    for other in (scored(correct=seven, against="z"), scored(correct=seven, against=None)):
        kept = decide(other, held)
        assert kept.outcome == "kept" and kept.candidate_number == 0 and "no confirmation spent" in kept.reason


# ---------------------------------------------------------------------------- alpha spent over confirmations


def test_alpha_is_spent_over_the_confirmations_and_sums_to_at_most_alpha():
    assert [alpha_spent(j, 0.05) for j in (1, 2, 3)] == pytest.approx([0.025, 0.05 / 6, 0.05 / 12])
    assert math.fsum(alpha_spent(j, 0.05) for j in range(1, 100_001)) <= 0.05
    # Chosen over 6 alpha / (pi^2 j^2) (also summing to alpha): larger for every confirmation but the first.
    assert all(alpha_spent(j, 0.05) > 6 / math.pi**2 * 0.05 / j**2 for j in range(2, 1000))
    with pytest.raises(ValueError):
        alpha_spent(0, 0.05)


def count(held: Champion, *candidates, tested: CandidatesTested | None = None) -> tuple[CandidatesTested, list[int]]:
    """Claim each candidate's number against `held`, as the deployer does before deciding."""
    numbers = []
    for candidate in candidates:
        tested, k = claim_number(tested, held, candidate)
        numbers.append(k)
    return tested, numbers


def test_the_jth_confirmation_against_a_champion_is_tested_at_alpha_j():
    held = champion()
    tested, _ = count(held, scored("c"), scored("d"))  # two confirmations spent already, nothing confirmed
    seven, nine = scored(correct=flipped(BASE, gain=WRONG[:7])), scored(correct=flipped(BASE, gain=WRONG[:9]))
    _, [j] = count(held, seven, tested=tested)
    kept = decide(seven, held, candidate_number=j)  # p = 0.0078: enough for the first two confirmations, not the third
    assert kept.outcome == "kept" and kept.candidate_number == 3
    assert "confirmation 3 against this champion: tested at alpha_3 = 0.0042 (alpha 0.05" in kept.reason
    assert "p = 0.0078 > alpha_3 0.0042" in kept.reason
    assert decide(seven, champion(), candidate_number=2).promote
    promoted = decide(nine, held, candidate_number=3)  # p = 0.0020
    assert promoted.promote and "p = 0.0020 <= alpha_3 0.0042" in promoted.reason


def test_a_candidate_decided_again_keeps_its_number():
    held = champion()
    first, second = scored("c"), scored("d")
    tested, numbers = count(held, first, second)
    assert numbers == [1, 2] and tested.count == 2 and tested.champion_event_id == held.event_id
    # A redelivery (or a second deployer) is the same test at the same level, and counts nothing.
    assert claim_number(tested, held, first) == (tested, 1) and claim_number(tested, held, second) == (tested, 2)
    # The same checkpoint on another suite version is another test.
    assert claim_number(tested, held, scored("c", suite_version="binary-v1-new"))[1] == 3


def test_the_count_outlives_the_keys_kept():
    held = champion()
    tested, _ = count(held, *(scored(f"{i:x}") for i in range(TESTED_KEPT + 5)))
    assert tested.count == TESTED_KEPT + 5 and len(tested.keys) == TESTED_KEPT
    assert claim_number(tested, held, scored(f"{TESTED_KEPT + 4:x}"))[1] == TESTED_KEPT + 5
    assert claim_number(tested, held, scored("0"))[1] == TESTED_KEPT + 6  # forgotten: counted again, at a smaller alpha


def test_what_is_not_tested_spends_nothing():
    held = champion()
    assert before_the_test(scored("a", flipped(BASE, gain=WRONG)), held) is not None  # the champion itself
    assert before_the_test(scored(val_loss=None), held) is not None
    assert before_the_test(scored(run_id="bad"), champion(rolled_back_runs=("bad",))) is not None
    assert before_the_test(scored(suite_version="binary-v1-new"), held) is not None  # not comparable
    assert before_the_test(scored(), None) is not None  # the first champion
    assert before_the_test(scored(), held) is None
    assert decide(scored(val_loss=None), held, candidate_number=4).candidate_number == 0
    decision, _ = decide_manual([scored(correct=flipped(BASE, lose=RIGHT[:3]))], SUITE, held, "b" * 64)
    assert decision.promote and decision.candidate_number == 0  # a manual deploy is the operator's call


def test_the_count_belongs_to_the_champion():
    held = champion()
    tested, _ = count(held, scored("c"), scored("d"))
    # A rescore keeps the champion record's event id, so its count goes on.
    rescore = rescored(msgspec.structs.replace(held, suite_version="binary-v1-old"), scored("a"))
    assert claim_number(tested, rescore, scored("e"))[1] == 3
    # A new champion record (a promotion, a rollback) starts afresh.
    fresh = crowned(scored(correct=flipped(BASE, gain=WRONG[:6])), held, reason="why", event_id="e", now=NOW)
    assert claim_number(tested, fresh, scored("c")) == (CandidatesTested(champion_event_id="e", count=1,
                                                                         keys=[f"{'c' * 64}@{SUITE}"]), 1)
    restored = rolled_back(champion("z"), held, reason="back", event_id="r", now=NOW)
    assert claim_number(tested, restored, scored("c"))[1] == 1


# ---------------------------------------------------------------------------- regressions


def test_a_level_that_drops_blocks_a_promotion_even_when_the_whole_is_better():
    # 80 items: binary/2 gains 16 of its 20 wrong items; binary/1 loses 3 of its 20 right ones (-7.5 points).
    wide = base(80)
    candidate = flipped(wide, gain=[i for i in range(40, 80) if not wide[i]][:16], lose=[0, 2, 4])
    decision = decide(scored(correct=candidate), champion(correct=wide))
    assert decision.outcome == "kept"
    assert "binary/1 accuracy 0.425 vs 0.500: down 7.5 points (more than 5)" in decision.reason
    assert "not past the screen" not in decision.reason and "no confirmation spent" in decision.reason  # p = 0.0022
    assert decide(scored(correct=candidate), champion(correct=wide), max_level_drop=0.1).promote  # within that limit


LEVEL_1_WRONG = [i for i in WRONG if i < N // 2]
LEVEL_2_WRONG = [i for i in WRONG if i >= N // 2]


def best_at(correct: list[bool], suite_version: str = SUITE) -> Champion:
    """The base champion, where the best champion so far scored `correct`."""
    return msgspec.structs.replace(champion(), best_levels=levels_of(correct), best_suite_version=suite_version)


def test_no_level_may_fall_below_the_best_champion_so_far_by_more_than_the_margin():
    # A champion at 0.5 on binary/1 (rolled back to, say) where an earlier one had 0.8.
    held = best_at(flipped(BASE, gain=LEVEL_1_WRONG[:6]))
    down_10 = scored(correct=flipped(BASE, gain=LEVEL_1_WRONG[:4] + LEVEL_2_WRONG[:6]))  # p = 0.001
    decision = decide(down_10, held)
    assert decision.outcome == "kept" and "not past the screen" not in decision.reason
    assert (f"below the best champion so far on suite {SUITE}: binary/1 accuracy 0.700 vs 0.800: down 10.0 points "
            "(more than 5)") in decision.reason
    assert "regressions:" not in decision.reason  # up 20 points on the champion itself
    down_5 = scored(correct=flipped(BASE, gain=LEVEL_1_WRONG[:5] + LEVEL_2_WRONG[:6]))
    promoted = decide(down_5, held)
    assert promoted.promote and "no level down more than 5 points against the champion or the best" in promoted.reason
    assert decide(down_10, held, max_level_drop=0.1).promote
    # A best on another suite says nothing about this one.
    assert decide(down_10, best_at(flipped(BASE, gain=LEVEL_1_WRONG[:6]), suite_version="binary-v1-old")).promote


def test_the_best_levels_are_kept_by_promotions_and_rollbacks_and_restart_with_the_suite():
    held = best_at(flipped(BASE, gain=LEVEL_1_WRONG[:6]))  # best binary/1 0.8, binary/2 0.5
    assert {k: v.accuracy for k, v in best_levels(held, SUITE).items()} == {"binary/1": 0.8, "binary/2": 0.5}
    new = crowned(scored(correct=flipped(BASE, gain=LEVEL_1_WRONG[:3] + LEVEL_2_WRONG[:8])), held, reason="why",
                  event_id="e", now=NOW)
    assert new.best_suite_version == SUITE
    assert {k: v.accuracy for k, v in new.best_levels.items()} == {"binary/1": 0.8, "binary/2": 0.9}
    # A rollback keeps the best so far, whichever champion it restores.
    back = rolled_back(champion("z"), new, reason="back", event_id="r", now=NOW)
    assert back.best_levels == new.best_levels and back.best_suite_version == SUITE
    # A new suite starts afresh from the champion's score there...
    moved = rescored(back, scored("z", BASE, suite_version="binary-v1-new"))
    assert moved.best_suite_version == "binary-v1-new" and moved.best_levels == levels_of(BASE)
    # ...unless a rollback brought the best from that very suite (the champion rescored on it).
    old = rolled_back(champion("y", suite_version="binary-v1-old"), new, reason="back", event_id="r2", now=NOW)
    assert rescored(old, scored("y", BASE)).best_levels == new.best_levels


def test_manual_deploy_says_when_a_level_is_below_the_best_champion_so_far():
    decision, _ = decide_manual([scored()], SUITE, best_at(flipped(BASE, gain=LEVEL_1_WRONG[:6])), "b" * 64)
    assert decision.promote
    assert f"below the best champion so far on suite {SUITE}: binary/1 accuracy 0.500 vs 0.800" in decision.reason


@pytest.mark.parametrize(("val_loss", "max_loss_rise", "promote"), [
    (1.2, 0.15, False),  # up 20%
    (1.1, 0.15, True),  # up 10%
    (1.15, 0.15, True),  # exactly the limit is not past it
    (1.2, 0.25, True),
    (0.5, 0.15, True),
])
def test_val_loss_may_not_rise_past_its_limit(val_loss, max_loss_rise, promote):
    decision = decide(scored(correct=flipped(BASE, gain=WRONG[:7]), val_loss=val_loss), champion(val_loss=1.0),
                      max_loss_rise=max_loss_rise)
    assert decision.promote is promote
    if not promote:
        assert "val loss 1.2000 vs 1.0000: up 20.0% (more than 15%)" in decision.reason


def test_by_default_a_val_loss_rise_is_stated_but_does_not_block_a_real_gain():
    decision = decide(scored(correct=flipped(BASE, gain=WRONG[:7]), val_loss=1.6), champion(val_loss=1.0))
    assert decision.promote
    assert "flagged, not blocking: val loss 1.6000 vs 1.0000: up 60.0% (more than 15%)" in decision.reason
    quiet = decide(scored(correct=flipped(BASE, gain=WRONG[:7]), val_loss=1.05), champion(val_loss=1.0))
    assert quiet.promote and "flagged" not in quiet.reason


# ---------------------------------------------------------------------------- what is never promoted


def test_first_candidate_is_promoted():
    decision = decide(scored(), None)
    assert decision.promote and "first champion" in decision.reason


def test_a_non_finite_val_loss_is_refused_even_as_the_first_champion():
    decision = decide(scored(val_loss=None), None)
    assert decision.outcome == "refused" and "val loss is not finite" in decision.reason
    assert decide(scored(correct=flipped(BASE, gain=WRONG), val_loss=None), champion()).outcome == "refused"


@pytest.mark.parametrize("outcomes", ["", "zz", "00"])
def test_a_score_without_usable_per_item_outcomes_is_refused(outcomes):
    decision = decide(scored(outcomes=outcomes), None)
    assert decision.outcome == "refused" and "per-item outcomes" in decision.reason


def test_a_rolled_back_run_is_never_promoted_again():
    better = flipped(BASE, gain=WRONG[:10])
    decision = decide(scored(correct=better, run_id="bad"), champion(rolled_back_runs=("bad",)))
    assert decision.outcome == "refused" and "run bad was rolled back" in decision.reason
    assert decide(scored(correct=better, run_id="good"), champion(rolled_back_runs=("bad",))).promote


# ---------------------------------------------------------------------------- suites


def test_a_new_suite_does_not_promote_blindly():
    decision = decide(scored(correct=[False] * N, suite_version="binary-v1-new"), champion())
    assert decision.outcome == "kept"
    assert decision.reason.startswith(f"champion not yet scored on suite binary-v1-new (its score is on suite {SUITE})")


def test_the_champions_score_on_a_new_suite_is_recorded_then_candidates_compare_with_it():
    old = champion(suite_version="binary-v1-old")
    rescore = scored(sha="a", correct=BASE, suite_version=SUITE)
    decision = decide(rescore, old)
    assert decision.outcome == "rescored" and "scored on suite " + SUITE in decision.reason
    record = rescored(old, rescore)
    assert record.suite_version == SUITE and record.outcomes == rescore.outcomes and record.eval_id == rescore.id
    assert record.checkpoint_uri == old.checkpoint_uri and record.event_id == old.event_id  # what is served is unchanged
    assert decide(scored(correct=flipped(BASE, gain=WRONG[:7])), record).promote
    assert decide(rescore, record).outcome == "already_champion"


def test_a_rescore_with_a_non_finite_loss_is_not_recorded():
    decision = decide(scored(sha="a", val_loss=None), champion(suite_version="binary-v1-old"))
    assert decision.outcome == "refused" and "not finite" in decision.reason


def test_the_champion_itself_is_not_promoted_again():
    decision = decide(scored(sha="a", correct=flipped(BASE, gain=WRONG)), champion(sha="a"))
    assert not decision.promote and decision.outcome == "already_champion"


# ---------------------------------------------------------------------------- manual deploy


def test_manual_deploy_needs_a_score_on_the_current_suite():
    decision, score = decide_manual([], None, champion(), "x")
    assert decision.outcome == "refused" and "no checkpoint has been scored yet" in decision.reason and score is None
    decision, _ = decide_manual([], SUITE, champion(), "b" * 64)
    assert decision.outcome == "refused" and f"has not been scored on the current suite {SUITE} (never scored)" in decision.reason
    decision, _ = decide_manual([scored(suite_version="binary-v1-old")], SUITE, champion(), "b" * 64)
    assert decision.outcome == "refused" and "scored only on binary-v1-old" in decision.reason


def test_manual_deploy_is_the_operators_call_but_says_how_the_checkpoint_compares():
    worse = scored(correct=flipped(BASE, lose=RIGHT[:3]), run_id="bad")
    decision, score = decide_manual([scored(suite_version="binary-v1-old"), worse], SUITE,
                                    champion(rolled_back_runs=("bad",)), "b" * 64)
    assert decision.promote and score is worse
    assert decision.reason.startswith("manual deploy (exact_match 0.425")
    assert "wrong where it is right on 3" in decision.reason and "run bad was rolled back earlier" in decision.reason


def test_manual_deploy_refuses_a_non_finite_loss_and_knows_the_champion():
    decision, _ = decide_manual([scored(val_loss=None)], SUITE, None, "b" * 64)
    assert decision.outcome == "refused" and "not finite" in decision.reason
    decision, _ = decide_manual([scored(sha="a")], SUITE, champion(sha="a"), "a" * 64)
    assert decision.outcome == "already_champion"
    decision, _ = decide_manual([scored()], SUITE, None, "b" * 64)
    assert decision.promote


# ---------------------------------------------------------------------------- records


def test_a_new_champion_carries_the_rolled_back_runs_and_its_own_score():
    candidate = scored()
    record = crowned(candidate, champion(rolled_back_runs=("bad",)), reason="why", event_id="e", now=NOW)
    assert record.rolled_back_runs == ["bad"] and record.outcomes == candidate.outcomes
    assert record.levels == candidate.levels and record.eval_id == candidate.id and record.num_examples == N
    assert record.previous_checkpoint_uri == "file:///ckpt/a"
    assert with_rolled_back(["a", "b"], "a") == ["b", "a"]
    assert len(with_rolled_back([str(i) for i in range(ROLLED_BACK_KEPT)], "new")) == ROLLED_BACK_KEPT


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
    # A rescore rewrites the champion's record: still one promotion.
    assert rollback_target([a, b, champion("b", suite_version="binary-v1-new")]) == a


def test_champion_record_round_trips_and_reads_records_written_before_scores_were_kept():
    record = champion()
    assert msgspec.json.decode(msgspec.json.encode(record), type=Champion) == record
    old = msgspec.json.encode({k: v for k, v in msgspec.to_builtins(record).items()
                               if k not in ("eval_id", "num_examples", "outcomes", "levels", "rolled_back_runs",
                                            "best_levels", "best_suite_version")})
    decoded = msgspec.json.decode(old, type=Champion)
    assert decoded.outcomes == "" and decoded.rolled_back_runs == []
    # A record from before the best levels were kept: its own score is the best so far.
    before_best = msgspec.json.decode(msgspec.json.encode({k: v for k, v in msgspec.to_builtins(record).items()
                                                           if k not in ("best_levels", "best_suite_version")}),
                                      type=Champion)
    assert best_levels(before_best, SUITE) == record.levels
    # Its score has no per-item outcomes: a candidate waits for the champion's rescore.
    assert decide(scored(correct=flipped(BASE, gain=WRONG)), decoded).outcome == "kept"
