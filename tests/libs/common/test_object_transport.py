"""Artifacts between hosts without a shared disk: the JetStream object store, on a real nats-server.

Two stores under two roots stand for two hosts; a fault-injecting wrapper around the real
JetStream context cuts transfers short to show that they resume where they stopped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from libs.common import object_transport
from libs.common.artifacts import ArtifactError, ArtifactStore, sha256_dir
from libs.common.bus import Bus
from libs.common.events import CheckpointSaved
from libs.common.object_transport import ObjectTransport, connect_store

pytestmark = pytest.mark.integration
CHUNK = 1024


class CutShort(ConnectionError):
    """The injected fault: the connection "drops" after so many chunks."""


class Flaky:
    """The real JetStream context, except that chunk traffic stops after `after` messages."""

    def __init__(self, js, *, after: int) -> None:
        self._js = js
        self.after = after
        self.chunks_published = 0
        self.chunks_received = 0

    def __getattr__(self, name):
        return getattr(self._js, name)

    async def publish(self, subject, payload=b"", **kwargs):
        if ".C." in subject:
            if self.chunks_published >= self.after:
                raise CutShort("publish")
            self.chunks_published += 1
        return await self._js.publish(subject, payload, **kwargs)

    async def subscribe(self, subject, **kwargs):
        sub = await self._js.subscribe(subject, **kwargs)
        flaky = self
        next_msg = sub.next_msg

        async def counted(timeout=1.0):
            if flaky.chunks_received >= flaky.after:
                raise CutShort("receive")
            msg = await next_msg(timeout=timeout)
            flaky.chunks_received += 1
            return msg

        sub.next_msg = counted
        return sub


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


async def host(bus: Bus, root: Path) -> ArtifactStore:
    store = ArtifactStore(root, transport="nats")
    return await connect_store(store, bus.js)


async def test_a_file_goes_up_and_down_in_chunks_and_nats_py_reads_it_too(bus: Bus, tmp_path: Path):
    transport = await ObjectTransport.open(bus.js, tmp_path / "state", chunk_size=CHUNK)
    source = random_file(tmp_path / "a" / "data.bin", 10 * CHUNK + 17)
    stored = await transport.put_file(source, "datasets/data.bin")
    assert (stored.size, stored.chunks) == (source.stat().st_size, 11)
    assert stored.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()

    fetched = await transport.get_file("datasets/data.bin", tmp_path / "b" / "data.bin", sha256=stored.sha256)
    assert fetched.read_bytes() == source.read_bytes()
    # The object store's own layout: nats-py (and the nats CLI) read what we wrote.
    assert (await (await bus.js.object_store("artifacts")).get("datasets/data.bin")).data == source.read_bytes()
    # The same content again: nothing is sent.
    flaky = Flaky(bus.js, after=0)
    await ObjectTransport(flaky, tmp_path / "state", chunk_size=CHUNK).put_file(source, "datasets/data.bin")
    assert flaky.chunks_published == 0


async def test_an_upload_cut_short_resumes_from_the_first_chunk_the_stream_lacks(bus: Bus, tmp_path: Path):
    await ObjectTransport.open(bus.js, tmp_path / "state")
    source = random_file(tmp_path / "big.bin", 20 * CHUNK)
    first = Flaky(bus.js, after=7)
    with pytest.raises(CutShort):
        await ObjectTransport(first, tmp_path / "state", chunk_size=CHUNK).put_file(source, "big.bin")
    transport = ObjectTransport(bus.js, tmp_path / "state", chunk_size=CHUNK)
    assert await transport.stat("big.bin") is None  # no meta: a half upload is not an object

    second = Flaky(bus.js, after=1000)
    stored = await ObjectTransport(second, tmp_path / "state", chunk_size=CHUNK).put_file(source, "big.bin")
    assert second.chunks_published == 20 - 7
    assert stored.chunks == 20
    fetched = await transport.get_file("big.bin", tmp_path / "copy.bin", sha256=stored.sha256)
    assert fetched.read_bytes() == source.read_bytes()


async def test_a_download_cut_short_resumes_from_its_record(bus: Bus, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(object_transport, "RECORD_EVERY_BYTES", 4 * CHUNK)
    transport = await ObjectTransport.open(bus.js, tmp_path / "state", chunk_size=CHUNK)
    source = random_file(tmp_path / "big.bin", 30 * CHUNK + 5)
    stored = await transport.put_file(source, "big.bin")
    target = tmp_path / "b" / "big.bin"

    first = Flaky(bus.js, after=18)
    with pytest.raises(ArtifactError, match="resumes"):
        await ObjectTransport(first, tmp_path / "state", chunk_size=CHUNK).get_file("big.bin", target)
    assert not target.exists()  # never half a file under its name

    second = Flaky(bus.js, after=1000)
    await ObjectTransport(second, tmp_path / "state", chunk_size=CHUNK).get_file("big.bin", target, sha256=stored.sha256)
    assert target.read_bytes() == source.read_bytes()
    # Recorded at 16 chunks (every 4): only the rest came again.
    assert second.chunks_received == 31 - 16


async def test_a_checkpoint_written_on_one_host_is_fetched_and_verified_on_another(bus: Bus, tmp_path: Path):
    trainer_host = await host(bus, tmp_path / "a")
    serving_host = await host(bus, tmp_path / "b")
    checkpoint = trainer_host.location("checkpoints", "run-1", "step-000010")
    random_file(checkpoint / "model.safetensors", 3000)
    random_file(checkpoint / "tokenizer" / "vocab.json", 500)
    (checkpoint / "flywheel.json").write_text('{"final": true}')
    artifact = trainer_host.describe_dir(checkpoint)
    assert artifact.uri == "nats-obj://artifacts/checkpoints/run-1/step-000010"

    # The trainer's bus shares what its event names before the event goes out.
    bus.artifacts = trainer_host
    await bus.publish("checkpoint.saved", CheckpointSaved(
        run_id="run-1", step=10, global_step=10, dataset_id="d", uri=artifact.uri, sha256=artifact.sha256, final=True,
    ))
    path = await serving_host.fetch(artifact.uri, artifact.sha256)
    assert path.is_relative_to(tmp_path / "b") and sha256_dir(path) == artifact.sha256
    assert (path / "tokenizer" / "vocab.json").read_bytes() == (checkpoint / "tokenizer" / "vocab.json").read_bytes()

    # A copy that went bad on the serving host is fetched again, never used.
    (path / "model.safetensors").write_bytes(b"corrupt")
    again = await serving_host.fetch(artifact.uri, artifact.sha256)
    assert sha256_dir(again) == artifact.sha256
    # A sha256 that is not the artifact's is refused.
    with pytest.raises(ArtifactError):
        await (await host(bus, tmp_path / "c")).fetch(artifact.uri, "0" * 64)

    # Discarded on the trainer host: gone from the object store as well.
    await trainer_host.discard(artifact.uri)
    assert not checkpoint.exists()
    with pytest.raises(ArtifactError, match="neither on this host nor in the object store"):
        await (await host(bus, tmp_path / "d")).fetch(artifact.uri, artifact.sha256)


async def test_shared_uris_stay_inside_the_store_and_need_the_transport(bus: Bus, tmp_path: Path):
    shared = await host(bus, tmp_path / "a")
    with pytest.raises(ArtifactError, match="outside"):
        shared.path_for("nats-obj://artifacts/../../etc/passwd")
    with pytest.raises(ArtifactError, match="expected nats-obj://artifacts/"):
        shared.path_for("nats-obj://other-bucket/x")
    local = ArtifactStore(tmp_path / "local")
    with pytest.raises(ArtifactError, match="FLYWHEEL_ARTIFACT_TRANSPORT=nats"):
        await local.fetch("nats-obj://artifacts/datasets/x.jsonl", "0" * 64)
    # An artifact nobody shared cannot be named in an event.
    with pytest.raises(ArtifactError, match="cannot share"):
        await shared.share("nats-obj://artifacts/datasets/never-written.jsonl", "0" * 64)
