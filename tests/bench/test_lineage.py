"""`python -m bench.lineage` on a short history: it publishes, times and ends with one JSON line.

Not whether the target is met (that is the benchmark's business, on a day's history): that the
lineage it times is the whole chain, the same as a full replay finds and the same after a restart,
and that every figure is reported with the right type.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.lineage import Day

ROOT = Path(__file__).resolve().parents[2]


def test_a_day_chains_every_run_from_the_base_and_promotes_some():
    day = Day(12)
    started = [e for s, e, _ in day.events if s == "training.started"]
    assert started[0].init_weights.startswith("file:///") and "/checkpoints/" not in started[0].init_weights
    assert all("/checkpoints/" in e.init_weights for e in started[1:])
    assert any(e.start_step > 0 for e in started)  # a resumed run
    inline = [e for s, e, _ in day.events if s == "dataset.submitted" and e.rows]
    assert inline and all(len(e.rows) == 1000 for e in inline)
    assert day.champion is not None and day.champion.run_id != "base"
    assert len({t for _, _, t in day.events}) == 13  # one trace per run, and the base's


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_benchmark_times_the_lineage_and_prints_one_json_line(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.lineage", "--runs", "12", "--repeats", "2", "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    # The served model: the newest promoted run's (one in five is promoted: the 10th), back through all before it.
    assert summary["runs"] == 12 and summary["chain_length"] == 10
    assert summary["events"] > summary["events_used"] > 0 and summary["stream_bytes"] > 0
    for key in ("lineage_s", "read_s", "submissions_s", "build_s", "full_replay_s", "after_restart_first_s",
                "after_restart_s", "speedup_vs_full_replay"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    assert summary["same_after_restart"] is True
    assert summary["target_s"] == 1.0 and isinstance(summary["met"]["lineage_s"], bool)
    assert any("10 hops back to the base model" in line for line in lines)
