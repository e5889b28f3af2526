"""The gatekeeper service on a real nats-server: NATS, HTTP and inbox in, accepted/rejected out."""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.chat import ChatRow
from libs.common.events import DatasetAccepted, DatasetRejected, DatasetSubmitted
from libs.common.runtime import ServiceRuntime
from libs.common.settings import load_settings
from services.gatekeeper.api import ASYNCAPI
from services.gatekeeper.service import SERVICE
from services.gatekeeper.settings import GatekeeperSettings
from services.gatekeeper.verdict import accepted_event_id
from tests.conftest import wait_for
from tests.services.gatekeeper.samples import chat, good_rows, jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a nats-server; the tiny tokenizer


class Running:
    def __init__(self, rt: ServiceRuntime, client: httpx.AsyncClient, store: ArtifactStore) -> None:
        self.rt, self.client, self.store = rt, client, store
        self.settings: GatekeeperSettings = rt.settings


async def _ready(client: httpx.AsyncClient, task: asyncio.Task) -> bool:
    assert not task.done(), "the gatekeeper stopped while starting"
    return (await client.get("/ready")).status_code == 200


@pytest.fixture
async def gatekeeper(nats_server: str, bus: Bus, tmp_path: Path, tiny_model_dir: Path):
    settings = load_settings(
        GatekeeperSettings, "gatekeeper", environ={}, nats_url=nats_server, data_dir=str(tmp_path / "data"),
        base_model=str(tiny_model_dir), http_port=0, settle_seconds=0.5,
    )
    rt = ServiceRuntime("gatekeeper", settings, shutdown_grace_s=10)
    task = asyncio.create_task(rt.run(SERVICE))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url="http://gatekeeper")
    await wait_for(lambda: _ready(client, task), "the gatekeeper to become ready", interval=0.1)
    try:
        yield Running(rt, client, ArtifactStore(tmp_path / "data" / "artifacts"))
    finally:
        rt.stop.set()
        assert await asyncio.wait_for(task, 30) == 0
        await client.aclose()


async def next_event(sub, kind, timeout: float = 15.0):
    msg = await sub.next_msg(timeout=timeout)
    return msg.subject, msgspec.json.decode(msg.data, type=kind)


async def test_inline_submission_is_accepted_then_recognised_as_duplicate(gatekeeper: Running, bus: Bus):
    accepted = await bus.js.subscribe("dataset.accepted.>")
    rejected = await bus.js.subscribe(topology.DATASET_REJECTED)
    rows = good_rows(10)
    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="sums", rows=rows, priority="low"))

    subject, event = await next_event(accepted, DatasetAccepted)
    assert subject == "dataset.accepted.low" and event.name == "sums" and event.num_rows == 10
    assert event.id == accepted_event_id(event.dataset_id) and event.source == "gatekeeper"
    path = gatekeeper.store.verify(event.uri, event.sha256)
    stored = [msgspec.json.decode(line, type=ChatRow) for line in path.read_bytes().splitlines()]
    assert len(stored) == 10 and stored[0].messages[1].content == "0"

    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="again", rows=rows, priority="high"))
    _, dup = await next_event(rejected, DatasetRejected)
    assert dup.name == "again" and dup.dataset_id == event.dataset_id
    assert dup.reasons == [f"duplicate of {event.dataset_id} (accepted as submission {event.submission_id})"]
    with pytest.raises(TimeoutError):
        await accepted.next_msg(timeout=1)
    report = (await gatekeeper.client.get(f"/datasets/{dup.submission_id}/report")).json()
    assert report["status"] == "duplicate" and report["duplicate_of"] == event.submission_id


async def test_bad_submissions_are_rejected_with_report_and_original_kept(gatekeeper: Running, bus: Bus):
    rejected = await bus.js.subscribe(topology.DATASET_REJECTED)
    rows = [chat(("user", "hi"), ("bot", "hello"))] + good_rows(2)
    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="roles", rows=rows))
    _, event = await next_event(rejected, DatasetRejected)
    assert event.name == "roles" and event.num_errors == 1 and "role (1)" in event.reasons[0]
    assert event.reasons[1] == "role: 1 row (line 1): messages[1].role is 'bot'; allowed: system, user, assistant"
    report = (await gatekeeper.client.get(f"/datasets/{event.submission_id}/report")).json()
    assert report["findings"]["role"] == {
        "level": "quick", "severity": "error", "scope": "row", "count": 1,
        "findings": [{"line": 1, "reason": "messages[1].role is 'bot'; allowed: system, user, assistant"}]}
    assert report["level"] == "standard" and "token_length" in report["checks_run"]
    assert gatekeeper.store.path_for(report["original_uri"]).read_bytes() == jsonl(rows)

    outside = Path(gatekeeper.settings.data_dir).resolve() / "elsewhere.jsonl"
    outside.write_bytes(jsonl(good_rows(1)))
    traversal = gatekeeper.store.root.as_uri() + "/../elsewhere.jsonl"
    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="escape", uri=traversal))
    _, event = await next_event(rejected, DatasetRejected)
    assert event.name == "escape" and event.reasons[0].startswith("uri: ") and "outside" in event.reasons[0]

    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="x", schema="nope", rows=good_rows(1)))
    _, event = await next_event(rejected, DatasetRejected)
    assert event.reasons == ["schema: unknown schema 'nope'; known: chat_sft_v1, syllo_v1, completion_v1"]


