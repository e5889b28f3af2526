"""The CLI's bus-facing parts against a real nats-server: submit, verdict wait, status, settings errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from flywheel.cli import main
from flywheel.status import format_status, read_status
from flywheel.submit import describe_verdict, submit_file
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.events import DatasetAccepted, DatasetSubmitted
from libs.common.tracing import setup_tracing


@pytest.mark.integration
async def test_submit_uploads_into_the_store_and_waits_for_the_verdict(bus, tmp_path: Path):
    setup_tracing("test", None)
    store = ArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "mine.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    seen: list[DatasetSubmitted] = []

    async def fake_gatekeeper(msg):  # a peer on the real bus, answering like the gatekeeper
        event = msgspec.json.decode(msg.data, type=DatasetSubmitted)
        seen.append(event)
        await bus.publish(topology.dataset_accepted("high"), DatasetAccepted(
            dataset_id="d" * 64, name=event.name, uri=event.uri, sha256=event.sha256, schema=event.schema,
            priority="high", num_rows=1, num_rows_dropped=0, report_uri="file:///r", submission_id=event.id))

    await bus.nc.subscribe(topology.DATASET_SUBMITTED, cb=fake_gatekeeper)
    result = await submit_file(bus, store, source, priority="high", wait_s=10)
    assert result.outcome == "accepted" and len(result.trace_id) == 32
    [event] = seen
    assert event.uri == result.uri and store.verify(event.uri, event.sha256).read_bytes() == source.read_bytes()
    assert event.priority == "high" and event.channel == "cli" and event.id == result.submission_id
    assert "accepted" in describe_verdict(result)


@pytest.mark.integration
async def test_status_reads_the_loop_from_the_bus(bus):
    status = await read_status(bus)
    assert set(status["queue"]) == {"gatekeeper", "trainer-high", "trainer-normal", "trainer-low"}
    assert status["champion"] is None and status["dead_letters"] == 0
    text = format_status(status)
    assert "none yet" in text and "trainer-high" in text


def test_commands_without_a_bus_explain_what_to_set(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FLYWHEEL_NATS_URL", raising=False)
    monkeypatch.delenv("NATS_URL", raising=False)
    assert main(["status"]) == 2
    assert "FLYWHEEL_NATS_URL" in capsys.readouterr().err


def test_submit_of_a_missing_file_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["submit", str(tmp_path / "nope.jsonl")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_asyncapi_check_passes_on_the_committed_document(capsys):
    assert main(["asyncapi", "--check"]) == 0


def test_upload_streams_into_the_store(tmp_path: Path):
    from flywheel.submit import upload

    store = ArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "d.jsonl"
    source.write_bytes(b'{"a": 1}\n' * 1000)
    art = upload(store, source)
    assert store.verify(art.uri, art.sha256).read_bytes() == source.read_bytes() and art.size == source.stat().st_size
    assert "/uploads/" in art.uri
    assert not list((tmp_path / "artifacts" / "uploads").rglob(".part-*"))


def test_check_gives_the_gatekeepers_verdict_here_and_keeps_nothing(tmp_path: Path, monkeypatch, capsys,
                                                                     tiny_model_dir: Path):
    data = tmp_path / "data"
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(data))
    monkeypatch.setenv("FLYWHEEL_BASE_MODEL", str(tiny_model_dir))
    good = '{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}\n'
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(good % (i, i) for i in range(30)) + '{"messages": [{"role": "user", "content": "q"}]}\n')

    assert main(["check", str(source)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would be accepted: 30 of 31 rows kept")
    assert "has_assistant" in out and "line 31" in out and "tokens per row" in out  # standard: lengths

    assert main(["check", str(source), "--level", "quick", "--json"]) == 0
    report = msgspec.json.decode(capsys.readouterr().out)
    assert report["level"] == "quick" and report["counts"] == {"has_assistant": 1} and report["lengths"] is None

    source.write_text('{"messages": [{"role": "user", "content": "q"}]}\n' * 3)
    assert main(["check", str(source), "--level", "quick"]) == 1
    assert capsys.readouterr().out.startswith("would be rejected:\n  - ")
    assert not (data / "artifacts").exists() or not any(p.is_file() for p in (data / "artifacts").rglob("*"))
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2
