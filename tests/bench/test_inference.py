"""`python -m bench.inference` with a light load: both servers answer, a reload under load swaps the model,
and one JSON line of figures ends it.

Not whether the targets are met (the benchmark's business, at 1, 8 and 16 clients of 64 tokens): that
every request was answered and counted, that the reload really swapped the served model, and that every
figure has the right type (null where its level was not run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEVEL_KEYS = {"requests", "failed", "completion_tokens", "mean_completion_tokens", "seconds", "tokens_per_s",
              "p50_latency_s", "p95_latency_s", "p50_ttft_s", "p95_ttft_s", "tokens_from", "errors"}

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def run_bench(data_dir: Path, *args: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.inference", "--requests-per-client", "1", "--max-tokens", "8",
         "--reload-clients", "2", "--threads", "1", "--data-dir", str(data_dir), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def check_levels(levels: dict, clients: list[int]) -> None:
    assert set(levels) == {str(c) for c in clients}
    for count in clients:
        figures = levels[str(count)]
        assert set(figures) == LEVEL_KEYS
        assert figures["requests"] == count and figures["failed"] == 0 and figures["errors"] == []
        assert figures["completion_tokens"] >= count  # every answer had content
        assert figures["tokens_from"] == ["usage"]
        for key in LEVEL_KEYS - {"requests", "failed", "completion_tokens", "tokens_from", "errors"}:
            assert isinstance(figures[key], float) and figures[key] > 0, (count, key)
        assert figures["p50_ttft_s"] <= figures["p50_latency_s"]


def check_reload(summary: dict) -> None:
    reload = summary["reload"]
    assert reload["clients"] == 2 and reload["swapped"] is True and reload["failed"] == 0
    assert reload["requests"] >= 4 and reload["overlapping_reload"] >= 1  # each client sent after the reload too
    assert summary["failed_during_reload"] == 0 and summary["met"]["failed_during_reload"] is True


def check_targets(summary: dict) -> None:
    assert summary["targets"] == {"batching_gain_8": 3.0, "vs_peer_8": 1.0, "vs_peer_16": 1.0, "failed_during_reload": 0}
    assert set(summary["met"]) == set(summary["targets"]) and all(isinstance(v, bool) for v in summary["met"].values())


@pytest.mark.timeout(180)
def test_flywheel_alone_is_measured_and_reloads_without_failures(tiny_model_dir: Path):
    data_dir = tiny_model_dir.parent.parent  # ensure_base_model(data_dir) made data_dir/models/tiny-qwen3
    summary, stdout = run_bench(data_dir, "--clients", "1,2", "--skip-peer")
    assert f"model {tiny_model_dir} ready" in stdout  # reused, not created again
    assert summary["clients"] == [1, 2] and summary["max_tokens"] == 8 and summary["requests_per_client"] == 1
    check_levels(summary["flywheel"], [1, 2])
    assert summary["peer"] is None and summary["peer_runs"] == {}
    assert summary["flywheel_runs"] == {"1": summary["flywheel"]}
    assert summary["batching_gain_8"] is None and summary["vs_peer_8"] is None and summary["vs_peer_16"] is None
    assert summary["met"]["batching_gain_8"] is False and summary["met"]["vs_peer_8"] is False
    check_reload(summary)
    check_targets(summary)


@pytest.mark.timeout(240)
def test_flywheel_and_the_peer_get_the_same_load_and_are_compared(tiny_model_dir: Path):
    summary, stdout = run_bench(tiny_model_dir.parent.parent, "--clients", "1,8")
    check_levels(summary["flywheel"], [1, 8])
    check_levels(summary["peer"], [1, 8])
    assert summary["threads"] == [1] and summary["peer_runs"] == {"1": summary["peer"]}
    assert summary["flywheel_runs"] == {"1": summary["flywheel"]}
    assert isinstance(summary["batching_gain_8"], float) and summary["batching_gain_8"] > 0
    assert isinstance(summary["vs_peer_8"], float) and summary["vs_peer_8"] > 0
    assert summary["vs_peer_16"] is None and summary["met"]["vs_peer_16"] is False  # 16 clients not run
    check_reload(summary)
    check_targets(summary)
    assert "peer: transformers serve --continuous-batching, 1 torch threads, ready" in stdout
