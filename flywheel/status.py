"""The loop's state, read from the bus alone: queue depth, training, champion, scores, curriculum.

Nothing here reads a service's files: streams and KV buckets are the shared history, so
`flywheel status` works from any machine that reaches NATS.
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.js.errors

from libs.common import topology
from libs.common.bus import Bus
from libs.common.records import CHAMPION, TRAINER_CONTROL, Key, skill_state
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


async def read_status(bus: Bus) -> dict[str, Any]:
    queue = {}
    for spec in (topology.GATEKEEPER, *topology.TRAINER):
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        queue[spec.durable] = {"waiting": info.num_pending, "in_progress": info.num_ack_pending}
    dead = await bus.js.stream_info("DEADLETTER")
    last_started = await _last(bus, topology.TRAINING_STARTED)
    last_progress = await _last(bus, topology.TRAINING_PROGRESS)
    last_finished = await _last(bus, topology.TRAINING_FINISHED)
    return {
        "queue": queue,
        "training": {"started": last_started, "progress": last_progress, "finished": last_finished},
        "trainer_control": await _record(bus, TRAINER_CONTROL),
        "champion": await _record(bus, CHAMPION),
        "last_scores": await _last(bus, topology.EVAL_SCORED),
        "curriculum": await _record(bus, skill_state(binary.SKILL)),
        "dead_letters": dead.state.messages,
    }


def format_status(status: dict[str, Any]) -> str:
    lines = ["queue"]
    for durable, q in status["queue"].items():
        lines.append(f"  {durable:<16} waiting {q['waiting']:>4}   in progress {q['in_progress']:>2}")
    training = status["training"]
    started, progress, finished = training["started"], training["progress"], training["finished"]
    lines.append("training")
    control = status["trainer_control"]
    if control:
        lines.append(f"  control         {control.get('mode')} (by {control.get('requested_by')})")
    if started and (not finished or finished["run_id"] != started["run_id"] or finished["time"] < started["time"]):
        step = progress if progress and progress["run_id"] == started["run_id"] else None
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
        lines.append(f"  {champion.get('run_id')} step {champion.get('step')}  exact_match {champion.get('exact_match', 0):.3f}"
                     f"  val_loss {champion.get('val_loss', 0):.4f}")
        lines.append(f"  {champion.get('checkpoint_uri')}")
    else:
        lines.append("  none yet (serving the base model)")
    scores = status["last_scores"]
    lines.append("last scores")
    if scores:
        lines.append(f"  {scores['run_id']} step {scores['step']}  exact_match {scores['exact_match']:.3f}  "
                     f"val_loss {scores['val_loss']:.4f}  suite {scores['suite_version']}")
    else:
        lines.append("  none yet")
    curriculum = status["curriculum"]
    if curriculum:
        recent = ", ".join(f"{a:.2f}" for a in curriculum.get("recent", []))
        lines.append(f"curriculum      {curriculum.get('skill')} level {curriculum.get('level')}"
                     f"  recent accuracy [{recent}]  synthetic datasets {curriculum.get('datasets_submitted', 0)}")
    lines.append(f"dead letters    {status['dead_letters']}")
    return "\n".join(lines)
