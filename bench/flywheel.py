"""The whole loop, real services and bus, from the base model for a fixed wall time.

    .venv/bin/python -m bench.flywheel [--minutes 30] [--data-dir DIR] [--out bench/out/flywheel]

Starts the stack as `flywheel up` and `flywheel demo` do (`flywheel.supervisor.Supervisor`: a
fresh nats-server and the six services as child processes, a dead one restarted) on a data
directory holding nothing but, at most, the base model, with the curriculum on: it writes
synthetic Binary practice whenever fewer than two datasets are queued and raises the level as
the champion masters it. Nothing is submitted by hand, and nothing is set here: the services run
with `flywheel up`'s defaults (a FLYWHEEL_* variable in the environment is the user's own).

The clock starts once the services are spawned (their start-up counts). Everything is recorded
from the bus, not from files: every evaluation (`eval.scored`: accuracy per level with its 95%
interval, val loss, the curriculum level it was trained at), every champion's sealed-test score
(`eval.tested`), every promotion (`model.deployed`), every level change (`curriculum.level_changed`), every finished run
(`training.finished`), and the deployer's decisions with their reasons (`DEPLOY_DECISIONS` in
KV). Each is printed as it comes and written as one JSON line under --out (evaluations.jsonl,
tests.jsonl, promotions.jsonl, level_changes.jsonl, trainings.jsonl, decisions.jsonl); once the
stack has stopped, every suite item is checked against what the run really trained
(`bench.flywheel_novelty`); the figures (`bench.flywheel_figures`) go to summary.json, the plot to
flywheel.png (with matplotlib, the `bench` extra), and the last line printed is one JSON object.

Targets on two CPU cores with the embedded tiny model, in 30 minutes: Binary up >= 2 levels; the
final champion's SEALED-TEST accuracy >= 0.9 at binary/1 and >= 0.8 at binary/2; no promotion
that is not a gain on the sealed test; every selection and test item novel to the run's
training data. Training tokens are reported (in total and at each level change) so that a
slower machine can be compared at the same count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
import nats.errors

from bench.flywheel_figures import (
    Decision,
    Evaluation,
    LevelAccuracy,
    LevelChange,
    Promotion,
    SealedScore,
    Training,
    check_promotions,
    check_sealed,
    summarise,
)
from bench.flywheel_novelty import novel_share
from bench.flywheel_plot import matplotlib_missing, plot
from flywheel.demo import free_port_base
from flywheel.supervisor import Supervisor
from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import (
    ChampionTested,
    CurriculumLevelChanged,
    EvalScored,
    ModelDeployed,
    TrainingFailed,
    TrainingFinished,
)
from libs.common.kv import Record
from libs.common.log import setup_logging
from libs.common.records import DEPLOY_DECISIONS, DeployDecision, DeployDecisions
from libs.common.settings import load_all

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "out" / "flywheel"
# What a data directory may already hold and still count as "from the base model".
BASE_MODEL_ONLY = {"models"}
DECISIONS_EVERY_S = 2.0


class Recorder:
    """Turns what the bus says into records: each printed, written as a JSON line, kept for the figures."""

    KINDS = ("evaluations", "tests", "promotions", "level_changes", "trainings", "decisions")

    def __init__(self, out: Path, skills: list[str]) -> None:
        self.started = time.monotonic()
        self.levels = dict.fromkeys(skills, 1)
        self.evaluations: list[Evaluation] = []
        self.tests: list[SealedScore] = []
        self.promotions: list[Promotion] = []
        self.level_changes: list[LevelChange] = []
        self.trainings: list[Training] = []
        self.decisions: list[Decision] = []
        # Event ids already recorded: a republished event (a redelivery, a re-announced champion) counts once.
        self._seen: set[str] = set()
        out.mkdir(parents=True, exist_ok=True)
        self._files = {kind: open(out / f"{kind}.jsonl", "wb") for kind in self.KINDS}  # noqa: SIM115

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed() / 60:6.2f} min] {text}", flush=True)

    def _keep(self, kind: str, record: msgspec.Struct) -> None:
        getattr(self, kind).append(record)
        self._files[kind].write(msgspec.json.encode(record) + b"\n")
        self._files[kind].flush()

    def _first_time(self, event_id: str) -> bool:
        if event_id in self._seen:
            return False
        self._seen.add(event_id)
        return True

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    # ------------------------------------------------------------------ bus events

    def scored(self, event: EvalScored) -> None:
        if not self._first_time(event.id):
            return
        levels = {key: LevelAccuracy(accuracy=s.accuracy, low=s.low, high=s.high, correct=s.correct, total=s.total,
                                     val_loss=s.val_loss) for key, s in event.levels.items()}
        evaluation = Evaluation(
            t=self.elapsed(), run_id=event.run_id, step=event.step, checkpoint_sha256=event.checkpoint_sha256,
            suite_version=event.suite_version, exact_match=event.exact_match,
            exact_match_low=event.exact_match_low, exact_match_high=event.exact_match_high, val_loss=event.val_loss,
            levels=levels, curriculum=dict(self.levels), num_examples=event.num_examples, outcomes=event.outcomes,
            regressions=event.regressions,
        )
        self._keep("evaluations", evaluation)
        loss = f"{event.val_loss:.4f}" if event.val_loss is not None else "not finite"
        trained_at = ", ".join(f"{skill} {level}" for skill, level in self.levels.items())
        per_level = "  ".join(f"{key} {s.accuracy:.2f} [{s.low:.2f}, {s.high:.2f}]" for key, s in sorted(levels.items()))
        self.say(f"scored {event.run_id} step {event.step} (practising {trained_at}): exact_match "
                 f"{event.exact_match:.3f} [{event.exact_match_low:.3f}, {event.exact_match_high:.3f}], val_loss {loss}")
        self.say(f"    {per_level}")
        if event.regressions:
            self.say(f"    regressions vs the champion: {'; '.join(event.regressions)}")

    def tested(self, event: ChampionTested) -> None:
        if not self._first_time(event.id):
            return
        levels = {key: LevelAccuracy(accuracy=s.accuracy, low=s.low, high=s.high, correct=s.correct, total=s.total,
                                     val_loss=s.val_loss) for key, s in event.levels.items()}
        self._keep("tests", SealedScore(
            t=self.elapsed(), checkpoint_sha256=event.checkpoint_sha256, run_id=event.run_id,
            suite_version=event.suite_version, exact_match=event.exact_match, exact_match_low=event.exact_match_low,
            exact_match_high=event.exact_match_high, levels=levels, num_examples=event.num_examples,
            outcomes=event.outcomes))
        per_level = "  ".join(f"{key} {s.accuracy:.2f} [{s.low:.2f}, {s.high:.2f}]" for key, s in sorted(levels.items())
                              if key.startswith("binary/"))
        self.say(f"SEALED TEST of champion {event.run_id} step {event.step}: exact_match {event.exact_match:.3f} "
                 f"[{event.exact_match_low:.3f}, {event.exact_match_high:.3f}]  {per_level}")

    def deployed(self, event: ModelDeployed) -> None:
        if not self._first_time(event.id):
            return
        promotion = Promotion(
            t=self.elapsed(), event_id=event.id, checkpoint_sha256=event.checkpoint_sha256,
            checkpoint_uri=event.checkpoint_uri, run_id=event.run_id, step=event.step,
            exact_match=event.exact_match, val_loss=event.val_loss, reason=event.reason,
        )
        self._keep("promotions", promotion)
        self.say(f"PROMOTED {event.run_id} step {event.step}: exact_match {event.exact_match:.3f}, "
                 f"val_loss {event.val_loss:.4f} ({event.reason})")

    def level_changed(self, event: CurriculumLevelChanged) -> None:
        if not self._first_time(event.id):
            return
        self.levels[event.skill] = event.level
        self._keep("level_changes", LevelChange(t=self.elapsed(), skill=event.skill,
                                                previous_level=event.previous_level, level=event.level,
                                                accuracy=event.accuracy, reason=event.reason))
        self.say(f"LEVEL {event.skill} {event.previous_level} -> {event.level} ({event.reason})")

    def finished(self, event: TrainingFinished) -> None:
        if not self._first_time(event.id):
            return
        self._keep("trainings", Training(t=self.elapsed(), run_id=event.run_id, dataset_id=event.dataset_id,
                                         global_step=event.global_step, final_loss=event.final_loss,
                                         duration_s=event.duration_s, tokens=event.tokens))
        self.say(f"trained {event.run_id}: global step {event.global_step}, {event.tokens:,} tokens, final loss "
                 f"{event.final_loss:.3f}, {event.duration_s:.0f} s")

    def failed(self, event: TrainingFailed) -> None:
        if self._first_time(event.id):
            self.say(f"training {event.run_id} failed ({'will retry' if event.will_retry else 'for good'}): {event.error}")

    def decided(self, decisions: list[DeployDecision]) -> None:
        """The deployer's kept decisions (oldest first); the new ones are recorded."""
        for d in decisions:
            if not self._first_time(d.id):
                continue
            self._keep("decisions", Decision(t=self.elapsed(), id=d.id, outcome=d.outcome, reason=d.reason,
                                             checkpoint_sha256=d.checkpoint_sha256, run_id=d.run_id))
            if d.outcome != "promoted":  # a promotion is printed from model.deployed
                self.say(f"deployer {d.outcome} {d.run_id}: {d.reason}")


