"""A malformed event on every subject: bytes that decode as no event at all.

On a subject a durable consumer reads, its consumer must dead-letter it at once on
`deadletter.<subject>` with the reason (eval.scored has two consumers: two dead letters). On one
that inference follows on every replica (model.staged, model.deployed, model.deploy_failed) it is
ignored and logged, and the served model stays. On the others (read by the dashboard and the
CLI's read models) it is stored and must break no reader: the dashboard stays ready. After them
all, a valid dataset still travels from submission to score: nothing is blocked.
"""

from __future__ import annotations

import time

import pytest

from libs.common import topology
from libs.common.bus import CONSUMER_HEADER, REASON_HEADER
from libs.common.events import new_id
from tests.faults.ledger import Ledger
from tests.faults.stack import FaultStack
from tests.faults.trials import ServedWatch, Trial, TrialTable
from tests.faults.workload import all_ready, quiet, submit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(240)]

BODY = b'\xff\xfe{"type": "DatasetSubmitted", not json'
EVERY_REPLICA = (topology.MODEL_STAGED, topology.MODEL_DEPLOYED, topology.MODEL_DEPLOY_FAILED)
READ_ONLY = (topology.DATASET_REJECTED, topology.TRAINING_STARTED, topology.TRAINING_PROGRESS,
             topology.TRAINING_FINISHED, topology.TRAINING_FAILED, topology.MODEL_ROLLED_BACK,
             topology.CURRICULUM_LEVEL_CHANGED)


def _consumers_by_subject() -> dict[str, list[topology.ConsumerSpec]]:
    found: dict[str, list[topology.ConsumerSpec]] = {}
    for spec in topology.CONSUMERS:
        found.setdefault(spec.filter_subject, []).append(spec)
    return found


async def test_a_malformed_event_on_every_subject(fault_stack: FaultStack, fault_bus, trials: TrialTable):
    bus = fault_bus
    before = (await Ledger.read(bus)).last_seqs()
    consumed = _consumers_by_subject()
    ids: dict[str, str] = {}
    log_mark = len(fault_stack.log("inference"))
    async with ServedWatch(bus, fault_stack.url("inference"), fault_stack.api_key) as watch:
        started = time.monotonic()
        for subject in (*consumed, *EVERY_REPLICA, *READ_ONLY):
            ids[subject] = f"malformed-{new_id()}"
            await bus.js.publish(subject, BODY, headers={"Nats-Msg-Id": ids[subject]})
        # Behind them all, a valid dataset: it must still be trained and scored.
        good = await submit(bus)

        def everything_settled(ledger: Ledger) -> bool:
            letters = sum(1 for spec_list in consumed.values() for spec in spec_list
                          if ledger.dead_letters.get((spec.durable, ids[spec.filter_subject])))
            accepted = [m.event for m in ledger.messages["DATASETS"]
                        if getattr(m.event, "submission_id", None) == good.id]
            trained = [a for a in accepted if getattr(a, "dataset_id", "") in ledger.runs]
            scored = any(getattr(m.event, "dataset_id", "") == trained[0].dataset_id and getattr(m.event, "final", False)
                         and m.event.sha256 in ledger.scored for m in ledger.messages["TRAINING"]) if trained else False
            return letters == sum(len(v) for v in consumed.values()) and scored

        ledger = await quiet(bus, fault_stack, timeout=120, until=everything_settled)
        await all_ready(fault_stack, 30)
    took = time.monotonic() - started
    check = ledger.check(since=before)
    blessed_ok, blessed = watch.verdict(ledger.blessed)
    inference_log = fault_stack.log("inference")[log_mark:]
    followed_ok = everything_settled(ledger)

    for subject, specs in consumed.items():
        letters = [ledger.dead_letters.get((spec.durable, ids[subject])) for spec in specs]
        reasons = [letter.headers.get(REASON_HEADER, "") if letter else "" for letter in letters]
        ok = all(letter is not None and letter.headers.get(CONSUMER_HEADER) == spec.durable and "does not decode" in reason
                 for letter, spec, reason in zip(letters, specs, reasons, strict=True))
        outcome = "; ".join(f"{spec.durable}: dead-lettered ({reason[:60]})" if reason else f"{spec.durable}: NO dead letter"
                            for spec, reason in zip(specs, reasons, strict=True))
        trials.add(Trial(f"malformed {subject}", "undecodable bytes", f"durable consumer(s), {took:.0f} s trial",
                         outcome, 0 if ok else 1, 0, _unsettled(ledger, specs, ids[subject]), blessed, ok and blessed_ok))
    for subject in EVERY_REPLICA:
        logged = any('"ignoring an undecodable event"' in line and f'"subject": "{subject}"' in line
                     for line in inference_log.splitlines())
        trials.add(Trial(f"malformed {subject}", "undecodable bytes", "inference follows it (every replica)",
                         f"inference {'logged and ignored it' if logged else 'did NOT log it'}; still ready and serving",
                         0 if logged else 1, 0, 0, blessed, logged and blessed_ok))
    for subject in READ_ONLY:
        trials.add(Trial(f"malformed {subject}", "undecodable bytes", "no service consumes it",
                         "stored; the dashboard (follows every stream) stays ready", 0, 0, 0, blessed, blessed_ok))
    trials.add(Trial("malformed: after", "a valid dataset behind them", "submitted after the last one",
                     ("trained and scored" if followed_ok else "NOT trained and scored") + f"; window: {check.describe()}",
                     len(check.lost), len(check.trained_twice), len(check.unsettled), blessed,
                     followed_ok and check.ok and blessed_ok))

    assert check.ok, check.describe()
    assert followed_ok, "a valid dataset behind the malformed events was not trained and scored"
    assert blessed_ok, blessed
    assert all(row.passed for row in trials.rows if row.name.startswith("malformed")), "see the trial table"


def _unsettled(ledger: Ledger, specs: list[topology.ConsumerSpec], msg_id: str) -> int:
    return sum(1 for spec in specs for msg in ledger.on(spec)
               if msg.headers.get("Nats-Msg-Id") == msg_id and ledger.outcome(spec, msg).kind == "unsettled")