async def test_an_http_rejection_answers_in_the_error_shape_and_the_bodies_are_documented(gatekeeper: Running):
    # Found by tests/fuzz: a rejected submission's 422 had no `detail`, unlike every other 4xx; and
    # the document declared no body, so no client (nor the fuzz) could learn what to send.
    response = await gatekeeper.client.post("/datasets?name=empty", content=b"")
    assert response.status_code == 422 and response.json()["status"] == "rejected"
    assert response.json()["detail"] == "rejected: file_empty: the file is empty"
    paths = (await gatekeeper.client.get("/openapi.json")).json()["paths"]
    assert set(paths["/datasets"]["post"]["requestBody"]["content"]) == {"application/x-ndjson", "application/gzip"}
    assert "multipart/form-data" in paths["/datasets/upload"]["post"]["requestBody"]["content"]


async def test_http_body_and_multipart_uploads(gatekeeper: Running, bus: Bus):
    accepted = await bus.js.subscribe("dataset.accepted.>")
    rejected = await bus.js.subscribe(topology.DATASET_REJECTED)
    client = gatekeeper.client

    reply = await client.post("/datasets", params={"name": "body", "priority": "high"}, content=jsonl(good_rows(3)))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "accepted" and body["report"]["num_rows_valid"] == 3
    assert body["report"]["level"] == "standard" and body["report"]["channel"] == "http"
    subject, event = await next_event(accepted, DatasetAccepted)
    assert subject == "dataset.accepted.high" and event.submission_id == body["submission_id"]

    bad = b"\xef\xbb\xbf" + b'[{"role": "user"}]\n'
    reply = await client.post("/datasets/upload", files={"file": ("mine.jsonl", bad)}, params={"level": "quick"})
    assert reply.status_code == 422
    body = reply.json()
    assert body["status"] == "rejected" and body["report"]["name"] == "mine"
    assert body["report"]["counts"] == {"bom": 1, "json_object": 1}
    _, event = await next_event(rejected, DatasetRejected)
    assert event.submission_id == body["submission_id"]
    report = (await client.get(body["report_url"])).json()
    assert gatekeeper.store.path_for(report["original_uri"]).read_bytes() == bad

    reply = await client.post("/datasets/upload", files={"file": ("t.jsonl", jsonl(good_rows(2, tag="u")))},
                              params={"name": "named", "level": "quick"})
    assert reply.status_code == 200 and reply.json()["report"]["name"] == "named"
    assert (await next_event(accepted, DatasetAccepted))[0] == "dataset.accepted.normal"

    assert (await client.post("/datasets", params={"priority": "urgent"}, content=b"{}")).status_code == 422
    assert (await client.get("/datasets/nope/report")).status_code == 404
    assert (await client.get("/datasets/..%2F..%2Fetc/report")).status_code == 404
    specs = (await client.get("/specs")).json()
    quick = [c["name"] for c in specs["schemas"][0]["checks"]["quick"]]
    assert specs["default_schema"] == "chat_sft_v1" and "last_turn_assistant" in quick
    assert [s["name"] for s in specs["schemas"]] == ["chat_sft_v1", "syllo_v1", "completion_v1"]
    assert [c["name"] for c in specs["schemas"][0]["checks"]["standard"]] == ["held_out", "template", "token_length",
                                                                              "token_truncation"]
    assert "answer_leakage" in [c["name"] for c in specs["schemas"][0]["checks"]["deep"]]
    assert specs["policy"]["overlength"] == "truncate" and "syllo_v1" in specs["row_json_schemas"]
    asyncapi = await client.get("/asyncapi.yaml")
    assert asyncapi.status_code == (200 if ASYNCAPI.is_file() else 404)
    assert not list((Path(gatekeeper.settings.data_dir) / "gatekeeper" / "uploads").iterdir())


