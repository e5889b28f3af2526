"""`make demo`: one dataset through the whole loop on the embedded default.

Starts the stack (nats-server + six services), submits the bundled sample dataset (Binary
level 1, training split), follows it through training (a budget of real tokens, `DEMO_ENV`),
scoring and deployment, asks the served model five novel level-1 questions (the eval split:
no training row holds them, their commuted twins or their conversions) through the
OpenAI-compatible API and judges each answer with the Binary skill's scorer, prints them with
the deployed checkpoint and the trace id that links the journey, shows that trace span by
span, and stops the stack. The end-to-end test runs this same function on a temporary data
directory.

While the trainer trains, the demo shows its progress (`TrainingView`: a bar with the ETA on a
terminal, a plain line every 30 s otherwise) and waits as long as the speed it measures needs
(`Pace`): no fixed deadline, but a run without progress for `STALL_S` fails, saying what it
waited for and where the logs are.

    flywheel demo [--data-dir DIR] [--keep]     (also: python -m flywheel.demo [...])
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

import httpx
import msgspec
from tqdm import tqdm

from flywheel.submit import describe_verdict, submit_file
from flywheel.supervisor import Supervisor
from libs.common.trace_page import render_trace_page
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import (
    CurriculumLevelChanged,
    ModelDeployed,
    TrainingFailed,
    TrainingFinished,
    TrainingProgress,
)
from libs.common.log import setup_logging
from libs.common.settings import SERVICES
from libs.common.skills import binary
from libs.common.tracing import format_trace, read_trace, setup_tracing, shutdown_tracing, trace_id_from_headers

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA_DIR = ROOT / "data" / "demo"
SAMPLE_DATASET = ROOT / "examples" / "binary_sample.jsonl"
# Five held-out level-1 problems, fixed by this seed: the suite's and the sample's splits
# exclude them from every training set.
QUESTION_SEED = 5
QUESTION_COUNT = 5
API_KEY_FILE = Path("secrets") / "inference_api_key"

# The budget: 1.2M real tokens of the sample (every level-1 training problem once), about 14
# epochs in ~1,580 packed steps, the learning rate decaying by cosine to 10 % over them; the
# smallest budget measured at which every trained model answered 4 of the five questions
# (docs/experiments/demo-threads.md). One trainer thread: two are 1.75x faster on idle cores and
# 4-8x slower once anything else holds one (docs/experiments/demo-threads.md).
DEMO_ENV = {
    "FLYWHEEL_TRAINER_MAX_TOKENS": "1200000",
    # An upper bound only: the token budget ends the run first.
    "FLYWHEEL_TRAINER_EPOCHS": "100",
    "FLYWHEEL_TRAINER_TORCH_THREADS": "1",
    "FLYWHEEL_MAX_LENGTH": "256",
    # Checkpoints to resume from; only the final one is scored.
    "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "500",
    # Stay out of the way of the demo's own dataset.
    "FLYWHEEL_CURRICULUM_ENABLED": "false",
    # Score on what the demo teaches (level 1), so the deployment follows training promptly;
    # the base model is not scored first, so the demo's checkpoint becomes the first champion.
    "FLYWHEEL_EVALUATOR_SUITE_MAX_LEVEL": "1",
    "FLYWHEEL_EVALUATOR_SYLLO_MAX_LEVEL": "0",
    "FLYWHEEL_EVALUATOR_SCORE_BASE_MODEL": "false",
}


class Answer(msgspec.Struct):
    question: str
    answer: str
    expected: str
    correct: bool


def held_out_questions(n: int = QUESTION_COUNT, seed: int = QUESTION_SEED) -> list[dict]:
    """`n` level-1 Binary problems of the eval split: what the demo asks."""
    return binary.generate(1, n, seed=seed, split="eval")


# ---------------------------------------------------------------------------- how long to wait

# Seconds for the stack to be ready and the sample accepted (six services load torch at once).
STARTUP_S = 300.0
# A run that sends no training.progress for this long is stuck (the trainer reports every 2 s
# of training; a restart by the supervisor resumes well within it).
STALL_S = 120.0
# At the measured speed, training longer than this fails at once, with the speed, instead of
# waiting for hours (the trainer's threads fighting other work for the cores: see DEMO_ENV).
MAX_TRAINING_S = 7200.0
# Once trained: scoring, deployment, the model load and the answers (and the curriculum's level
# change) get this, plus this share of the time training took: a slower machine scores slower too.
AFTER_TRAINING_S = 300.0
AFTER_TRAINING_SHARE = 1.0
# Speed is measured over the progress events of this many recent seconds.
SPEED_WINDOW_S = 60.0


class Pace:
    """How long the demo waits, from the training speed it measured. Pure: times in, verdicts out.

    Starting: STARTUP_S until the dataset is accepted. Training: no fixed deadline while
    training.progress comes; a stall (none for STALL_S) fails, and so does a speed at which the
    budget would take more than MAX_TRAINING_S. The speed is real tokens/s: the token budget
    spread evenly over the run's planned steps (packed steps hold nearly equal tokens), over the
    wall-clock time between progress events, pauses for validation and checkpoints included.
    Trained: AFTER_TRAINING_S plus AFTER_TRAINING_SHARE of the training time, for the rest.
    """

    def __init__(self, now: float, budget_tokens: int = 0) -> None:
        self.budget_tokens = budget_tokens
        self.phase = "starting"  # then "training", then "trained"
        self._since = now
        self._recent: deque[tuple[float, int]] = deque()  # (time, step) of recent progress events
        self.step = self.total_steps = 0
        self._trained_s = 0.0

    def accepted(self, now: float) -> None:
        if self.phase == "starting":
            self.phase, self._since = "training", now

    def progress(self, event: TrainingProgress, now: float) -> None:
        self.accepted(now)
        if self.phase != "training":
            return
        self.step, self.total_steps = event.step, event.total_steps
        self._recent.append((now, event.step))
        while len(self._recent) > 2 and now - self._recent[1][0] >= SPEED_WINDOW_S:
            self._recent.popleft()
        if event.step >= event.total_steps:
            self.finished(now)

    def finished(self, now: float) -> None:
        """Training is over (its last progress event, or training.finished: a run resumed at its
        final checkpoint sends no progress)."""
        self.accepted(now)
        if self.phase == "training":
            self.phase, self._trained_s, self._since = "trained", now - self._since, now

    @property
    def tokens_per_step(self) -> float:
        return self.budget_tokens / self.total_steps if self.budget_tokens and self.total_steps else 1.0

    @property
    def steps_per_second(self) -> float | None:
        if len(self._recent) < 2:
            return None
        (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    @property
    def tokens_per_second(self) -> float | None:
        """Measured training speed: None until two progress events came, or without a budget."""
        rate = self.steps_per_second
        return rate * self.tokens_per_step if rate and self.budget_tokens else None

    def eta_s(self) -> float | None:
        """Seconds of training left at the measured speed: remaining tokens / tokens per second."""
        rate = self.steps_per_second
        if rate is None:
            return None
        return (self.total_steps - self.step) * self.tokens_per_step / (rate * self.tokens_per_step)

    def overdue(self, now: float) -> str | None:
        """Why the demo should stop waiting now, or None."""
        waited = now - self._since
        if self.phase == "starting" and waited > STARTUP_S:
            return f"the stack was not ready, or the sample not accepted, within {STARTUP_S:.0f}s"
        if self.phase == "training":
            last = self._recent[-1][0] if self._recent else self._since
            if now - last > STALL_S:
                where = (f"the last at step {self.step}/{self.total_steps}, {now - last:.0f}s ago" if self._recent
                         else f"none since the dataset was accepted {waited:.0f}s ago")
                return f"training is stuck: no training.progress event for {STALL_S:.0f}s ({where})"
            eta = self.eta_s()
            if eta is not None and now - self._recent[0][0] >= SPEED_WINDOW_S and waited + eta > MAX_TRAINING_S:
                speed = (f"{self.tokens_per_second:.0f} tokens/s" if self.tokens_per_second
                         else f"{self.steps_per_second:.2f} steps/s")
                return (f"training too slow: {speed} would need {(waited + eta) / 60:.0f} minutes for "
                        f"{self.total_steps} steps (at most {MAX_TRAINING_S / 60:.0f}); is other work holding "
                        "the cores? (FLYWHEEL_TRAINER_TORCH_THREADS sets the trainer's threads)")
        if self.phase == "trained" and waited > self.after_training_s:
            return (f"no deployment answered within {self.after_training_s:.0f}s of the end of training "
                    "(waited for eval.scored, model.deployed and inference serving the checkpoint)")
        return None

    @property
    def after_training_s(self) -> float:
        return AFTER_TRAINING_S + AFTER_TRAINING_SHARE * self._trained_s


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TrainingView:
    """Training progress on the demo's output: a bar with the ETA on a terminal, else a plain line
    every `every_s` seconds (pytest's captured output, CI logs) and at the last step."""

    def __init__(self, out: TextIO | None = None, every_s: float = 30.0) -> None:
        self._out = out or sys.stdout
        self._tty = self._out.isatty()
        self._every_s = every_s
        self._bar: tqdm | None = None
        self._last_line = -float("inf")

    def show(self, pace: Pace, event: TrainingProgress, now: float) -> None:
        speed = pace.tokens_per_second or event.tokens_per_second
        facts = f"loss {event.loss:.3f}, {speed / 1000:.1f}k tok/s, ETA {_duration(pace.eta_s())}"
        if self._tty:
            if self._bar is None:
                # A terminal that reports no size (a pty under `script`) would get no bar at all.
                size = shutil.get_terminal_size()
                self._bar = tqdm(total=event.total_steps, file=self._out, ncols=size.columns, nrows=size.lines,
                                 bar_format="[demo] training {percentage:3.0f}%|{bar}| {n}/{total} steps{postfix}")
            self._bar.n = event.step
            self._bar.set_postfix_str(facts)  # refreshes
            if event.step >= event.total_steps:
                self.close()
        elif now - self._last_line >= self._every_s or event.step >= event.total_steps:
            self._last_line = now
            percent = 100 * event.step / event.total_steps if event.total_steps else 0
            print(f"[demo] training {percent:3.0f}% (step {event.step}/{event.total_steps}), {facts}",
                  file=self._out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class DemoResult(msgspec.Struct):
    trace_id: str
    submission_id: str
    checkpoint_uri: str
    checkpoint_sha256: str
    # What inference said it served when it was asked (/models/info).
    served_uri: str
    served_sha256: str
    exact_match: float
    val_loss: float
    # Why the deployer promoted it (the paired test against the champion, or "first champion").
    promotion_reason: str
    answers: list[Answer]
    # Level changes the curriculum announced while the demo ran.
    level_changes: list[CurriculumLevelChanged]
    trace_services: list[str]
    seconds: float


def free_port_base(count: int = len(SERVICES)) -> int:
    """A base port with `count` consecutive free ports after it."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports found")


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


class _Watch:
    """The demo's `Pace` on the real clock: raises, with where the logs are, once it is overdue."""

    def __init__(self, pace: Pace, logs: Path) -> None:
        self.pace, self._logs = pace, logs

    def check(self) -> None:
        if reason := self.pace.overdue(time.monotonic()):
            raise TimeoutError(f"{reason}. The logs folder {self._logs} holds one log per service "
                               "(trainer.log, evaluator.log, deployer.log, inference.log, ...) and nats-server's")


async def _wait_ready(ports: dict[str, int], watch: _Watch) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        pending = dict(ports)
        while pending:
            for service, port in list(pending.items()):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                        _say(f"{service} ready on :{port}")
                        del pending[service]
                except httpx.HTTPError:
                    pass
            if pending:
                try:
                    watch.check()
                except TimeoutError as exc:
                    raise TimeoutError(f"services not ready: {sorted(pending)}: {exc}") from None
            await asyncio.sleep(0.5)


async def _supervise(sup: Supervisor) -> None:
    """Restart any service that dies while the demo drives, as `flywheel up` does."""
    while True:
        sup.poll()
        await asyncio.sleep(0.5)


async def _drive(sup: Supervisor, dataset: Path, questions: list[dict], watch: _Watch,
                 wait_for_level_change: bool) -> DemoResult:
    supervising = asyncio.create_task(_supervise(sup))
    try:
        return await _drive_supervised(sup, dataset, questions, watch, wait_for_level_change)
    finally:
        supervising.cancel()


async def _drive_supervised(sup: Supervisor, dataset: Path, questions: list[dict], watch: _Watch,
                            wait_for_level_change: bool) -> DemoResult:
    started = time.monotonic()
    await _wait_ready(sup.ports, watch)
    bus = await Bus.connect([sup.nats_url], "demo")
    deployments: list[tuple[str, ModelDeployed]] = []  # (trace id, event), in arrival order
    level_changes: list[CurriculumLevelChanged] = []
    failures: list[TrainingFailed] = []
    view = TrainingView()
    ours: dict[str, str] = {}  # the accepted dataset's id, once known

    async def on_level_changed(msg) -> None:
        change = msgspec.json.decode(msg.data, type=CurriculumLevelChanged)
        level_changes.append(change)
        _say(f"curriculum: {change.skill} level {change.previous_level} -> {change.level} ({change.reason})")

    async def on_deployed(msg) -> None:
        deployments.append((trace_id_from_headers(msg.headers), msgspec.json.decode(msg.data, type=ModelDeployed)))

    async def on_progress(msg) -> None:
        p = msgspec.json.decode(msg.data, type=TrainingProgress)
        if p.dataset_id == ours.get("dataset_id"):
            watch.pace.progress(p, time.monotonic())
            view.show(watch.pace, p, time.monotonic())

    async def on_finished(msg) -> None:
        if msgspec.json.decode(msg.data, type=TrainingFinished).dataset_id == ours.get("dataset_id"):
            watch.pace.finished(time.monotonic())
            view.close()

    async def on_failed(msg) -> None:
        failed = msgspec.json.decode(msg.data, type=TrainingFailed)
        if failed.dataset_id == ours.get("dataset_id"):
            failures.append(failed)

    try:
        await bus.nc.subscribe(topology.MODEL_DEPLOYED, cb=on_deployed)
        await bus.nc.subscribe(topology.TRAINING_PROGRESS, cb=on_progress)
        await bus.nc.subscribe(topology.TRAINING_FINISHED, cb=on_finished)
        await bus.nc.subscribe(topology.TRAINING_FAILED, cb=on_failed)
        await bus.nc.subscribe(topology.CURRICULUM_LEVEL_CHANGED, cb=on_level_changed)
        store = ArtifactStore(sup.data_dir / "artifacts")
        _say(f"submitting {dataset.name}")
        submitted = await submit_file(bus, store, dataset, name="demo-binary", wait_s=120)
        _say(describe_verdict(submitted))
        if submitted.outcome != "accepted":
            raise RuntimeError("the sample dataset was not accepted")
        ours["dataset_id"] = submitted.verdict["dataset_id"]
        watch.pace.accepted(time.monotonic())
        budget = watch.pace.budget_tokens
        _say(f"trace {submitted.trace_id}: training on {budget:,} tokens, then scoring and deployment"
             if budget else f"trace {submitted.trace_id}: waiting for training, scoring and deployment")

        def deployed() -> dict[str, ModelDeployed]:
            return {e.checkpoint_sha256: e for t, e in deployments if t == submitted.trace_id}

        def check() -> None:
            if failures and not failures[-1].will_retry:
                raise RuntimeError(f"training failed for good: {failures[-1].error} (see {sup.data_dir / 'logs'})")
            watch.check()

        while not deployed():
            check()
            await asyncio.sleep(0.2)
        view.close()
        first = next(iter(deployed().values()))
        _say(f"deployed {first.checkpoint_uri} (exact_match {first.exact_match:.3f}, val_loss {first.val_loss:.4f}): "
             f"{first.reason}")
        event, served, answers = await _ask(sup, deployed, questions, check)
        while wait_for_level_change and not level_changes:
            check()
            await asyncio.sleep(0.2)
    finally:
        view.close()
        await bus.close()
    return DemoResult(
        trace_id=submitted.trace_id, submission_id=submitted.submission_id,
        checkpoint_uri=event.checkpoint_uri, checkpoint_sha256=event.checkpoint_sha256,
        served_uri=served["uri"], served_sha256=served["sha256"],
        exact_match=event.exact_match, val_loss=event.val_loss, promotion_reason=event.reason,
        answers=answers, level_changes=level_changes,
        trace_services=[],  # read once the stack has stopped: see run_demo
        seconds=round(time.monotonic() - started, 1),
    )


async def _ask(sup: Supervisor, ours, questions: list[dict], check) -> tuple[ModelDeployed, dict, list[Answer]]:
    """Wait until inference serves a checkpoint deployed from the demo's dataset, then ask it.

    Returns that deployment, what inference says it serves (/models/info) and the answers,
    each judged by the Binary skill. `check()` raises once the demo has waited too long.
    """
    base = f"http://127.0.0.1:{sup.ports['inference']}"
    key = (sup.data_dir / API_KEY_FILE).read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        while True:
            info = (await client.get("/models/info")).json()
            if event := ours().get(info.get("sha256")):
                break
            try:
                check()
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}; inference still serves {info}") from None
            await asyncio.sleep(0.5)
        answers = []
        for row in questions:
            question = row["messages"][0]["content"]
            reply = await client.post("/v1/chat/completions", json={
                "model": "flywheel", "messages": [{"role": "user", "content": question}],
                "max_tokens": 192, "temperature": 0,
            })
            reply.raise_for_status()
            text = reply.json()["choices"][0]["message"]["content"]
            answers.append(Answer(question, text, row["expected"], binary.is_correct(row["expected"], text)))
        return event, info, answers


def run_demo(data_dir: Path, *, port_base: int | None = None, dataset: Path = SAMPLE_DATASET,
             questions: list[dict] | None = None, extra_env: dict[str, str] | None = None,
             wait_for_level_change: bool = False) -> DemoResult:
    """Run the demo's journey on `data_dir`; with `wait_for_level_change`, stop the stack only
    once the curriculum announced a level change (the end-to-end test's run).

    How long it waits follows the training speed it measures (`Pace`); it raises TimeoutError,
    saying what it waited for, when the stack does not start, training stalls or would take
    far too long, or the trained checkpoint is not served in time.
    """
    # The caller's own FLYWHEEL_* settings win over the demo's defaults.
    env = {**DEMO_ENV, **os.environ, **(extra_env or {})}
    sup = Supervisor(data_dir, port_base=port_base, environ=env)
    watch = _Watch(Pace(time.monotonic(), int(env.get("FLYWHEEL_TRAINER_MAX_TOKENS") or 0)), sup.data_dir / "logs")
    setup_tracing("demo", sup.data_dir)
    sup.start()
    try:
        result = asyncio.run(_drive(sup, dataset, questions or held_out_questions(), watch, wait_for_level_change))
    finally:
        _say("stopping the stack")
        sup.stop()
        shutdown_tracing()
    # Every service writes out its last spans as it stops: only now is the trace complete.
    spans = read_trace(sup.data_dir, result.trace_id)
    return msgspec.structs.replace(
        result, trace_services=sorted({s["service"].removeprefix("flywheel-") for s in spans}))


def run_and_report(data_dir: Path | None = None, *, keep: bool = False) -> int:
    """`flywheel demo`: run the demo on a fresh data directory (unless `keep`) and print what it showed."""
    data_dir = data_dir or DEMO_DATA_DIR
    setup_logging("demo", "warning")
    if data_dir.exists() and not keep:
        shutil.rmtree(data_dir)
    port_base = None
    try:
        for port in range(8100, 8106):
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
    except OSError:
        port_base = free_port_base()
        _say(f"ports 8100-8105 are busy; using {port_base}-{port_base + 5}")
    result = run_demo(data_dir, port_base=port_base)
    print()
    print("=" * 72)
    for number, a in enumerate(result.answers, start=1):
        print(f"question {number}          {a.question!r}")
        print(f"  answer            {a.answer!r}")
        print(f"  {'right' if a.correct else 'wrong'}  (expected {a.expected})")
    print(f"held-out score      {sum(a.correct for a in result.answers)}/{len(result.answers)}")
    print(f"deployed checkpoint {result.checkpoint_uri}")
    print(f"                    exact_match {result.exact_match:.3f}  val_loss {result.val_loss:.4f}")
    print(f"promoted because    {result.promotion_reason}")
    print(f"trace id            {result.trace_id}   (services: {', '.join(result.trace_services)})")
    print(f"took                {result.seconds:.0f}s")
    print("=" * 72)
    print(format_trace(read_trace(data_dir, result.trace_id)))
    page = data_dir / f"trace-{result.trace_id}.html"
    page.write_text(render_trace_page(result.trace_id, read_trace(data_dir, result.trace_id)))
    print(f"\nThe journey as a page: {page}")
    print(f"See it again: FLYWHEEL_DATA_DIR={data_dir} .venv/bin/flywheel trace {result.trace_id} [--html FILE]")
    return 0


if __name__ == "__main__":
    # The options and the error handling live in the CLI: `flywheel demo` is the one entry point.
    from flywheel.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
