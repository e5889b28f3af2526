"""`flywheel status --watch`: the status redrawn live, with a progress bar for the running dataset.

Each frame is `flywheel status` read from the bus again (`read_status`) plus one line for the
run in training: a bar, step/total, loss, learning rate, tokens/s and the time left. The time
left comes from the run's own pace: the seconds from its `training.started` to its latest
`training.progress`, per step done, times the steps to go.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from typing import Any, TextIO

from flywheel.status import format_status, read_status, run_in_training
from libs.common.bus import Bus

BAR_WIDTH = 30
CLEAR = "\x1b[H\x1b[2J"


def _when(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def eta_s(started: dict, progress: dict) -> float | None:
    """Seconds left in the run at the pace it has kept so far; None before its first step."""
    step, total = progress["step"], progress["total_steps"]
    if step <= 0:
        return None
    elapsed = (_when(progress["time"]) - _when(started["time"])).total_seconds()
    return max(0.0, elapsed / step * (total - step))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(started: dict, progress: dict, width: int = BAR_WIDTH) -> str:
    """`[#########.....] 300/2016 15%  loss 0.0540  lr 9.6e-04  11382 tok/s  ETA 4m47s`."""
    step, total = progress["step"], max(1, progress["total_steps"])
    done = min(width, round(width * step / total))
    eta = eta_s(started, progress)
    return (f"[{'#' * done}{'.' * (width - done)}] {step}/{total} {100 * step / total:.0f}%"
            f"  loss {progress['loss']:.4f}  lr {progress['learning_rate']:.1e}"
            f"  {progress['tokens_per_second']:.0f} tok/s  ETA {_duration(eta) if eta is not None else '?'}")


def running(status: dict[str, Any]) -> tuple[dict, dict] | None:
    """The run in training and its latest progress, once it has reported a step."""
    if (live := run_in_training(status)) and live[1]:
        return live[0], live[1]
    return None


def frame(status: dict[str, Any]) -> str:
    text = format_status(status)
    if live := running(status):
        text += f"\n\n{live[0]['run_id']}\n{progress_line(*live)}"
    return text


async def watch(bus: Bus, *, interval_s: float = 1.0, frames: int = 0, out: TextIO = sys.stdout) -> None:
    """Redraw the status every `interval_s` until interrupted (or `frames` times, if set)."""
    shown = 0
    while not frames or shown < frames:
        text = frame(await read_status(bus))
        # On a terminal each frame replaces the last; into a pipe or file they follow each other.
        out.write((CLEAR if out.isatty() else "") + text + "\n")
        out.flush()
        shown += 1
        if not frames or shown < frames:
            await asyncio.sleep(interval_s)