# ---------------------------------------------------------------------------- the run


async def _subscribe(bus: Bus, recorder: Recorder) -> None:
    handlers = {
        topology.EVAL_SCORED: (EvalScored, recorder.scored),
        topology.EVAL_TESTED: (ChampionTested, recorder.tested),
        topology.MODEL_DEPLOYED: (ModelDeployed, recorder.deployed),
        topology.CURRICULUM_LEVEL_CHANGED: (CurriculumLevelChanged, recorder.level_changed),
        topology.TRAINING_FINISHED: (TrainingFinished, recorder.finished),
        topology.TRAINING_FAILED: (TrainingFailed, recorder.failed),
    }
    for subject, (kind, handle) in handlers.items():
        async def on_message(msg, kind=kind, handle=handle) -> None:
            try:
                handle(msgspec.json.decode(msg.data, type=kind))
            except msgspec.DecodeError as exc:
                recorder.say(f"undecodable {msg.subject} event: {exc}")

        await bus.nc.subscribe(subject, cb=on_message)


async def _all_ready(ports: dict[str, int], recorder: Recorder, deadline: float) -> float | None:
    """Seconds until every service answered /ready, or None if not before `deadline`."""
    pending = dict(ports)
    async with httpx.AsyncClient(timeout=2) as client:
        while pending and time.monotonic() < deadline:
            for service, port in list(pending.items()):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                        del pending[service]
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(0.5)
    if pending:
        recorder.say(f"not ready when the time ran out: {', '.join(sorted(pending))}")
        return None
    ready_s = recorder.elapsed()
    recorder.say(f"all six services ready in {ready_s:.0f} s; the curriculum writes the practice from here")
    return ready_s


