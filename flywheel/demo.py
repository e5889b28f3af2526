"""`make demo`: one dataset through the whole loop on the embedded default.

Starts the stack (nats-server + six services), submits the bundled sample dataset (Binary
level 1, training split), follows it through training, scoring and deployment, asks the served
model five held-out questions (the eval split: never in any training data) through the
OpenAI-compatible API and judges each answer with the Binary skill's scorer, prints them with
the deployed checkpoint and the trace id that links the journey, shows that trace span by
span, and stops the stack. The end-to-end test runs this same function on a temporary data
directory.

    flywheel demo [--data-dir DIR] [--keep]     (also: python -m flywheel.demo [...])
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import httpx
import msgspec

from flywheel.submit import describe_verdict, submit_file
from flywheel.supervisor import Supervisor
from libs.common.trace_page import render_trace_page
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import CurriculumLevelChanged, ModelDeployed, TrainingProgress
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

# The sample (every level-1 training problem once, 888 rows) 36 times: 2,016 steps of 16 rows,
# the learning rate decaying by cosine to 10 % over the run. Measured directly on the same recipe
# with fresh rows (one thread): 89.6 % of held-out level-1 problems right after 1,500 and 2,000
# steps; with a 2,000-row sample of only 513 distinct problems, 70 % after 1,500.
# The trainer gets both cores while it trains: nothing else of the demo computes until it has
# finished (0.17 s a step). On a machine where other work holds a core, two torch threads fall
# 25x behind (measured: 420 tok/s against 11k): there, set FLYWHEEL_TRAINER_TORCH_THREADS=1.
DEMO_ENV = {
    "FLYWHEEL_TRAINER_EPOCHS": "36",
    "FLYWHEEL_TRAINER_BATCH_SIZE": "16",
    "FLYWHEEL_TRAINER_TORCH_THREADS": "2",
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


async def _wait_ready(ports: dict[str, int], deadline: float) -> None:
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
            if time.monotonic() > deadline:
                raise TimeoutError(f"services not ready in time: {sorted(pending)} (see the logs folder)")
            await asyncio.sleep(0.5)


async def _supervise(sup: Supervisor) -> None:
    """Restart any service that dies while the demo drives, as `flywheel up` does."""
    while True:
        sup.poll()
        await asyncio.sleep(0.5)


async def _drive(sup: Supervisor, dataset: Path, questions: list[dict], deadline: float,
                 wait_for_level_change: bool) -> DemoResult:
    supervising = asyncio.create_task(_supervise(sup))
    try:
        return await _drive_supervised(sup, dataset, questions, deadline, wait_for_level_change)
    finally:
        supervising.cancel()


async def _drive_supervised(sup: Supervisor, dataset: Path, questions: list[dict], deadline: float,
                            wait_for_level_change: bool) -> DemoResult:
    started = time.monotonic()
    await _wait_ready(sup.ports, deadline)
    bus = await Bus.connect([sup.nats_url], "demo")
    deployments: list[tuple[str, ModelDeployed]] = []  # (trace id, event), in arrival order
    level_changes: list[CurriculumLevelChanged] = []

    async def on_level_changed(msg) -> None:
        change = msgspec.json.decode(msg.data, type=CurriculumLevelChanged)
        level_changes.append(change)
        _say(f"curriculum: {change.skill} level {change.previous_level} -> {change.level} ({change.reason})")

    async def on_deployed(msg) -> None:
        deployments.append((trace_id_from_headers(msg.headers), msgspec.json.decode(msg.data, type=ModelDeployed)))

    async def on_progress(msg) -> None:
        p = msgspec.json.decode(msg.data, type=TrainingProgress)
        _say(f"training {p.run_id} step {p.step}/{p.total_steps} loss {p.loss:.3f} ({p.tokens_per_second:.0f} tok/s)")

    try:
        await bus.nc.subscribe(topology.MODEL_DEPLOYED, cb=on_deployed)
        await bus.nc.subscribe(topology.TRAINING_PROGRESS, cb=on_progress)
        await bus.nc.subscribe(topology.CURRICULUM_LEVEL_CHANGED, cb=on_level_changed)
        store = ArtifactStore(sup.data_dir / "artifacts")
        _say(f"submitting {dataset.name}")
        submitted = await submit_file(bus, store, dataset, name="demo-binary", wait_s=120)
        _say(describe_verdict(submitted))
        if submitted.outcome != "accepted":
            raise RuntimeError("the sample dataset was not accepted")
        _say(f"trace {submitted.trace_id}: waiting for training, scoring and deployment")

        def ours() -> dict[str, ModelDeployed]:
            return {e.checkpoint_sha256: e for t, e in deployments if t == submitted.trace_id}

        while not ours():
            if time.monotonic() > deadline:
                raise TimeoutError("no deployment of the demo dataset in time")
            await asyncio.sleep(0.2)
        first = next(iter(ours().values()))
        _say(f"deployed {first.checkpoint_uri} (exact_match {first.exact_match:.3f}, val_loss {first.val_loss:.4f}): "
             f"{first.reason}")
        event, served, answers = await _ask(sup, ours, questions, deadline)
        while wait_for_level_change and not level_changes:
            if time.monotonic() > deadline:
                raise TimeoutError("no curriculum level change in time")
            await asyncio.sleep(0.2)
    finally:
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


async def _ask(sup: Supervisor, ours, questions: list[dict], deadline: float) -> tuple[ModelDeployed, dict, list[Answer]]:
    """Wait until inference serves a checkpoint deployed from the demo's dataset, then ask it.

    Returns that deployment, what inference says it serves (/models/info) and the answers,
    each judged by the Binary skill.
    """
    base = f"http://127.0.0.1:{sup.ports['inference']}"
    key = (sup.data_dir / API_KEY_FILE).read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        while True:
            info = (await client.get("/models/info")).json()
            if event := ours().get(info.get("sha256")):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"inference still serves {info}")
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
             questions: list[dict] | None = None, timeout_s: float = 540, extra_env: dict[str, str] | None = None,
             wait_for_level_change: bool = False) -> DemoResult:
    """Run the demo's journey on `data_dir`; with `wait_for_level_change`, stop the stack only
    once the curriculum announced a level change (the end-to-end test's shortened run)."""
    # The caller's own FLYWHEEL_* settings win over the demo's defaults.
    env = {**DEMO_ENV, **os.environ, **(extra_env or {})}
    sup = Supervisor(data_dir, port_base=port_base, environ=env)
    setup_tracing("demo", sup.data_dir)
    sup.start()
    try:
        result = asyncio.run(_drive(sup, dataset, questions or held_out_questions(), time.monotonic() + timeout_s,
                                    wait_for_level_change))
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