async def test_oversized_uploads_are_cut_off_at_the_limit(nats_server: str, bus: Bus, tmp_path: Path,
                                                         tiny_model_dir: Path):
    settings = load_settings(
        GatekeeperSettings, "gatekeeper", environ={}, nats_url=nats_server, data_dir=str(tmp_path / "data"),
        base_model=str(tiny_model_dir), http_port=0, max_file_bytes=1000,
    )
    rt = ServiceRuntime("gatekeeper", settings, shutdown_grace_s=10)
    task = asyncio.create_task(rt.run(SERVICE))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url="http://gk") as client:
        await wait_for(lambda: _ready(client, task), "the gatekeeper to become ready", interval=0.1)

        async def streamed():
            for _ in range(10):
                yield b"x" * 500

        reply = await client.post("/datasets", content=streamed())  # no content-length: caught while streaming
        assert reply.status_code == 413 and "max_file_bytes" in reply.json()["detail"]
        reply = await client.post("/datasets/upload", files={"file": ("big.jsonl", b"y" * 5000)})
        assert reply.status_code == 413
        reply = await client.post("/datasets/upload", files={"file": ("ok.jsonl", jsonl(good_rows(2)))},
                                  params={"level": "quick"})
        assert reply.status_code == 200, reply.text
        rt.stop.set()
    assert await task == 0
    assert not list((tmp_path / "data" / "gatekeeper" / "uploads").iterdir())


