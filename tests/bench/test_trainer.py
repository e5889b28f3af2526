"""`python -m bench.trainer` on a few rows: both sides train, and it ends with one JSON line of figures.

Not whether the targets are met (that is the benchmark's business, on 2,000 rows): that both
Flywheel's recipe and the plain Trainer trained on the same batches' worth of tokens, that each
ended below the untrained model's held-out loss, and that every figure has the right type.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_benchmark_trains_both_sides_and_prints_one_json_line(tiny_model_dir: Path):
    data_dir = tiny_model_dir.parent.parent  # ensure_base_model(data_dir) made data_dir/models/tiny-qwen3
    done = subprocess.run(
        [sys.executable, "-m", "bench.trainer", "--rows", "64", "--heldout", "16", "--threads", "1",
         "--data-dir", str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert f"base model {tiny_model_dir}" in done.stdout  # reused, not created again

    assert summary["rows"] == 64 and summary["heldout_rows"] == 16 and summary["batch_size"] == 8
    assert summary["device"] == "cpu" and summary["threads"] == 1 and summary["epochs"] == 1
    # One epoch of 64 rows: batches of 8 on the plain side; packed steps of about the same tokens on
    # Flywheel's, over the same real tokens.
    assert summary["plain_steps"] == 8 and summary["batching"] == "packed"
    assert summary["batch_tokens"] % summary["pack_length"] == 0 and 5 <= summary["steps"] <= 12
    assert isinstance(summary["real_tokens"], int) and summary["real_tokens"] > 64
    assert isinstance(summary["parameters"], int) and summary["parameters"] > 0
    for key in ("flywheel_tokens_per_s", "plain_tokens_per_s", "vs_plain", "flywheel_train_s", "plain_train_s",
                "flywheel_cpu_share", "plain_cpu_share"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    for key in ("padding_efficiency", "plain_padding_efficiency"):
        assert isinstance(summary[key], float) and 0 < summary[key] <= 1, key
    # Both trained: each ends below the untrained model's held-out loss.
    untrained = summary["untrained_heldout_loss"]
    assert summary["flywheel_heldout_loss"] < untrained and summary["plain_heldout_loss"] < untrained
    assert isinstance(summary["loss_gap"], float) and isinstance(summary["quiet"], bool)
    assert summary["targets"] == {"vs_plain": 1.5, "padding_efficiency": 0.95, "loss_gap": 0.02}
    assert set(summary["met"]) == set(summary["targets"]) and all(isinstance(v, bool) for v in summary["met"].values())
    assert "mfu" not in summary  # only with --device cuda
    assert any(line.startswith("flywheel ") for line in lines) and any(line.startswith("plain ") for line in lines)
