"""The dashboard as `flywheel up` runs it: its own process, a real nats-server, real HTTP and SSE."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import DatasetAccepted, DatasetSubmitted, TrainingProgress, TrainingStarted
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dashboard(nats_server: str, tmp_path: Path):
    """`python -m services.dashboard` on a free port; yields its base URL."""
    port = free_port()
    env = {**os.environ, "FLYWHEEL_NATS_URL": nats_server, "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
           "FLYWHEEL_DASHBOARD_HTTP_PORT": str(port), "FLYWHEEL_DASHBOARD_PUSH_INTERVAL_S": "0.1",
           "FLYWHEEL_DASHBOARD_QUEUE_INTERVAL_S": "0.2", "FLYWHEEL_DASHBOARD_HEALTH_INTERVAL_S": "0.5"}
    log = (tmp_path / "dashboard.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "services.dashboard"], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


async def _ready(url: str) -> None:
    async with httpx.AsyncClient() as client:
        async def ready() -> bool:
            try:
                return (await client.get(f"{url}/ready")).status_code == 200
            except httpx.HTTPError:
                return False
        await wait_for(ready, "the dashboard to be ready", timeout=60)


def _sse_messages(lines: list[str]) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]


async def test_history_is_replayed_on_start_then_changes_stream_live_over_sse(bus: Bus, dashboard) -> None:
    url, process = dashboard
    # History from before the dashboard started: it must be replayed.
    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(id="sub1", name="hello", rows=[{"x": 1}], channel="inbox"))
    await bus.publish(topology.dataset_accepted("normal"), DatasetAccepted(
        dataset_id="d1", name="hello", uri="file:///x", sha256="0" * 64, schema="chat_sft_v1", priority="normal",
        num_rows=10, num_rows_dropped=1, report_uri="file:///r", submission_id="sub1"))
    await bus.publish(topology.TRAINING_STARTED, TrainingStarted(run_id="r1", dataset_id="d1", init_weights="base",
                                                                 total_steps=10, start_step=0, global_step=0))
    await _ready(url)
    async with httpx.AsyncClient(timeout=30) as client:
        async def caught_up() -> bool:
            return (await client.get(f"{url}/api/state")).json()["meta"]["caught_up"]
        await wait_for(caught_up, "the replay of the streams")
        state = (await client.get(f"{url}/api/state")).json()
        assert state["datasets"][0]["name"] == "hello" and state["datasets"][0]["state"] == "training"
        assert state["training"]["run_id"] == "r1" and state["queue"]["trainer-normal"]["waiting"] == 1
        assert set(state["services"]) == {"inference", "gatekeeper", "trainer", "evaluator", "deployer", "curriculum"}
        assert not state["services"]["trainer"]["ok"]  # nothing listens there in this test

        page = await client.get(f"{url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (await client.get(f"{url}/static/../settings.py")).status_code == 404

        lines: list[str] = []
        async with client.stream("GET", f"{url}/api/stream") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines_iter = stream.aiter_lines()
            first = None
            while first is None:
                line = await anext(lines_iter)
                first = json.loads(line.removeprefix("data: ")) if line.startswith("data: ") else None
            assert {"datasets", "training", "loss", "champion", "services"} <= set(first)
            for step in (1, 2, 3):
                await bus.publish(topology.TRAINING_PROGRESS, TrainingProgress(
                    run_id="r1", dataset_id="d1", step=step, total_steps=10, global_step=step, loss=1.0 / step,
                    learning_rate=1e-3, tokens_per_second=100.0))
            while not any(m.get("training", {}) and m["training"]["step"] == 3 for m in _sse_messages(lines)):
                lines.append(await anext(lines_iter))
        updates = _sse_messages(lines)
        # Only what changed is sent: no dataset or champion section rides along with progress.
        assert all("champion" not in m for m in updates)
        assert updates[-1]["loss"]["train"][-1] == {"x": 3, "y": pytest.approx(1 / 3), "run_id": "r1"}

    # SIGTERM with a browser connected: the stream ends and the process exits.
    async with httpx.AsyncClient(timeout=30) as client, client.stream("GET", f"{url}/api/stream") as stream:
        await anext(stream.aiter_lines())
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        await wait_for(lambda: process.poll() is not None, "the dashboard to exit on SIGTERM", timeout=20)
    assert process.returncode == 0 and time.monotonic() - started < 20


async def test_a_trace_link_opens_the_local_waterfall_when_no_tracing_ui_is_set(bus: Bus, dashboard, tmp_path) -> None:
    url, _ = dashboard
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traces = tmp_path / "data" / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    (traces / "gatekeeper.jsonl").write_text(json.dumps({
        "trace_id": trace_id, "span_id": "1" * 16, "parent_id": None, "name": "dataset.submitted process",
        "service": "flywheel-gatekeeper", "start_ns": 1, "end_ns": 2, "status": "OK", "attributes": {}}) + "\n")
    await _ready(url)
    async with httpx.AsyncClient() as client:
        state = (await client.get(f"{url}/api/state")).json()
        assert state["meta"]["trace_url"] == "/traces/{trace_id}"
        page = await client.get(f"{url}/traces/{trace_id}")
        assert page.status_code == 200 and "dataset.submitted process" in page.text
        assert (await client.get(f"{url}/traces/not-a-trace")).status_code == 400
