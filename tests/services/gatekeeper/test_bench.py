"""`python -m bench.gatekeeper` runs end to end on a small file and ends with one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_the_benchmark_prints_its_figures_and_one_json_line(tmp_path: Path, tiny_model_dir: Path):
    data_dir = tiny_model_dir.parents[1]  # where ensure_base_model finds the tiny model already made
    done = subprocess.run(
        [sys.executable, "-m", "bench.gatekeeper", "--rows", "2000", "--data-dir", str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["rows"] == 2000 and summary["targets"] == {"quick_vs_baseline": 5.0, "standard_rows_per_s": 20000.0}
    assert set(summary["met"]) == {"quick_vs_baseline", "standard_rows_per_s"}
    assert all(summary[key] > 0 for key in ("baseline_rows_per_s", "quick_rows_per_s", "standard_rows_per_s",
                                            "deep_rows_per_s"))
    assert any(line.startswith("baseline") for line in lines) and any(line.startswith("deep") for line in lines)
    assert set(summary["normalised_rows_per_s"]) == {"quick", "standard", "deep"}
    assert summary["quick_normalised_vs_baseline"] > 0
