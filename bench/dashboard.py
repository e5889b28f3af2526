"""The dashboard's read model on a day of the loop's history: how long a restart takes to replay it,
and what a live update costs a browser.

    .venv/bin/python -m bench.dashboard [--runs 300] [--repeats 3] [--data-dir DIR]

Starts a real nats-server on a fresh store and publishes a day of the loop (`bench.lineage.Day`:
--runs runs with their datasets, 1,000 inline rows for two in three, progress, checkpoints, scores
and promotions). Then, --repeats times, the dashboard's own code (`Dashboard.follow_streams` and
`watch_records`, as `python -m services.dashboard` runs them) replays every stream and bucket into a
fresh read model, timed until it has caught up; the baseline, in the same run, is reading and
decoding the same streams without folding them (`libs.common.history.read_history`). Last, one
`training.progress` is folded in and the update a browser is sent for it (only the changed
sections) is compared with the whole state, which is what sending everything would cost.
Target: caught up within 5 s of a restart on a day's history. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from bench.lineage import ALL_SUBJECTS, Day, publish
from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import TrainingProgress
from libs.common.history import Recorded, read_history
from libs.common.log import setup_logging
from libs.common.nats_server import NatsServer
from libs.common.settings import load_settings
from services.dashboard.read_model import SECTIONS
from services.dashboard.service import Dashboard
from services.dashboard.settings import DashboardSettings

TARGETS = {"replay_s": 5.0}


async def replay(bus: Bus) -> tuple[float, Dashboard]:
    """A fresh dashboard's replay of the streams and KV, timed until it has caught up."""
    settings = load_settings(DashboardSettings, "dashboard", environ={}, nats_url="unused")
    board = Dashboard(settings, bus, Path("."), urls={})
    stop = asyncio.Event()
    started = time.perf_counter()
    tasks = [asyncio.create_task(board.follow_streams(stop)), asyncio.create_task(board.watch_records(stop))]
    while not (board.model.caught_up and board.model.champion is not None):
        await board.wait_for_change(1.0)
    seconds = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    return seconds, board


async def measure(url: str, repeats: int) -> dict:
    bus = await Bus.connect([url], "bench")
    try:
        replays = [await replay(bus) for _ in range(repeats)]
        reads = []
        for _ in range(repeats):
            started = time.perf_counter()
            records = await read_history(bus, ALL_SUBJECTS)
            reads.append(time.perf_counter() - started)
        board = replays[-1][1]
        seen = {name: board.model.versions[name] for name in SECTIONS}
        whole = len(msgspec.json.encode(board.model.snapshot()))
        newest = board.model.train_points[-1]
        progress = TrainingProgress(run_id=newest["run_id"], dataset_id="d", step=1, total_steps=125,
                                    global_step=newest["x"] + 1, loss=0.1, learning_rate=1e-4, tokens_per_second=1e4)
        board.model.apply(Recorded(stream="TRAINING", seq=0, subject=topology.TRAINING_PROGRESS,
                                   stored=progress.time, trace_id="", event=progress))
        changed = board.model.changed_since(seen)
        update = len(msgspec.json.encode(board.model.snapshot(changed)))
        return {"replay_s": [s for s, _ in replays], "read_s": reads, "events": len(records),
                "state_bytes": whole, "update_bytes": update, "update_sections": changed,
                "datasets": len(board.model.datasets), "runs": len(board.model.runs)}
    finally:
        await bus.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="runs in the history (default 300, a day of the loop)")
    parser.add_argument("--repeats", type=int, default=3, help="timed replays (default 3; the median counts)")
    parser.add_argument("--data-dir", type=Path, help="where nats-server keeps its store (default: a temporary folder)")
    args = parser.parse_args(argv)
    setup_logging("bench", "warning")

    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        store = (args.data_dir or Path(tmp)) / "nats"
        day = Day(args.runs)
        server = NatsServer(store)
        url = server.start()
        try:
            async def fill() -> int:
                bus = await Bus.connect([url], "bench")
                try:
                    await bus.ensure_topology()
                    await publish(bus, day)
                    return sum([(await bus.js.stream_info(s.name)).state.bytes for s in topology.STREAMS])
                finally:
                    await bus.close()

            stream_bytes = asyncio.run(fill())
            print(f"published a day of the loop: {args.runs} runs, {len(day.events):,} events, "
                  f"{stream_bytes / 1e6:.0f} MB of streams")
            result = asyncio.run(measure(url, args.repeats))
        finally:
            server.stop()

    replay_s, read_s = statistics.median(result["replay_s"]), statistics.median(result["read_s"])
    print(f"dashboard replay of every stream and bucket until caught up: median {replay_s:.2f} s of "
          f"{', '.join(f'{s:.2f}' for s in result['replay_s'])} s ({result['runs']} runs, {result['datasets']} datasets)")
    print(f"baseline, reading and decoding the same {result['events']:,} messages without folding them: "
          f"median {read_s:.2f} s")
    print(f"a live training.progress sends {result['update_bytes'] / 1e3:.0f} kB "
          f"({', '.join(result['update_sections'])}) instead of the whole state, {result['state_bytes'] / 1e3:.0f} kB")
    summary = {
        "runs": args.runs,
        "events": len(day.events),
        "stream_bytes": stream_bytes,
        "replay_s": round(replay_s, 3),
        "read_only_s": round(read_s, 3),
        "state_bytes": result["state_bytes"],
        "update_bytes": result["update_bytes"],
        "targets": TARGETS,
        "met": {"replay_s": replay_s <= TARGETS["replay_s"]},
    }
    print(msgspec.json.encode(summary).decode())
    return summary


if __name__ == "__main__":
    main()