async def test_inbox_file_written_in_two_chunks_is_accepted_once_complete(gatekeeper: Running, bus: Bus):
    accepted = await bus.js.subscribe("dataset.accepted.>")
    inbox = Path(gatekeeper.settings.data_dir) / "inbox" / "high"
    inbox.mkdir(parents=True)
    rows = good_rows(6, tag="inbox")
    data = jsonl(rows)
    with open(inbox / "drop.jsonl", "wb") as fh:
        fh.write(data[: len(data) // 2 + 3])  # cut mid-row: taken now, it would be rejected
        fh.flush()
        await asyncio.sleep(0.3)
        fh.write(data[len(data) // 2 + 3:])
    subject, event = await next_event(accepted, DatasetAccepted)
    assert subject == "dataset.accepted.high" and event.name == "drop" and event.num_rows == 6
    assert event.num_rows_dropped == 0
    report = (await gatekeeper.client.get(f"/datasets/{event.submission_id}/report")).json()
    assert report["channel"] == "inbox" and report["source"] == "high/drop.jsonl"
    assert gatekeeper.store.path_for(report["original_uri"]).read_bytes() == data
    assert not (inbox / "drop.jsonl").exists()
    # The claimed copy is removed after the event is published, so wait for it rather than race it.
    await wait_for(lambda: not list((inbox.parent / ".processing").iterdir()), "the claimed inbox file to be removed")


async def test_health_stays_responsive_while_a_large_file_is_validated(gatekeeper: Running):
    data = jsonl(good_rows(150_000, tag=" and a little more text to make the line longer"))
    upload = asyncio.create_task(
        gatekeeper.client.post("/datasets", params={"name": "large", "level": "quick"}, content=data)
    )
    latencies, overlapped = [], False
    while not upload.done():
        started = time.perf_counter()
        assert (await gatekeeper.client.get("/health")).status_code == 200
        latencies.append(time.perf_counter() - started)
        overlapped |= not upload.done()
        await asyncio.sleep(0.01)
    reply = await upload
    assert reply.status_code == 200 and reply.json()["report"]["num_rows_valid"] == 150_000
    assert overlapped and len(latencies) >= 3
    assert max(latencies) < 0.5, latencies


async def test_a_stop_mid_validation_releases_the_submission_to_the_next_run(
    nats_server: str, bus: Bus, tmp_path: Path, tiny_model_dir: Path
):
    settings = load_settings(
        GatekeeperSettings, "gatekeeper", environ={}, nats_url=nats_server, data_dir=str(tmp_path / "data"),
        base_model=str(tiny_model_dir), http_port=0,
    )
    store = ArtifactStore(tmp_path / "data" / "artifacts")
    # Big enough that a quick validation (~1M rows/s) is still running when the stop comes.
    rows = (jsonl(good_rows(1)).replace(b"0", str(i).encode()) for i in range(1_500_000))
    big = store.write_lines(rows, "uploads", "big.jsonl")
    accepted = await bus.js.subscribe("dataset.accepted.>")
    event = DatasetSubmitted(name="big", uri=big.uri, sha256=big.sha256, level="quick")
    await bus.publish(topology.DATASET_SUBMITTED, event)

    first = ServiceRuntime("gatekeeper", settings, shutdown_grace_s=10)
    task = asyncio.create_task(first.run(SERVICE))
    original = store.location("submissions", event.id, "original.jsonl")
    await wait_for(original.exists, "the submission to be copied: validation is starting", interval=0.01)
    first.stop.set()
    stopped = time.monotonic()
    assert await asyncio.wait_for(task, 20) == 0
    assert time.monotonic() - stopped < 5
    assert not store.location("reports", f"{event.id}.json").exists()

    second = ServiceRuntime("gatekeeper", settings, shutdown_grace_s=10)
    task = asyncio.create_task(second.run(SERVICE))
    try:
        _, done = await next_event(accepted, DatasetAccepted, timeout=30)
        assert done.submission_id == event.id and done.num_rows == 1_500_000
    finally:
        second.stop.set()
        assert await asyncio.wait_for(task, 20) == 0


async def test_every_schema_through_nats_with_its_schema_in_the_event(gatekeeper: Running, bus: Bus):
    accepted = await bus.js.subscribe("dataset.accepted.>")
    puzzle = {"syllables": ["ba", "na", "na", "ap", "ple"], "answers": ["banana", "apple"], "difficulty": 1}
    syllo = [chat(("user", f"Puzzle {i}: ba na na ap ple"), ("assistant", "banana, apple"), puzzle=puzzle)
             for i in range(3)]
    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="words", schema="syllo_v1", rows=syllo,
                                                                   level="deep"))
    _, event = await next_event(accepted, DatasetAccepted)
    assert (event.name, event.schema, event.num_rows) == ("words", "syllo_v1", 3)
    stored = msgspec.json.decode(gatekeeper.store.verify(event.uri, event.sha256).read_bytes().splitlines()[0])
    assert stored["puzzle"] == puzzle
    texts = [{"text": f"Chapter {i}. It was a bright cold day."} for i in range(4)]
    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(name="book", schema="completion_v1", rows=texts))
    _, event = await next_event(accepted, DatasetAccepted)
    assert (event.name, event.schema, event.num_rows) == ("book", "completion_v1", 4)
    report = (await gatekeeper.client.get(f"/datasets/{event.dataset_id}/report")).json()  # by dataset id
    assert report["submission_id"] == event.submission_id and report["lengths"]["count"] == 4


async def test_all_intake_paths_share_one_duplicate_index(gatekeeper: Running, bus: Bus):
    accepted = await bus.js.subscribe("dataset.accepted.>")
    rejected = await bus.js.subscribe(topology.DATASET_REJECTED)
    data = jsonl(good_rows(5, tag=" shared"))
    reply = await gatekeeper.client.post("/datasets", params={"name": "first", "level": "quick"},
                                         content=gzip.compress(data))  # gzip, found by its magic bytes
    assert reply.status_code == 200 and reply.json()["status"] == "accepted"
    _, first = await next_event(accepted, DatasetAccepted)
    inbox = Path(gatekeeper.settings.data_dir) / "inbox"
    (inbox / "copy.level-quick.jsonl").write_bytes(data.replace(b'{"messages"', b'{ "messages"'))
    _, duplicate = await next_event(rejected, DatasetRejected)
    assert duplicate.name == "copy" and duplicate.dataset_id == first.dataset_id
    assert duplicate.reasons[0].startswith(f"duplicate of {first.dataset_id}")


async def test_hostile_uploads_are_rejected_with_reasons_and_the_service_stays_up(gatekeeper: Running, tmp_path: Path):
    client = gatekeeper.client
    hostile = {
        "garbage.bin": (os.urandom(3000) + b"\0", "binary"),
        "nested.jsonl": (b"[" * 50_000 + b"]" * 50_000 + b"\n", "nesting"),
        "cut.jsonl.gz": (gzip.compress(jsonl(good_rows(1000)))[:-100], "gzip"),
        "../../../../etc/passwd": (b"root:x:0:0:root:/root:/bin/bash\n", "json"),
        "bom.jsonl": (b"\xef\xbb\xbf" + b"not json\n", "json"),
    }
    for filename, (content, check) in hostile.items():
        reply = await client.post("/datasets/upload", files={"file": (filename, content)}, params={"level": "quick"})
        assert reply.status_code == 422, (filename, reply.text)
        report = reply.json()["report"]
        assert check in report["counts"], (filename, report["counts"])
        assert gatekeeper.store.path_for(report["original_uri"]).read_bytes() == content
        assert "/submissions/" in report["original_uri"] and "etc" not in report["original_uri"]
    assert (await client.get("/health")).status_code == 200
    reply = await client.post("/datasets", params={"level": "quick"}, content=jsonl(good_rows(3, tag=" after")))
    assert reply.status_code == 200


async def test_http_check_is_a_dry_run_that_keeps_and_announces_nothing(gatekeeper: Running, bus: Bus):
    events = await bus.js.subscribe("dataset.>")
    client = gatekeeper.client
    artifacts = gatekeeper.store.root
    before = sorted(p for p in artifacts.rglob("*") if p.is_file())

    bad = jsonl(good_rows(19)) + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    reply = await client.post("/datasets/check", params={"level": "standard"}, content=bad)
    assert reply.status_code == 200, reply.text
    report = reply.json()
    assert report["status"] == "accepted" and report["num_rows"] == 20 and report["num_rows_valid"] == 19
    assert report["counts"] == {"has_assistant": 1} and report["findings"]["has_assistant"][
        "findings"][0]["line"] == 20
    assert report["lengths"]["count"] == 19 and "token_length" in report["checks_run"]
    assert report["report_uri"] == "" and report["dataset_id"] == ""

    reply = await client.post("/datasets/check", params={"level": "quick", "schema": "chat_sft_v9"}, content=bad)
    assert reply.status_code == 200 and reply.json()["status"] == "rejected"
    assert "chat_sft_v9" in reply.json()["reasons"][0]

    assert sorted(p for p in artifacts.rglob("*") if p.is_file()) == before
    assert list((gatekeeper.settings.service_dir("gatekeeper") / "uploads").iterdir()) == []
    with pytest.raises(TimeoutError):
        await events.next_msg(timeout=1.0)


async def test_every_way_in_carries_the_data_profile_and_an_unknown_one_is_rejected(gatekeeper: Running, bus: Bus):
    accepted = await bus.js.subscribe("dataset.accepted.>")
    rejected = await bus.js.subscribe(topology.DATASET_REJECTED)
    client = gatekeeper.client

    await bus.publish(topology.DATASET_SUBMITTED, DatasetSubmitted(
        name="nats", rows=good_rows(2, tag="n"), level="quick", profile="emoji_think"))
    _, event = await next_event(accepted, DatasetAccepted)
    assert (event.name, event.channel, event.profile) == ("nats", "nats", "emoji_think")

    reply = await client.post("/datasets", params={"name": "body", "profile": "regime3", "level": "quick"},
                              content=jsonl(good_rows(2, tag="b")))
    assert reply.status_code == 200 and reply.json()["report"]["profile"] == "regime3"
    _, event = await next_event(accepted, DatasetAccepted)
    assert (event.name, event.channel, event.profile) == ("body", "http", "regime3")

    reply = await client.post("/datasets/upload", files={"file": ("up.jsonl", jsonl(good_rows(2, tag="u")))},
                              params={"profile": "emoji_think", "level": "quick"})
    assert reply.status_code == 200, reply.text
    _, event = await next_event(accepted, DatasetAccepted)
    assert (event.name, event.profile) == ("up", "emoji_think")

    written = Path(gatekeeper.settings.data_dir) / "drop.jsonl"
    written.write_bytes(jsonl(good_rows(2, tag="i")))
    os.replace(written, Path(gatekeeper.settings.data_dir) / "inbox" / "drop.profile-regime3.level-quick.jsonl")
    _, event = await next_event(accepted, DatasetAccepted)
    assert (event.name, event.channel, event.profile) == ("drop", "inbox", "regime3")

    unknown = ["data_profile: unknown profile 'emoji'; known: none, emoji_think, regime3"]
    reply = await client.post("/datasets", params={"name": "bad", "profile": "emoji"}, content=jsonl(good_rows(1, tag="x")))
    assert reply.status_code == 422 and reply.json()["report"]["reasons"] == unknown
    _, event = await next_event(rejected, DatasetRejected)
    assert event.name == "bad" and event.reasons == unknown
    report = (await client.get(f"/datasets/{event.submission_id}/report")).json()
    assert gatekeeper.store.path_for(report["original_uri"]).read_bytes() == jsonl(good_rows(1, tag="x"))

    check = await client.post("/datasets/check", params={"schema": "completion_v1", "profile": "regime3"},
                              content=b'{"text": "to continue"}\n')
    assert check.json()["status"] == "rejected" and check.json()["counts"] == {"data_profile": 1}
    specs = (await client.get("/specs")).json()
    assert specs["default_profile"] == "none"
    assert [p["name"] for p in specs["data_profiles"]] == ["none", "emoji_think", "regime3"]