async def _record(sup: Supervisor, recorder: Recorder, deadline: float) -> float | None:
    """Keep the stack alive and record the bus until `deadline`; the seconds the services took to be ready."""
    bus = await Bus.connect([sup.nats_url], "bench")
    try:
        await _subscribe(bus, recorder)
        decisions = await bus.record(DEPLOY_DECISIONS)
        ready = asyncio.create_task(_all_ready(sup.ports, recorder, deadline))
        next_read = 0.0
        while time.monotonic() < deadline:
            sup.poll()
            if time.monotonic() >= next_read:
                await _read_decisions(decisions, recorder)
                next_read = time.monotonic() + DECISIONS_EVERY_S
            await asyncio.sleep(0.5)
        await _read_decisions(decisions, recorder)
        return await ready
    finally:
        await bus.close()


async def _read_decisions(decisions: Record[DeployDecisions], recorder: Recorder) -> None:
    try:
        kept, _ = await decisions.read()
    except (nats.errors.Error, TimeoutError) as exc:
        # A slow answer on two busy cores is no reason to end a 30-minute run: read again next round.
        recorder.say(f"could not read the deployer's decisions this round: {exc!r}")
        return
    recorder.decided(kept.decisions if kept else [])


def _data_dir_problem(path: Path) -> str | None:
    if not path.exists():
        return None
    extra = sorted(p.name for p in path.iterdir() if p.name not in BASE_MODEL_ONLY)
    if extra:
        return (f"{path} already holds {', '.join(extra[:5])}: the benchmark starts from the base model on a fresh "
                "bus; give an empty folder (one holding only models/ is fine)")
    return None


