"""`flywheel status --watch`: the status redrawn live, with a progress bar for the running dataset.

Each frame is `flywheel status` read from the bus again (`read_status`) plus two lines for the
run in training: a bar, step/total, epoch, loss, learning rate, tokens/s and the time left; then
the gradient norm, the validation loss on the dataset's held-out slice and the train/val gap.
All of it is the run's latest `training.progress` as the trainer computed it (the time left too:
the trainer knows its recent pace without the checkpoint and validation pauses).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from flywheel.status import format_status, read_status, run_in_training
from libs.common.bus import Bus

BAR_WIDTH = 30
CLEAR = "\x1b[H\x1b[2J"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(started: dict, progress: dict, width: int = BAR_WIDTH) -> str:
    """`[#########.....] 300/2016 15%  epoch 0.30  loss 0.0540  lr 9.6e-04  11382 tok/s  ETA 4m47s`,
    then `grad norm 1.21  val loss 0.0602  gap +0.0062` (what the trainer reported)."""
    step, total = progress["step"], max(1, progress["total_steps"])
    done = min(width, round(width * step / total))
    eta = progress.get("eta_s")
    line = (f"[{'#' * done}{'.' * (width - done)}] {step}/{total} {100 * step / total:.0f}%"
            f"  epoch {progress.get('epoch', 0.0):.2f}  loss {progress['loss']:.4f}  lr {progress['learning_rate']:.1e}"
            f"  {progress['tokens_per_second']:.0f} tok/s  ETA {_duration(eta) if eta is not None else '?'}")
    details = []
    if progress.get("grad_norm") is not None:
        details.append(f"grad norm {progress['grad_norm']:.3g}")
    if progress.get("val_loss") is not None:
        details.append(f"val loss {progress['val_loss']:.4f}")
    if progress.get("train_val_gap") is not None:
        details.append(f"gap {progress['train_val_gap']:+.4f}")
    return line + ("\n" + "  ".join(details) if details else "")


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
