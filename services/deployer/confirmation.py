"""When a staged deployment becomes final: the rules between `model.staged` and `model.deployed`.

Deciding to serve a checkpoint (a promotion, `flywheel deploy`, a rollback) does not change the
champion. The deployer stages a `Deployment` (libs.common.records.DEPLOYMENT, one record: the
newest deployment) and announces `model.staged`; inference replicas load the checkpoint and
report `model.serving`. Given the deployment record and a report, in order:

1. a report for another deployment than the newest, or for one already served or failed: stale,
   ignored (a late replica, a redelivery, a deployment replaced meanwhile);
2. not ok: failed, with the replica's reason;
3. ok, but the replica serves another sha256 than the staged one: stale, ignored (it proves nothing);
4. the champion is no longer the one the deployment was decided against: failed (the candidate
   was never weighed against what is served now);
5. otherwise served: the candidate becomes the champion, then `model.deployed` is announced.

No report by the deadline (`confirm_timeout_s` after staging): failed. A new deployment replaces
a staged one, which fails ("replaced by ..."), unless it stages the same checkpoint the same way
(a redelivered score, `flywheel deploy` twice): then the staged one stands. An outcome is final:
a failed deployment is never revived and a served one never undone (a rollback is a deployment
of its own). These functions take the records and return the next record; the deployer
(services/deployer/service.py) writes it with compare-and-set, so one outcome wins.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from libs.common.events import DeploymentKind, ModelServing
from libs.common.records import Champion, DeployDecision, Deployment


class NotSettled(Exception):
    """The newest deployment was served but what follows (the champion record) is not done yet:
    finish it before staging another, or the next one would be weighed against a stale champion."""


def staged(*, id: str, kind: DeploymentKind, candidate: Champion, champion: Champion | None,
           decision: DeployDecision, now: datetime, timeout_s: float) -> Deployment:
    """A new deployment of `candidate`, decided against `champion` (None: there is none)."""
    return Deployment(
        id=id, kind=kind, staged_at=now, deadline=now + timedelta(seconds=timeout_s), candidate=candidate,
        replaces_sha256=champion.checkpoint_sha256 if champion else "", decision=decision,
    )


def failed(deployment: Deployment, reason: str, now: datetime) -> Deployment:
    return msgspec.structs.replace(deployment, state="failed", reason=reason, resolved_at=now)


def served(deployment: Deployment, replica: str, now: datetime) -> Deployment:
    return msgspec.structs.replace(deployment, state="served", served_by=replica, resolved_at=now)


def replace_staged(current: Deployment | None, new: Deployment, now: datetime) -> Deployment | None:
    """The record that stages `new` over `current`; None: `current` stands (the same deployment,
    or the same checkpoint staged the same way). Raises NotSettled when `current` was served and
    its champion record may not be written yet."""
    if current is None:
        return new
    same_checkpoint = current.checkpoint_sha256 == new.checkpoint_sha256 and current.kind == new.kind
    if current.id == new.id or (current.state == "staged" and same_checkpoint):
        return None
    if current.state == "served" and not current.settled:
        raise NotSettled(f"deployment {current.id} is served but not settled")
    unannounced = list(current.replaced)
    if current.state == "staged":
        unannounced.append(failed(current, f"replaced by deployment {new.id} ({new.kind} of "
                                           f"{new.candidate.checkpoint_uri}) before any replica served it", now))
    elif current.state == "failed" and not current.settled:
        unannounced.append(current)
    return msgspec.structs.replace(new, replaced=[msgspec.structs.replace(d, replaced=[]) for d in unannounced])


def champion_conflict(deployment: Deployment, champion: Champion | None) -> str:
    """Why `deployment` may not make its candidate the champion now ("": it may, or already did)."""
    if champion is not None and champion.event_id == deployment.candidate.event_id:
        return ""
    held = champion.checkpoint_sha256 if champion else ""
    if held == deployment.replaces_sha256:
        return ""
    return (f"the champion changed while it was staged: {champion.checkpoint_uri if champion else 'none'} "
            f"is served, it was decided against {deployment.replaces_sha256 or 'no champion'}")


def settle_report(deployment: Deployment | None, report: ModelServing, champion: Champion | None,
                  now: datetime) -> Deployment | str:
    """The deployment as `report` leaves it (rules 1-5), or why the report changes nothing."""
    if deployment is None or deployment.id != report.deployment_id:
        newest = deployment.id if deployment else "none"
        return f"report on deployment {report.deployment_id}, which is not the newest ({newest})"
    if deployment.state != "staged":
        return f"deployment {deployment.id} is already {deployment.state}"
    if not report.ok:
        return failed(deployment, f"replica {report.replica} could not serve it: {report.reason}", now)
    if report.checkpoint_sha256 != deployment.checkpoint_sha256:
        return (f"replica {report.replica} serves {report.checkpoint_sha256 or 'nothing'}, not the staged "
                f"{deployment.checkpoint_sha256}")
    if conflict := champion_conflict(deployment, champion):
        return failed(deployment, conflict, now)
    return served(deployment, report.replica, now)


def expire(deployment: Deployment | None, now: datetime) -> Deployment | None:
    """The deployment failed for want of a report when its deadline has passed; None: nothing to do."""
    if deployment is None or deployment.state != "staged" or now < deployment.deadline:
        return None
    waited = (deployment.deadline - deployment.staged_at).total_seconds()
    return failed(deployment, f"no inference replica reported serving it within {waited:g} s", now)


def final_decision(deployment: Deployment) -> DeployDecision:
    """The decision to record once `deployment` is served or failed."""
    decision = deployment.decision
    time = deployment.resolved_at or decision.time
    if deployment.state == "failed":
        return msgspec.structs.replace(decision, time=time, outcome="deploy_failed",
                                       reason=f"{deployment.reason}; staged because: {decision.reason}")
    return msgspec.structs.replace(decision, time=time, reason=f"{decision.reason}; served by {deployment.served_by}")