def run(minutes: float, data_dir: Path, out: Path) -> dict:
    """Run the loop for `minutes` on `data_dir`; write the records, the plot and summary.json under `out`."""
    env = dict(os.environ)
    # A fresh bus: never an external server with another run's streams.
    for name in ("NATS_URL", "FLYWHEEL_NATS_URL"):
        env.pop(name, None)
    settings = load_all(env)
    skills, alpha = list(settings["curriculum"].skills), settings["deployer"].alpha
    sup = Supervisor(data_dir, port_base=free_port_base(), environ=env)
    sup.start()
    recorder = Recorder(out, skills)
    recorder.say(f"stack started on {data_dir}; recording for {minutes:g} minutes (curriculum skills: "
                 f"{', '.join(skills)}; deployer alpha {alpha:g})")
    ready_s = None
    try:
        ready_s = asyncio.run(_record(sup, recorder, recorder.started + minutes * 60))
    except KeyboardInterrupt:
        recorder.say("interrupted: summarising what was recorded")
    finally:
        elapsed = recorder.elapsed()
        recorder.close()
        print("stopping the stack", flush=True)
        sup.stop()

    for check in check_promotions(recorder.promotions, recorder.evaluations, alpha=alpha):
        if check.previous is None:
            how = "the first champion"
        elif check.test is not None:
            how = f"paired test {check.test.better} better / {check.test.worse} worse, p = {check.test.p_value:.4f}"
        else:
            how = f"no paired numbers; intervals {'overlap' if check.intervals_overlap else 'apart'}"
        flags = [flag for flag, on in (("NOISE", check.noise), ("DROP", check.drop)) if on]
        print(f"promotion at {check.promotion.t / 60:5.2f} min {check.promotion.run_id}: exact_match "
              f"{check.promotion.exact_match:.3f}; {how} {' '.join(flags)}".rstrip(), flush=True)
    for sealed in check_sealed(recorder.promotions, recorder.tests):
        verdict = (f"{sealed.better} better / {sealed.worse} worse on sealed test {sealed.suite_version}"
                   f"{': NOT A GAIN' if sealed.false else ''}" if sealed.tested else "not both tested on one test version")
        print(f"sealed test of the promotion at {sealed.promotion.t / 60:5.2f} min {sealed.promotion.run_id} "
              f"against {sealed.previous.run_id}: {verdict}", flush=True)
    novelty = novel_share(data_dir)
    print(f"novel items: {novelty['novel']} of {novelty['items']} suite items, against the {novelty['trained_rows']:,} "
          f"rows the run trained{'; seen: ' + '; '.join(novelty['seen']) if novelty['seen'] else ''}", flush=True)
    summary = summarise(minutes=elapsed / 60, evaluations=recorder.evaluations, promotions=recorder.promotions,
                        changes=recorder.level_changes, trainings=recorder.trainings, skills=skills,
                        tests=recorder.tests, novelty=novelty, alpha=alpha, ready_s=ready_s)
    if why := matplotlib_missing():
        print(f"no plot: {why}", flush=True)
        summary["plot"] = None
    else:
        summary["plot"] = str(plot(out / "flywheel.png", minutes=elapsed / 60, evaluations=recorder.evaluations,
                                   promotions=recorder.promotions, changes=recorder.level_changes,
                                   tests=recorder.tests))
        print(f"plot: {summary['plot']}", flush=True)
    summary["out"] = str(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.flywheel", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall time of the run (default 30)")
    parser.add_argument("--data-dir", type=Path,
                        help="an empty folder for the stack's data, kept afterwards (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"records and plot (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.data_dir and (problem := _data_dir_problem(args.data_dir)):
        parser.error(problem)
    setup_logging("bench", "warning")

    if args.data_dir:
        summary = run(args.minutes, args.data_dir, args.out)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-flywheel-"))
        try:
            summary = run(args.minutes, tmp / "data", args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
