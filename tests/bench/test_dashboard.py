"""`python -m bench.dashboard` on a short history: the dashboard's replay catches up and one JSON line ends it.

Not whether the target is met (the benchmark's business, on a day's history): that the replay it
times is the dashboard's own and complete, and that every figure is reported with the right type.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_benchmark_times_the_replay_and_prints_one_json_line(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.dashboard", "--runs", "12", "--repeats", "1", "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["runs"] == 12 and summary["events"] > 0 and summary["stream_bytes"] > 0
    assert "(12 runs, 12 datasets)" in done.stdout  # every run and dataset was folded in
    assert isinstance(summary["replay_s"], float) and isinstance(summary["read_only_s"], float)
    assert 0 < summary["update_bytes"] < summary["state_bytes"]  # only the changed sections go out
    assert summary["targets"] == {"replay_s": 5.0} and isinstance(summary["met"]["replay_s"], bool)
