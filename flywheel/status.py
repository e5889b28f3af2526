"""The loop's state, read from the bus alone: queue depth, training, champion, scores, curriculum.

Nothing here reads a service's files: streams and KV buckets are the shared history, so
`flywheel status` works from any machine that reaches NATS.

The champion's accuracy is its sealed test score (`eval.tested`, `ChampionTested`), with 95%
intervals per level: the selection suite's numbers picked it out of many candidates, so they
flatter it. The last selection score is shown as what it is: the newest candidate's.
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.js.errors

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import ChampionTested
from libs.common.history import read_subject
from libs.common.records import CHAMPION, DEPLOY_DECISIONS, TRAINER_CONTROL, Key, skill_state
from libs.common.skills import binary


async def _last(bus: Bus, subject: str) -> dict | None:
    try:
        msg = await bus.js.get_last_msg(topology.stream_for(subject), subject)
    except nats.js.errors.NotFoundError:
        return None
    return msgspec.json.decode(msg.data)


async def _record(bus: Bus, key: Key) -> dict | None:
    record, _ = await (await bus.record(key)).read()
    return msgspec.to_builtins(record) if record else None


async def _last_decision(bus: Bus) -> dict | None:
    decisions = ((await _record(bus, DEPLOY_DECISIONS)) or {}).get("decisions") or []
    return decisions[-1] if decisions else None


async def champion_test(bus: Bus, sha256: str) -> dict | None:
    """The newest sealed test score of checkpoint `sha256` (None: not tested yet)."""
    tests = [r.event for r in await read_subject(bus, topology.EVAL_TESTED)
             if isinstance(r.event, ChampionTested) and r.event.checkpoint_sha256 == sha256]
    return msgspec.to_builtins(tests[-1]) if tests else None


async def read_status(bus: Bus) -> dict[str, Any]:
    queue = await bus.queue_state()
    dead = await bus.js.stream_info("DEADLETTER")
    last_started = await _last(bus, topology.TRAINING_STARTED)
    last_progress = await _last(bus, topology.TRAINING_PROGRESS)
    last_finished = await _last(bus, topology.TRAINING_FINISHED)
    champion = await _record(bus, CHAMPION)
    return {
        "queue": queue,
        "training": {"started": last_started, "progress": last_progress, "finished": last_finished},
        "trainer_control": await _record(bus, TRAINER_CONTROL),
        "champion": champion,
        "champion_test": await champion_test(bus, champion["checkpoint_sha256"]) if champion else None,
        "last_decision": await _last_decision(bus),
        "last_scores": await _last(bus, topology.EVAL_SCORED),
        "curriculum": await _record(bus, skill_state(binary.SKILL)),
        "dead_letters": dead.state.messages,
    }


def _number(value: float | None, spec: str) -> str:
    """A score as text; None is a value that was not finite (JSON has no NaN) or not reported."""
    return format(value, spec) if value is not None else "n/a"


def run_in_training(status: dict[str, Any]) -> tuple[dict, dict | None] | None:
    """The run in training (its `training.started`) and its latest progress (None before the
    first report); None when no run is in training (none started, or the last one finished)."""
    training = status["training"]
    started, progress, finished = training["started"], training["progress"], training["finished"]
    if not started or (finished and finished["run_id"] == started["run_id"] and finished["time"] >= started["time"]):
        return None
    return started, progress if progress and progress["run_id"] == started["run_id"] else None


def _interval(low: float, high: float) -> str:
    return f"[95% {low:.3f}, {high:.3f}]"


def _test_lines(test: dict | None) -> list[str]:
    """The champion's sealed test score: overall, then per "<skill>/<level>", each with its 95% interval."""
    if not test:
        return ["  sealed test     not yet tested (the evaluator scores every champion on the sealed test suite)"]
    lines = [f"  sealed test     exact_match {test['exact_match']:.3f} "
             f"{_interval(test['exact_match_low'], test['exact_match_high'])} on {test['num_examples']}  "
             f"val_loss {_number(test.get('val_loss'), '.4f')}  suite {test['suite_version']}"]
    for key, level in sorted(test.get("levels", {}).items()):
        lines.append(f"    {key:<13} {level['accuracy']:.3f} {_interval(level['low'], level['high'])}  "
                     f"{level['correct']}/{level['total']}")
    return lines


def format_status(status: dict[str, Any]) -> str:
    lines = ["queue"]
    for durable, q in status["queue"].items():
        lines.append(f"  {durable:<16} waiting {q['waiting']:>4}   in progress {q['in_progress']:>2}")
    finished = status["training"]["finished"]
    lines.append("training")
    control = status["trainer_control"]
    if control:
        lines.append(f"  control         {control.get('mode')} (by {control.get('requested_by')})")
    if live := run_in_training(status):
        started, step = live
        where = f"step {step['step']}/{step['total_steps']}  loss {step['loss']:.4f}  {step['tokens_per_second']:.0f} tok/s" if step else "starting"
        mode = (control or {}).get("mode", "running")
        label = "running" if mode == "running" else f"{mode} at"
        lines.append(f"  {label:<15} {started['run_id']}  {where}")
    else:
        lines.append("  idle")
    if finished:
        lines.append(f"  last finished   {finished['run_id']}  step {finished['global_step']}  loss {finished['final_loss']:.4f}")
    champion = status["champion"]
    lines.append("champion")
    if champion:
        lines.append(f"  {champion.get('run_id')} step {champion.get('step')}  {champion.get('checkpoint_uri')}")
        lines += _test_lines(status.get("champion_test"))
    else:
        lines.append("  none yet (serving the base model)")
    decision = status.get("last_decision")
    if decision:
        lines.append(f"  last decision   {decision['outcome']}: {decision['reason']}")
    scores = status["last_scores"]
    lines.append("last scores (selection suite: the newest candidate's)")
    if scores:
        interval = ""
        if "exact_match_low" in scores:
            interval = f" [95% {scores['exact_match_low']:.3f}, {scores['exact_match_high']:.3f}]"
        lines.append(f"  {scores['run_id']} step {scores['step']}  exact_match {scores['exact_match']:.3f}{interval}  "
                     f"val_loss {_number(scores.get('val_loss'), '.4f')}  ece {_number(scores.get('ece'), '.3f')}  "
                     f"suite {scores['suite_version']}")
        for regression in scores.get("regressions") or []:
            lines.append(f"  regression      {regression}")
    else:
        lines.append("  none yet")
    curriculum = status["curriculum"]
    if curriculum:
        recent = ", ".join(f"{a:.2f}" for a in curriculum.get("recent", []))
        lines.append(f"curriculum      {curriculum.get('skill')} level {curriculum.get('level')}"
                     f"  recent accuracy [{recent}]  synthetic datasets {curriculum.get('datasets_submitted', 0)}")
    lines.append(f"dead letters    {status['dead_letters']}")
    return "\n".join(lines)
