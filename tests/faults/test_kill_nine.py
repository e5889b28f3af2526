"""kill -9 of every service at its work, at random moments, while datasets keep flowing.

One lane per service runs beside the others: wait until the service is up, wait for the message
that sets it to work (a submission for the gatekeeper, an intermediate checkpoint for the
trainer, a final one for the evaluator, a score for the deployer and the curriculum, a staged
deployment for inference), strike a random moment after it (seeded: FAULTS_SEED), and again,
five times. Meanwhile a feeder keeps a dataset or two queued and the suite asks the deployer
every few seconds to deploy the newest scored checkpoint, so deployments are in flight too.
Then the stack must become quiet by itself, and every message any killed service had in hand
has an outcome; no dataset was trained twice; what was served was always blessed; and a
trainer killed mid-run resumed its run from its last checkpoint (same run id, later step).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import pytest

from libs.common import topology
from libs.common.events import CheckpointSaved, EvalScored, TrainingFinished, TrainingStarted
from libs.common.records import CHAMPION, DEPLOYMENT
from tests.faults.ledger import CONSUMERS_OF, Ledger
from tests.faults.stack import KILLED, FaultStack
from tests.faults.trials import ServedWatch, Trial, TrialTable
from tests.faults.workload import Triggers, all_ready, manual_deploy, quiet, submit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(540)]

KILLS_PER_SERVICE = 5
# How long a lane waits for its service's work before striking anyway (recorded as idle).
TRIGGER_WAIT_S = 45.0


def _final(subject: str, data: bytes, final: bool) -> bool:
    return subject == topology.CHECKPOINT_SAVED and (b'"final":true' in data) == final


# What sets each service to work, how long after it to strike at most, and what it is doing then.
WORK = {
    "gatekeeper": (lambda s, d: s == topology.DATASET_SUBMITTED, 0.5, "validating a submission"),
    # Soon after a checkpoint: on an idle machine a tiny-model run ends ~2 s after its middle
    # checkpoint, and a later kill lands after the run (clean-clone CI: both mid-run kills missed).
    "trainer": (lambda s, d: _final(s, d, False), 0.5, "training, after checkpoint"),
    "evaluator": (lambda s, d: _final(s, d, True), 0.8, "scoring a final checkpoint"),
    "deployer": (lambda s, d: s in (topology.EVAL_SCORED, topology.MODEL_SERVING), 0.3, "deciding on"),
    "inference": (lambda s, d: s == topology.MODEL_STAGED, 1.0, "loading a staged checkpoint"),
    "curriculum": (lambda s, d: s == topology.MODEL_DEPLOYED, 0.3, "counting a champion's score"),
}


@dataclass
class Kill:
    service: str
    number: int
    at: float
    moment: str
    pid: int
    # (durable, first, last stream sequence) it had delivered and not yet settled
    in_flight: list[tuple[str, int, int]] = field(default_factory=list)
    deployment: str = ""  # inference: the staged deployment it was loading
    run: CheckpointSaved | None = None  # trainer: the checkpoint its run had reached
    wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    back_after_s: float | None = None


class Chaos:
    def __init__(self, stack: FaultStack, bus, triggers: Triggers, seed: int) -> None:
        self.stack = stack
        self.bus = bus
        self.triggers = triggers
        self.seed = seed
        self.t0 = time.monotonic()
        self.kills: list[Kill] = []
        self.scored: list[str] = []
        self.done = asyncio.Event()

    async def lane(self, service: str) -> None:
        rng = random.Random(f"{self.seed}:{service}")
        predicate, max_delay, doing = WORK[service]
        await asyncio.sleep(rng.uniform(0, 2) if service == "trainer" else rng.uniform(0, 8))
        interrupted: CheckpointSaved | None = None  # trainer: a run killed mid-way, not resumed yet
        for number in range(1, KILLS_PER_SERVICE + 1):
            await all_ready(self.stack, 180, (service,))
            if interrupted is not None:
                # The restarted trainer at its other work: holding (or waiting for) the model's
                # lease until the interrupted run's dataset comes back. Strike there too.
                delay = rng.uniform(0, 4)
                await asyncio.sleep(delay)
                hit, what = None, f"recovering: run {interrupted.run_id} pending +{delay:.1f}s"
            else:
                waiting = asyncio.create_task(self.triggers.next(predicate, timeout=TRIGGER_WAIT_S))
                await asyncio.sleep(0)
                await self._set_to_work(service)
                hit = await waiting
                delay = rng.uniform(0, max_delay)
                await asyncio.sleep(delay)
                what = f"{doing} {_what(hit)} +{delay:.1f}s" if hit else f"idle: no work came in {TRIGGER_WAIT_S:.0f} s"
            pid = self.stack.kill(service)
            at = time.monotonic() - self.t0
            kill = Kill(service, number, at, f"t={at:.0f}s {what}", pid or 0)
            await self._in_flight(kill, hit)
            if service == "trainer":
                kill.run = kill.run or interrupted
                # A mid-run kill leaves its run to resume; the kill after it strikes the recovery.
                interrupted = kill.run if hit else None
            self.kills.append(kill)
            started = time.monotonic()
            await all_ready(self.stack, 180, (service,))
            kill.back_after_s = time.monotonic() - started

    async def _set_to_work(self, service: str) -> None:
        if service == "gatekeeper":
            await submit(self.bus)
        elif service in ("inference", "deployer"):
            await self.deploy_newest()

    async def _in_flight(self, kill: Kill, hit) -> None:
        for spec in CONSUMERS_OF[kill.service]:
            info = await self.bus.js.consumer_info(spec.stream, spec.durable)
            if info.delivered.stream_seq > info.ack_floor.stream_seq:
                kill.in_flight.append((spec.durable, info.ack_floor.stream_seq + 1, info.delivered.stream_seq))
        if kill.service == "inference":
            deployment, _ = await (await self.bus.record(DEPLOYMENT)).read()
            if deployment is not None and deployment.state == "staged":
                kill.deployment = deployment.id
        if kill.service == "trainer" and hit:
            kill.run = msgspec.json.decode(hit[1], type=CheckpointSaved)

    async def feed(self) -> None:
        """Keep one or two datasets queued for the trainer while the lanes run."""
        while not self.done.is_set():
            queued = 0
            for spec in (topology.GATEKEEPER, *topology.TRAINER):
                info = await self.bus.js.consumer_info(spec.stream, spec.durable)
                queued += info.num_pending + info.num_ack_pending
            if queued < 2:
                await submit(self.bus)
            await asyncio.sleep(1.0)

    async def follow_scores(self) -> None:
        async def on_scored(msg) -> None:
            self.scored.append(msgspec.json.decode(msg.data, type=EvalScored).checkpoint_sha256)

        sub = await self.bus.nc.subscribe(topology.EVAL_SCORED, cb=on_scored)
        await self.done.wait()
        await sub.unsubscribe()

    async def deploys(self) -> None:
        """A deployment in flight most of the time: the newest scored checkpoint, every few seconds."""
        while not self.done.is_set():
            await self.deploy_newest()
            await asyncio.sleep(6)

    async def deploy_newest(self) -> None:
        champion, _ = await (await self.bus.record(CHAMPION)).read()
        current = champion.checkpoint_sha256 if champion else ""
        candidates = [sha for sha in self.scored if sha != current]
        if candidates:
            await manual_deploy(self.bus, candidates[-1])


def _what(hit) -> str:
    subject, data = hit
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return subject
    if subject == topology.CHECKPOINT_SAVED:
        return f"{event['run_id']} step {event['step']}"
    return subject


async def test_kill_nine_each_service_at_its_work(fault_stack: FaultStack, fault_bus, trials: TrialTable):
    bus = fault_bus
    start = await Ledger.read(bus)
    before = start.last_seqs()
    async with Triggers(bus) as triggers, ServedWatch(bus, fault_stack.url("inference"), fault_stack.api_key) as watch:
        chaos = Chaos(fault_stack, bus, triggers, trials.seed)
        chaos.scored = [m.event.checkpoint_sha256 for m in start.messages["EVALS"]
                        if isinstance(m.event, EvalScored)]
        helpers = [asyncio.create_task(c) for c in (chaos.feed(), chaos.follow_scores(), chaos.deploys())]
        try:
            await asyncio.gather(*(chaos.lane(service) for service in KILLED))
        finally:
            chaos.done.set()
            await asyncio.gather(*helpers, return_exceptions=True)
        chaos_s = time.monotonic() - chaos.t0
        ledger = await quiet(bus, fault_stack, timeout=200)
    check = ledger.check(since=before)
    blessed_ok, blessed = watch.verdict(ledger.blessed)

    resumed = 0
    for kill in sorted(chaos.kills, key=lambda k: k.at):
        row = _row(kill, ledger, blessed)
        resumed += "resumed run" in row.outcome
        trials.add(row)
    trials.add(Trial(
        "kill-9 (all)", f"{len(chaos.kills)} kills in {chaos_s:.0f} s", f"quiet {time.monotonic() - chaos.t0 - chaos_s:.0f} s later",
        f"{check.events} consumed events: " + ", ".join(f"{n} {k}" for k, n in sorted(check.outcomes.items())),
        len(check.lost) + len(check.verdicts_not_one), len(check.trained_twice), len(check.unsettled), blessed,
        check.ok and blessed_ok))

    assert check.ok, check.describe()
    assert blessed_ok, f"served or named a checkpoint that was never blessed: {blessed}"
    for service in KILLED:
        assert sum(k.service == service for k in chaos.kills) >= KILLS_PER_SERVICE
    assert all(row.passed for row in trials.rows if row.name.startswith("kill-9 #")), "a kill trial failed (see the table)"
    assert resumed >= 1, "no trainer kill landed mid-run and resumed from a checkpoint"


def _row(kill: Kill, ledger: Ledger, blessed: str) -> Trial:
    specs = {s.durable: s for s in topology.CONSUMERS}
    lost = unsettled = twice = 0
    outcomes = []
    for durable, first, last in kill.in_flight:
        spec = specs[durable]
        for msg in ledger.on(spec):
            if first <= msg.seq <= last:
                outcome = ledger.outcome(spec, msg)
                outcomes.append(f"{msg.subject}#{msg.seq} {outcome.kind}")
                lost += outcome.lost
                unsettled += outcome.kind == "unsettled"
                dataset_id = getattr(msg.event, "dataset_id", "")
                twice += spec in topology.TRAINER and len(ledger.runs.get(dataset_id, ())) > 1
    if kill.deployment:
        done = ledger.deployment_resolved(kill.deployment)
        outcomes.append(f"deployment {kill.deployment[:8]} {'resolved' if done else 'UNRESOLVED'}")
        lost += not done
    ok = kill.pid > 0 and kill.back_after_s is not None
    if kill.run is not None:
        resumed, ok_resume = _resumed(kill, ledger)
        outcomes.insert(0, resumed)
        ok = ok and ok_resume
    back = f"back in {kill.back_after_s:.0f}s" if kill.back_after_s is not None else "NOT back"
    return Trial(f"kill-9 #{kill.service[:5]}{kill.number}", f"kill -9 {kill.service} (pid {kill.pid})", kill.moment,
                 f"{back}; " + ("; ".join(outcomes) or "nothing in hand"), lost, twice, unsettled, blessed,
                 ok and not (lost or twice or unsettled))


def _resumed(kill: Kill, ledger: Ledger) -> tuple[str, bool]:
    """How the run the trainer was killed in went on: resumed from its checkpoint (same run id,
    a later start step), finished once, its checkpoints announced once each and in order."""
    run = kill.run
    starts = [m.event for m in ledger.messages["TRAINING"]
              if isinstance(m.event, TrainingStarted) and m.event.run_id == run.run_id]
    steps = [m.event.step for m in ledger.messages["TRAINING"]
             if isinstance(m.event, CheckpointSaved) and m.event.run_id == run.run_id]
    finished = run.dataset_id in ledger.runs and ledger.runs[run.dataset_id] == {run.run_id}
    ended = [m.time for m in ledger.messages["TRAINING"]
             if isinstance(m.event, TrainingFinished) and m.event.run_id == run.run_id]
    if ended and ended[0] <= kill.wall:
        return f"run {run.run_id} had finished before the kill landed", finished
    later = [s for s in starts if s.start_step >= run.step > 0]
    in_order = steps == sorted(set(steps))
    text = (f"resumed run {run.run_id} from step {later[0].start_step} (killed after {run.step})" if later
            else f"run {run.run_id} NOT resumed from step {run.step} (starts {[s.start_step for s in starts]})")
    if not finished:
        text += f"; finished runs {sorted(ledger.runs.get(run.dataset_id, ()))}"
    if not in_order:
        text += f"; checkpoint steps {steps}"
    return text, bool(later) and finished and in_order
