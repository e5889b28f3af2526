"""At least once, nothing lost: an accepted dataset whose announcement failed is announced later, never a duplicate.

On a real nats-server. Publishing is made to fail for real by deleting the JetStream stream that
holds `dataset.accepted.*` (the publish then gets no ack: "no responders"), and tried once, not
five times with backoff, so each failure takes milliseconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import msgspec
import nats.errors
import pytest
from fastapi import FastAPI

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import DatasetAccepted, DatasetRejected
from libs.common.http import ServiceMetrics
from libs.common.runtime import ServiceRuntime
from libs.common.settings import load_settings
from services.gatekeeper import service as gatekeeper_service
from services.gatekeeper.api import router
from services.gatekeeper.duplicates import AcceptedIndex
from services.gatekeeper.intake import Submission
from services.gatekeeper.service import SERVICE, GatekeeperService
from services.gatekeeper.settings import GatekeeperSettings
from services.gatekeeper.verdict import accepted_event_id
from tests.conftest import wait_for
from tests.services.gatekeeper.samples import good_rows, jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a nats-server; the tiny tokenizer

STREAM = topology.stream_for(topology.dataset_accepted("normal"))


@pytest.fixture(autouse=True)
def _publish_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gatekeeper_service, "_PUBLISH_ATTEMPTS", 1)


@pytest.fixture
def settings(nats_server: str, tmp_path: Path, tiny_model_dir: Path) -> GatekeeperSettings:
    return load_settings(
        GatekeeperSettings, "gatekeeper", environ={}, nats_url=nats_server, data_dir=str(tmp_path / "data"),
        base_model=str(tiny_model_dir), http_port=0,
    )


def service_on(settings: GatekeeperSettings, bus: Bus) -> GatekeeperService:
    """The service without its runtime (no consumer, no loops), publishing through the test's bus."""
    return GatekeeperService(settings, bus, ServiceMetrics("gatekeeper"), ArtifactStore(settings.artifacts_dir))


def http_client(service: GatekeeperService) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(router(service))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gatekeeper")


async def announcements(bus: Bus, kind=DatasetAccepted, subject: str = "dataset.accepted.>",
                        quiet_s: float = 1.0) -> list:
    """Every event on `subject` the stream holds (read from its start), once nothing more comes for `quiet_s`."""
    sub = await bus.js.subscribe(subject)
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=quiet_s)
            found.append(msgspec.json.decode(msg.data, type=kind))
    except TimeoutError:
        return found
    finally:
        await sub.unsubscribe()


async def test_an_announcement_that_failed_is_made_on_the_retry_not_called_a_duplicate(
    settings: GatekeeperSettings, bus: Bus
):
    service = service_on(settings, bus)
    data = jsonl(good_rows(4, tag=" retried"))
    async with http_client(service) as client:
        await bus.js.delete_stream(STREAM)
        reply = await client.post("/datasets", params={"name": "retried", "level": "quick"}, content=data)
        assert reply.status_code == 503, reply.text
        failed_id = reply.json()["detail"].split()[1]  # "submission <id> failed: ..."

        await bus.ensure_topology()  # NATS is back
        assert await announcements(bus, quiet_s=0.3) == []

        reply = await client.post("/datasets", params={"name": "retried", "level": "quick"}, content=data)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "accepted", body
        # The same report, so the same event as the failed attempt would have sent.
        assert body["submission_id"] == failed_id and body["report"]["num_rows_valid"] == 4
        dataset_id = body["report"]["dataset_id"]
        [event] = await announcements(bus)
        assert event.dataset_id == dataset_id and event.id == accepted_event_id(dataset_id)
        assert event.submission_id == failed_id and event.name == "retried"
        assert service.gatekeeper.index.get(dataset_id).announced

        # Announced now: the same content once more is a duplicate, as ever.
        reply = await client.post("/datasets", params={"name": "again", "level": "quick"}, content=data)
        assert reply.status_code == 200 and reply.json()["status"] == "duplicate"
        assert reply.json()["report"]["duplicate_of"] == failed_id
        [rejected] = await announcements(bus, DatasetRejected, topology.DATASET_REJECTED)
        assert rejected.dataset_id == dataset_id and rejected.reasons[0].startswith(f"duplicate of {dataset_id}")
        assert len(await announcements(bus)) == 1


