"""The README's "any NATS client" example really produces a valid `dataset.submitted` event."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from libs.common.events import DatasetSubmitted

ROOT = Path(__file__).resolve().parents[1]


def readme_nats_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [example] = [b for b in blocks if "dataset.submitted" in b]
    return "\n".join(line[3:] if line.startswith("   ") else line for line in example.splitlines())


def test_example_imports_nothing_from_flywheel():
    assert not re.search(r"^\s*(from|import)\s+(libs|services|flywheel)\b", readme_nats_example(), flags=re.M)


@pytest.mark.integration
async def test_example_publishes_an_event_the_gatekeeper_can_decode(bus, nats_server: str, tmp_path: Path):
    script = tmp_path / "example.py"
    script.write_text(readme_nats_example().replace("nats://127.0.0.1:4222", nats_server))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    sub = await bus.js.pull_subscribe("dataset.submitted", durable="readme-check", stream="DATASETS")
    [msg] = await sub.fetch(1, timeout=5)
    event = msgspec.json.decode(msg.data, type=DatasetSubmitted)
    assert event.name == "my-first-dataset" and event.priority == "high" and event.rows
    assert msg.headers["Nats-Msg-Id"] == event.id
