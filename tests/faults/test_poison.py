"""A poison message for each consumer: it decodes, and handling it can never succeed.

- gatekeeper: a submission naming both inline rows and a file outside the store: rejected with
  a report (the gatekeeper's answer to any submission it cannot take);
- trainer: an accepted dataset whose artifact does not exist: refused (dead-lettered) at once;
- evaluator: a final checkpoint whose hash matches a directory in the store that holds no model:
  scoring fails every time, so it is retried with backoff and dead-lettered after max_deliver;
- deployer: a forged perfect score for a checkpoint that does not exist: the deployer promotes
  it, inference refuses to load it (no such artifact), the deployment fails and the champion
  stays;
- curriculum: a forged announcement of that checkpoint as the deployed champion: the champion
  record never named it, so nothing is counted (and inference, which follows announcements too,
  cannot load it and keeps serving the champion);
- deployer-serving: a serving report for a deployment that never was: ignored.

A valid dataset submitted behind them must be trained and scored meanwhile (no queue is held
up), and in the end every poison has its outcome and the stack is quiet.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactStore, sha256_dir
from libs.common.bus import REASON_HEADER
from libs.common.events import (
    CheckpointSaved,
    Confirmation,
    DatasetAccepted,
    DatasetSubmitted,
    EvalScored,
    ModelDeployed,
    ModelServing,
    encode_outcomes,
    new_id,
)
from libs.common.records import CHAMPION
from tests.conftest import wait_for
from tests.faults.ledger import Ledger
from tests.faults.stack import FaultStack
from tests.faults.trials import ServedWatch, Trial, TrialTable
from tests.faults.workload import quiet, submit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]


def _newest_score(ledger: Ledger) -> EvalScored | None:
    return next((m.event for m in reversed(ledger.messages["EVALS"])
                 if isinstance(m.event, EvalScored) and m.event.outcomes), None)


async def test_a_poison_message_for_each_consumer(fault_stack: FaultStack, fault_bus, trials: TrialTable):
    bus = fault_bus
    store = ArtifactStore(fault_stack.data_dir / "artifacts")
    champions = await bus.record(CHAMPION)

    async def scored_and_crowned() -> bool:  # run alone, the stack may not have scored the base model yet
        return _newest_score(await Ledger.read(bus)) is not None and (await champions.read())[0] is not None

    await wait_for(scored_and_crowned, "a score and a champion on the stack", timeout=120)
    ledger = await Ledger.read(bus)
    before = ledger.last_seqs()
    score = _newest_score(ledger)
    champion, _ = await champions.read()
    not_a_model = store.location("faults", f"not-a-model-{new_id()[:8]}")
    not_a_model.mkdir(parents=True)
    (not_a_model / "notes.txt").write_text("a directory in the store that holds no model\n")
    missing = store.location("faults", f"missing-{new_id()[:8]}")
    forged_sha = new_id() + new_id()

    poisons = {
        topology.GATEKEEPER.durable: (topology.DATASET_SUBMITTED, DatasetSubmitted(
            name="poison-rows-and-uri", rows=[{"messages": []}], uri="file:///etc/passwd")),
        topology.TRAINER[1].durable: (topology.dataset_accepted("normal"), DatasetAccepted(
            dataset_id=new_id() + new_id(), name="poison-missing-artifact", uri=missing.as_uri(), sha256="0" * 64,
            schema="chat_sft_v1", priority="normal", num_rows=1, num_rows_dropped=0, report_uri="", submission_id=new_id())),
        topology.EVALUATOR.durable: (topology.CHECKPOINT_SAVED, CheckpointSaved(
            run_id="poison", step=1, global_step=1, dataset_id="poison", uri=not_a_model.as_uri(),
            sha256=sha256_dir(not_a_model), final=True)),
        topology.DEPLOYER.durable: (topology.EVAL_SCORED, msgspec.structs.replace(
            score, id=new_id(), run_id="poison-forged", checkpoint_uri=missing.as_uri(), checkpoint_sha256=forged_sha,
            exact_match=1.0, outcomes=encode_outcomes([True] * score.num_examples), regressions=[],
            by_level={k: 1.0 for k in score.by_level}, levels={},
            # Forged past the screen and confirmed against the champion, all right where it is all wrong.
            confirmation=Confirmation(
                suite_version="forged", champion_sha256=champion.checkpoint_sha256, levels=list(score.by_level),
                num_examples=score.num_examples, outcomes=encode_outcomes([True] * score.num_examples),
                champion_outcomes=encode_outcomes([False] * score.num_examples)))),
        topology.CURRICULUM.durable: (topology.MODEL_DEPLOYED, ModelDeployed(
            checkpoint_uri=missing.as_uri(), checkpoint_sha256=forged_sha, run_id="poison-forged", step=1,
            exact_match=1.0, val_loss=0.0, reason="forged")),
        topology.DEPLOYER_SERVING.durable: (topology.MODEL_SERVING, ModelServing(
            deployment_id=new_id(), replica="poison", ok=True, checkpoint_sha256=forged_sha)),
    }
    async with ServedWatch(bus, fault_stack.url("inference"), fault_stack.api_key) as watch:
        started = time.monotonic()
        for subject, event in poisons.values():
            await bus.publish(subject, event)
        good = await submit(bus)

        def good_scored(ledger: Ledger) -> float | None:
            for m in ledger.messages["DATASETS"]:
                if isinstance(m.event, DatasetAccepted) and m.event.submission_id == good.id:
                    finals = [c.event for c in ledger.messages["TRAINING"] if isinstance(c.event, CheckpointSaved)
                              and c.event.final and c.event.dataset_id == m.event.dataset_id]
                    if finals and finals[-1].sha256 in ledger.scored:
                        return True
            return None

        # Behind the poisons, while the evaluator's poison is still being retried.
        ledger = await quiet(bus, fault_stack, timeout=150, until=lambda lg: good_scored(lg) is not None
                             and _outcome(lg, poisons, topology.EVALUATOR).kind == "dead-lettered")
    took = time.monotonic() - started
    check = ledger.check(since=before)
    blessed_ok, blessed = watch.verdict(ledger.blessed, never={forged_sha})
    evaluator_letter = ledger.dead_letters.get((topology.EVALUATOR.durable, poisons[topology.EVALUATOR.durable][1].id))

    rows = {
        topology.GATEKEEPER: ("rows and a uri outside the store", "rejected"),
        topology.TRAINER[1]: ("its artifact does not exist", "dead-lettered"),
        topology.EVALUATOR: ("a hash-true directory with no model: fails every time", "dead-lettered"),
        topology.DEPLOYER: ("forged perfect score, no such checkpoint", "handled"),
        topology.CURRICULUM: ("forged announcement of a champion that never was", "handled"),
        topology.DEPLOYER_SERVING: ("a report for a deployment that never was", "handled"),
    }
    failed_deploy = [e for e in ledger.deploy_failed.values() if e.checkpoint_sha256 == forged_sha]
    for spec, (what, expected) in rows.items():
        outcome = _outcome(ledger, poisons, spec)
        detail = outcome.detail
        ok = outcome.kind == expected
        if spec is topology.EVALUATOR and evaluator_letter is not None:
            ok = ok and "failed 5 times" in evaluator_letter.headers.get(REASON_HEADER, "")
        if spec is topology.DEPLOYER:
            ok = ok and bool(failed_deploy) and forged_sha not in _champions(watch)
            detail = (f"promoted, staged; inference refused it: {failed_deploy[0].reason[:70]}; champion kept"
                      if failed_deploy else "the forged checkpoint's deployment did NOT fail")
        trials.add(Trial(f"poison {spec.durable}", f"poison: {what}", f"{took:.0f} s trial, a valid dataset behind it",
                         f"{outcome.kind}: {detail}", int(outcome.lost), 0, int(outcome.kind == "unsettled"), blessed,
                         ok and blessed_ok))
    trials.add(Trial("poison: behind", "a valid dataset after the poisons", "submitted after the last one",
                     ("trained and scored" if good_scored(ledger) else "NOT trained and scored") + f"; {check.describe()}",
                     len(check.lost), len(check.trained_twice), len(check.unsettled), blessed,
                     bool(good_scored(ledger)) and check.ok and blessed_ok))

    assert check.ok, check.describe()
    assert blessed_ok, blessed
    assert all(row.passed for row in trials.rows if row.name.startswith("poison")), "see the trial table"


def _outcome(ledger: Ledger, poisons: dict, spec: topology.ConsumerSpec):
    event_id = poisons[spec.durable][1].id
    msg = next((m for m in ledger.on(spec) if m.headers.get("Nats-Msg-Id") == event_id), None)
    if msg is None:
        from tests.faults.ledger import Outcome

        return Outcome("LOST", "not in the stream")
    return ledger.outcome(spec, msg)


def _champions(watch: ServedWatch) -> set[str]:
    return {s.champion_sha256 for s in watch.samples} | {s.served_sha256 for s in watch.samples}
