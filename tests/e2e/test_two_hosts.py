"""Two hosts, no shared disk: train on one, evaluate and serve on the other, one NATS between them.

Each "host" is a `flywheel up --secure` of its own (a Supervisor) with its own data directory;
nothing but the NATS connection joins them, and the client that submits has a third directory.
The training host's nats-server listens on every interface and requires each service's user and
password, with only the permissions its declaration implies; the serving host gets the passwords
as an operator would give them, a copy of the secrets file. With FLYWHEEL_ARTIFACT_TRANSPORT=nats
the dataset and the checkpoint travel through the JetStream object store and each reader checks
them against the event's sha256.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import msgspec
import pytest

from flywheel.demo import API_KEY_FILE, SAMPLE_DATASET, free_port_base
from flywheel.submit import submit_file
from flywheel.supervisor import SECRETS_FILE, Supervisor
from libs.common import topology
from libs.common.artifacts import ArtifactStore, sha256_dir
from libs.common.bus import Bus
from libs.common.events import ModelDeployed, TrainingFinished
from libs.common.nats_auth import NatsAuth
from libs.common.nats_permissions import ADMIN, CLI, password_variable, read_secrets
from libs.common.object_transport import connect_store
from libs.common.settings import DEFAULT_PORTS
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

TRAINING_HOST = ("gatekeeper", "trainer")
SERVING_HOST = ("evaluator", "deployer", "inference")
# A short run of the demo's recipe: one epoch of the sample, scored on level 1 only; the
# first checkpoint scored becomes the first champion.
ENV = {
    "FLYWHEEL_ARTIFACT_TRANSPORT": "nats",
    "FLYWHEEL_TRAINER_EPOCHS": "1",
    "FLYWHEEL_TRAINER_BATCH_SIZE": "16",
    "FLYWHEEL_TRAINER_TORCH_THREADS": "1",
    "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "20",
    "FLYWHEEL_MAX_LENGTH": "256",
    "FLYWHEEL_EVALUATOR_SUITE_MAX_LEVEL": "1",
    "FLYWHEEL_EVALUATOR_SYLLO_MAX_LEVEL": "0",
    "FLYWHEEL_EVALUATOR_SCORE_BASE_MODEL": "false",
    "FLYWHEEL_EVALUATOR_HARD_PROBE_ITEMS": "0",
    "FLYWHEEL_CURRICULUM_ENABLED": "false",
}


async def _supervise(sups: list[Supervisor], until: asyncio.Event) -> None:
    while not until.is_set():
        for sup in sups:
            sup.poll()
        await asyncio.sleep(0.2)


def _get_json(url: str, key: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def _stream_payloads(bus: Bus, stream: str) -> list[bytes]:
    last = (await bus.js.stream_info(stream)).state.last_seq
    payloads = []
    for seq in range(1, last + 1):
        try:
            payloads.append((await bus.js.get_msg(stream, seq)).data)
        except Exception:  # noqa: BLE001 - a sequence the stream no longer holds
            continue
    return payloads


async def test_trained_on_one_host_evaluated_and_served_on_another_without_a_shared_disk(tmp_path: Path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "NATS_URL"}
    ports = free_port_base(2 * len(DEFAULT_PORTS) + 1)
    nats_port = ports + 2 * len(DEFAULT_PORTS)
    training = Supervisor(tmp_path / "training-host", port_base=ports, services=TRAINING_HOST, secure=True,
                          environ={**base, **ENV, "FLYWHEEL_NATS_LISTEN": f"0.0.0.0:{nats_port}"})
    training.start()
    assert training.nats_url == f"nats://127.0.0.1:{nats_port}"
    # The operator copies the NATS machine's secrets file to the other machine.
    secrets = read_secrets(tmp_path / "training-host" / SECRETS_FILE)
    (tmp_path / "serving-host" / SECRETS_FILE).parent.mkdir(parents=True)
    (tmp_path / "serving-host" / SECRETS_FILE).write_bytes((tmp_path / "training-host" / SECRETS_FILE).read_bytes())
    serving = Supervisor(tmp_path / "serving-host", port_base=ports + len(DEFAULT_PORTS), services=SERVING_HOST,
                         secure=True, environ={**base, **ENV, "FLYWHEEL_NATS_URL": training.nats_url})
    done = asyncio.Event()
    supervising = None
    bus = client_bus = None
    try:
        serving.start()
        supervising = asyncio.create_task(_supervise([training, serving], done))
        # An operator watches (admin); a client submits under the CLI's user, as `flywheel submit`.
        bus = await Bus.connect([training.nats_url], ADMIN, auth=NatsAuth(ADMIN, secrets[password_variable(ADMIN)]))
        client_bus = await Bus.connect([training.nats_url], CLI, auth=NatsAuth(CLI, secrets[password_variable(CLI)]))
        await bus.ensure_topology()
        finished: asyncio.Future = asyncio.get_running_loop().create_future()
        deployed: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_finished(msg):
            if not finished.done():
                finished.set_result(msgspec.json.decode(msg.data, type=TrainingFinished))

        async def on_deployed(msg):
            if not deployed.done():
                deployed.set_result(msgspec.json.decode(msg.data, type=ModelDeployed))

        await bus.nc.subscribe(topology.TRAINING_FINISHED, cb=on_finished)
        await bus.nc.subscribe(topology.MODEL_DEPLOYED, cb=on_deployed)

        # The client has a disk of its own too: its upload goes up with its event.
        client = ArtifactStore(tmp_path / "client" / "artifacts", transport="nats")
        client_bus.artifacts = await connect_store(client, client_bus.js)
        submitted = await submit_file(client_bus, client, SAMPLE_DATASET, wait_s=240)
        assert submitted.outcome == "accepted", submitted

        trained = await asyncio.wait_for(finished, 400)
        promoted = await asyncio.wait_for(deployed, 300)
        assert promoted.checkpoint_uri == trained.checkpoint_uri
        assert promoted.checkpoint_uri.startswith("nats-obj://artifacts/checkpoints/")

        # Served on the serving host: exactly the checkpoint trained on the training host.
        info_url = f"http://127.0.0.1:{serving.ports['inference']}/models/info"
        key = (tmp_path / "serving-host" / API_KEY_FILE).read_text().strip()
        served = await wait_for(
            lambda: (info := _get_json(info_url, key)) and info.get("sha256") == promoted.checkpoint_sha256 and info,
            "inference to serve the promoted checkpoint", timeout=120)
        assert served["uri"] == promoted.checkpoint_uri

        # Each host holds its own copy, identical by content, in its own directory.
        key = promoted.checkpoint_uri.removeprefix("nats-obj://artifacts/")
        trainer_copy = tmp_path / "training-host" / "artifacts" / key
        serving_copy = tmp_path / "serving-host" / "artifacts" / key
        assert sha256_dir(trainer_copy) == sha256_dir(serving_copy) == promoted.checkpoint_sha256
        # The evaluator's copy went once it was scored; the one there now is inference's own.
        evaluator_log = (tmp_path / "serving-host" / "logs" / "evaluator.log").read_text()
        assert "fetched copy removed after scoring" in evaluator_log
        # The dataset went from the client to the training host only.
        dataset_key = f"datasets/{trained.dataset_id}.jsonl"
        assert (tmp_path / "training-host" / "artifacts" / dataset_key).is_file()
        assert not (tmp_path / "serving-host" / "artifacts" / dataset_key).exists()

        # No event points at an artifact by a path of one host's disk.
        for stream in ("DATASETS", "TRAINING", "EVALS", "MODELS"):
            for payload in await _stream_payloads(bus, stream):
                event = json.loads(payload)
                uris = {k: v for k, v in event.items() if (k == "uri" or k.endswith("_uri")) and v}
                assert all(v.startswith("nats-obj://artifacts/") for v in uris.values()), (stream, event)
    finally:
        done.set()
        if supervising:
            await supervising
        for connection in (bus, client_bus):
            if connection:
                await connection.close()
        serving.stop()
        training.stop()
    # The server saw no service (nor the client) step outside its permissions.
    server_log = (tmp_path / "training-host" / "logs" / "nats-server.log").read_text()
    assert "Violation" not in server_log, [line for line in server_log.splitlines() if "Violation" in line][:5]
    for sup in (training, serving):
        for svc, child in sup.children.items():
            log = child.log_path.read_text()
            assert "permissions violation" not in log.lower(), f"{svc}: {log[-3000:]}"
