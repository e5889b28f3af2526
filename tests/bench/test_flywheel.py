"""`python -m bench.flywheel` runs the whole loop for a short while and ends with one JSON line.

Not whether the targets are met (that takes 30 minutes): that it starts the stack, records from
the bus, writes its records and summary, stops, and reports every figure with the right type.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.flywheel import main
from bench.flywheel_plot import matplotlib_missing

ROOT = Path(__file__).resolve().parents[2]


def test_a_data_directory_with_an_earlier_run_is_refused(tmp_path: Path, capsys):
    (tmp_path / "nats").mkdir()
    with pytest.raises(SystemExit) as exited:
        main(["--minutes", "1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and "from the base model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_benchmark_records_the_loop_and_prints_one_json_line(tmp_path: Path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.flywheel", "--minutes", "1.5", "--data-dir", str(tmp_path / "data"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])

    assert isinstance(summary["minutes"], float) and 1.4 <= summary["minutes"] <= 2.0
    assert isinstance(summary["levels_gained"], dict) and isinstance(summary["levels_gained"]["binary"], int)
    assert summary["level1_accuracy"] is None or 0.0 <= summary["level1_accuracy"] <= 1.0
    for key in ("promotions", "noise_promotions", "overlapping_promotions", "champion_drops", "evaluations",
                "trainings", "false_promotions", "untested_promotions"):
        assert isinstance(summary[key], int) and summary[key] >= 0, key
    assert summary["targets"] == {"minutes": 30, "levels_gained": {"binary": 2},
                                  "test_accuracy": {"binary/1": 0.9, "binary/2": 0.8}, "false_promotions": 0,
                                  "novel_share": 1.0}
    assert set(summary["met"]) == {"levels_gained", "test_accuracy", "false_promotions", "novel_share"}
    assert summary["test_accuracy"] is None or all(0 <= s["low"] <= s["accuracy"] <= s["high"] <= 1
                                                   for s in summary["test_accuracy"].values())
    assert isinstance(summary["train_tokens"], int) and isinstance(summary["tokens_to_level"], list)
    # Every suite item is checked against the rows the run trained: none of them may be seen.
    assert summary["novel_items"] > 0 and summary["novel_share"] == 1.0
    assert all(isinstance(v, bool) for v in summary["met"].values())

    # Records as JSON lines, one file per kind, as many evaluations as it counted; the summary beside them.
    for kind in ("evaluations", "tests", "promotions", "level_changes", "trainings", "decisions"):
        assert (out / f"{kind}.jsonl").is_file(), kind
    evaluations = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert len(evaluations) == summary["evaluations"]
    for evaluation in evaluations:
        assert {"t", "step", "curriculum", "levels", "val_loss", "exact_match"} <= set(evaluation)
    assert json.loads((out / "summary.json").read_text())["promotions"] == summary["promotions"]
    if matplotlib_missing() is None:
        assert Path(summary["plot"]).is_file()
    # It said what it did as it went, and the stack was ready before the time ran out.
    assert any("all six services ready" in line for line in lines)
    assert summary["ready_s"] is not None
