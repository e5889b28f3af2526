"""The confirmation rule, pure: which report makes a staged deployment final, which fails it,
which changes nothing; deadlines; a newer deployment replacing a staged one."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from libs.common.events import ModelServing
from libs.common.records import DeployDecision, Deployment
from services.deployer.confirmation import (
    NotSettled,
    champion_conflict,
    expire,
    failed,
    final_decision,
    replace_staged,
    served,
    settle_report,
    staged,
)
from tests.services.deployer.candidates import NOW, champion

A, B = champion("a"), champion("b")


def deployment(candidate=B, *, against=A, id: str = "d1", kind: str = "promotion") -> Deployment:
    decision = DeployDecision(id=f"decision-{id}", time=NOW, outcome="promoted", reason="better beyond the noise",
                              checkpoint_uri=candidate.checkpoint_uri, checkpoint_sha256=candidate.checkpoint_sha256)
    return staged(id=id, kind=kind, candidate=msgspec.structs.replace(candidate, event_id=f"deploy-{id}"),
                  champion=against, decision=decision, now=NOW, timeout_s=120)


def report(d: Deployment, *, ok: bool = True, sha256: str | None = None, reason: str = "",
           deployment_id: str | None = None) -> ModelServing:
    return ModelServing(deployment_id=deployment_id or d.id, replica="host-1", ok=ok,
                        checkpoint_sha256=d.checkpoint_sha256 if sha256 is None else sha256, reason=reason)


LATER = NOW + timedelta(seconds=5)


def test_a_report_serving_the_staged_sha256_makes_it_served():
    d = deployment()
    assert d.deadline == NOW + timedelta(seconds=120) and d.replaces_sha256 == A.checkpoint_sha256
    outcome = settle_report(d, report(d), A, LATER)
    assert isinstance(outcome, Deployment)
    assert (outcome.state, outcome.served_by, outcome.resolved_at) == ("served", "host-1", LATER)


def test_a_report_that_it_could_not_load_fails_it_with_the_replicas_reason():
    d = deployment()
    outcome = settle_report(d, report(d, ok=False, sha256=A.checkpoint_sha256, reason="sha256 does not match"), A, LATER)
    assert outcome.state == "failed"
    assert outcome.reason == "replica host-1 could not serve it: sha256 does not match"


@pytest.mark.parametrize(("current", "sent", "why"), [
    (None, {}, "which is not the newest (none)"),
    (deployment(), {"deployment_id": "older"}, "report on deployment older, which is not the newest (d1)"),
    (deployment(), {"sha256": A.checkpoint_sha256}, f"serves {A.checkpoint_sha256}, not the staged"),
    (deployment(), {"sha256": ""}, "serves nothing, not the staged"),
    (served(deployment(), "host-0", NOW), {}, "deployment d1 is already served"),
    (failed(deployment(), "timed out", NOW), {}, "deployment d1 is already failed"),
    (failed(deployment(), "timed out", NOW), {"ok": False}, "deployment d1 is already failed"),
])
def test_stale_reports_change_nothing(current, sent, why):
    outcome = settle_report(current, report(current or deployment(), **sent), A, LATER)
    assert isinstance(outcome, str) and why in outcome


def test_a_champion_that_changed_while_staged_fails_it_even_when_served():
    d = deployment()
    outcome = settle_report(d, report(d), champion("c"), LATER)
    assert outcome.state == "failed" and outcome.reason.startswith("the champion changed while it was staged")
    # A rescore rewrites the champion's record, not what is served: no conflict.
    assert champion_conflict(d, msgspec.structs.replace(A, suite_version="other")) == ""
    # Once the candidate is the champion (a finalisation repeated) there is nothing to refuse.
    assert champion_conflict(d, d.candidate) == ""
    first = deployment(against=None)
    assert champion_conflict(first, None) == "" and "decided against no champion" in champion_conflict(first, A)


def test_the_deadline_fails_only_a_staged_deployment_and_only_once_passed():
    d = deployment()
    assert expire(d, d.deadline - timedelta(seconds=1)) is None
    timed_out = expire(d, d.deadline)
    assert timed_out.state == "failed" and timed_out.reason == "no inference replica reported serving it within 120 s"
    assert expire(served(d, "host-1", LATER), d.deadline + timedelta(hours=1)) is None
    assert expire(None, LATER) is None


def test_a_newer_deployment_replaces_a_staged_one_which_fails_with_the_reason():
    old, new = deployment(id="d1"), deployment(champion("c"), id="d2")
    written = replace_staged(old, new, LATER)
    assert written.id == "d2" and written.state == "staged"
    [replaced] = written.replaced
    assert replaced.id == "d1" and replaced.state == "failed"
    assert replaced.reason.startswith("replaced by deployment d2 (promotion of file:///ckpt/c)")
    # A failure not yet announced is carried on, not lost.
    third = replace_staged(written, deployment(champion("e"), id="d3"), LATER)
    assert [d.id for d in third.replaced] == ["d1", "d2"] and all(not d.replaced for d in third.replaced)


def test_the_same_deployment_or_checkpoint_staged_again_stands():
    d = deployment(id="d1")
    assert replace_staged(None, d, LATER) == d
    assert replace_staged(d, d, LATER) is None  # a redelivered score
    assert replace_staged(d, deployment(id="d2"), LATER) is None  # the same checkpoint, the same way
    assert replace_staged(failed(d, "timed out", NOW), d, LATER) is None  # a failed deployment is never revived
    # The same checkpoint as a rollback is another deployment.
    assert replace_staged(d, deployment(id="d2", kind="rollback"), LATER).id == "d2"
    # After an outcome, the same checkpoint may be staged anew.
    done = msgspec.structs.replace(failed(d, "timed out", NOW), settled=True)
    assert replace_staged(done, deployment(id="d2"), LATER).replaced == []


def test_a_served_deployment_must_be_settled_before_another_is_staged():
    d = served(deployment(id="d1"), "host-1", NOW)
    with pytest.raises(NotSettled):
        replace_staged(d, deployment(champion("c"), id="d2"), LATER)
    assert replace_staged(msgspec.structs.replace(d, settled=True), deployment(champion("c"), id="d2"), LATER).id == "d2"
    # A failed one that is not announced yet travels with the next.
    unannounced = failed(deployment(id="d1"), "timed out", NOW)
    assert [r.id for r in replace_staged(unannounced, deployment(champion("c"), id="d2"), LATER).replaced] == ["d1"]


def test_the_recorded_decision_states_the_outcome():
    d = deployment()
    done = final_decision(served(d, "host-1", LATER))
    assert (done.outcome, done.time, done.id) == ("promoted", LATER, "decision-d1")
    assert done.reason == "better beyond the noise; served by host-1"
    gone = final_decision(failed(d, "no inference replica reported serving it within 120 s", LATER))
    assert gone.outcome == "deploy_failed" and gone.id == "decision-d1"
    assert gone.reason == ("no inference replica reported serving it within 120 s; "
                           "staged because: better beyond the noise")