async def test_a_restart_announces_what_was_accepted_but_never_announced(
    settings: GatekeeperSettings, bus: Bus, tmp_path: Path
):
    first = service_on(settings, bus)
    upload = tmp_path / "lost.jsonl"
    upload.write_bytes(jsonl(good_rows(3, tag=" lost")))
    submission = Submission(submission_id="lost-1", name="lost", channel="http", source="lost.jsonl", level="quick")
    await bus.js.delete_stream(STREAM)
    with pytest.raises(nats.errors.Error):
        await first.submit_file(submission, upload, move=True)
    await bus.ensure_topology()
    [entry] = AcceptedIndex(settings.service_dir("gatekeeper") / "accepted").recent(10)
    assert entry.submission_id == "lost-1"
    # The client never retries: the next start announces it.

    accepted = await bus.js.subscribe("dataset.accepted.>")
    rt = ServiceRuntime("gatekeeper", settings, shutdown_grace_s=10)
    task = asyncio.create_task(rt.run(SERVICE))
    try:
        msg = await accepted.next_msg(timeout=20)  # announced at start, without anyone asking
        assert msgspec.json.decode(msg.data, type=DatasetAccepted).dataset_id == entry.dataset_id
        await wait_for(lambda: AcceptedIndex(settings.service_dir("gatekeeper") / "accepted").get(
            entry.dataset_id).announced, "the entry to be marked announced", interval=0.05)
        [event] = await announcements(bus)
        assert event.dataset_id == entry.dataset_id and event.submission_id == "lost-1"
        assert event.id == accepted_event_id(entry.dataset_id) and event.num_rows == 3

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url="http://gk") as client:
            reply = await client.post("/datasets", params={"level": "quick"}, content=jsonl(good_rows(3, tag=" lost")))
        assert reply.status_code == 200 and reply.json()["status"] == "duplicate"
        assert len(await announcements(bus)) == 1
    finally:
        rt.stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def test_the_sweep_keeps_trying_while_publishing_fails_and_never_holds_up_the_service(
    settings: GatekeeperSettings, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(gatekeeper_service, "_SWEEP_RETRY_S", 0.1, raising=False)
    monkeypatch.setattr(gatekeeper_service, "_SWEEP_RETRY_MAX_S", 0.2, raising=False)
    service = service_on(settings, bus)
    upload = tmp_path / "late.jsonl"
    upload.write_bytes(jsonl(good_rows(2, tag=" late")))
    await bus.js.delete_stream(STREAM)
    with pytest.raises(nats.errors.Error):
        await service.submit_file(Submission(submission_id="late-1", name="late", channel="inbox", source="late.jsonl",
                                             level="quick"), upload, move=False)

    stop = asyncio.Event()
    sweep = asyncio.create_task(service.sweep_unannounced(stop))
    await asyncio.sleep(1.0)  # several failed passes
    assert not sweep.done(), "the sweep must keep trying, not crash or give up"

    await bus.ensure_topology()
    [entry] = service.gatekeeper.index.recent(10)
    await wait_for(lambda: service.gatekeeper.index.get(entry.dataset_id).announced, "the sweep to announce it",
                   interval=0.05)
    [event] = await announcements(bus)
    assert event.submission_id == "late-1" and event.id == accepted_event_id(entry.dataset_id)
    stop.set()
    await asyncio.wait_for(sweep, 5)

    # The inbox resumes the file at its next start, under the same submission id: its stored
    # report is returned and, the index recording it announced, not published a second time
    # (JetStream would drop it inside its duplicate window, not after: so count the publishes).
    published = []
    publish = bus.publish

    async def counted(subject, event, **kw):
        published.append(subject)
        return await publish(subject, event, **kw)

    monkeypatch.setattr(bus, "publish", counted)
    resumed = await service.submit_file(Submission(submission_id="late-1", name="late", channel="inbox",
                                                   source="late.jsonl", level="quick"), upload, move=False)
    assert resumed.status == "accepted" and resumed.dataset_id == entry.dataset_id
    assert published == [] and len(await announcements(bus)) == 1
