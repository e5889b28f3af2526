"""`flywheel up --secure`: the real services, each under its own NATS user, still run the loop.

A dataset goes through the gatekeeper to the trainer (a checkpoint saved) with authentication
and per-service permissions on; no service logs a refused operation, and the CLI finds its own
password under the data directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from flywheel.demo import SAMPLE_DATASET, free_port_base
from flywheel.submit import submit_file
from flywheel.supervisor import SECRETS_FILE, Supervisor
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import CheckpointSaved
from libs.common.nats_auth import NatsAuth
from libs.common.nats_permissions import ADMIN, CLI, password_variable, read_secrets
from libs.common.settings import SettingsError

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(400)]

SERVICES = ("gatekeeper", "trainer")
# A short run: one epoch of the sample, a checkpoint early.
ENV = {"FLYWHEEL_TRAINER_EPOCHS": "1", "FLYWHEEL_TRAINER_BATCH_SIZE": "16", "FLYWHEEL_TRAINER_SAVE_EVERY_STEPS": "5",
       "FLYWHEEL_MAX_LENGTH": "256", "FLYWHEEL_TRAINER_TORCH_THREADS": "1"}


async def _supervise(sup: Supervisor, until: asyncio.Event) -> None:
    while not until.is_set():
        sup.poll()
        await asyncio.sleep(0.2)


def test_secure_with_an_external_server_needs_the_copied_passwords(tmp_path: Path):
    with pytest.raises(SettingsError, match="copy it from the data directory"):
        Supervisor(tmp_path / "data", environ={"FLYWHEEL_NATS_URL": "nats://elsewhere:4222"}, secure=True)
    (tmp_path / "data" / SECRETS_FILE).parent.mkdir(parents=True)
    (tmp_path / "data" / SECRETS_FILE).write_text(f"{password_variable('trainer')}=pabc\n")
    sup = Supervisor(tmp_path / "data", environ={"FLYWHEEL_NATS_URL": "nats://elsewhere:4222"}, secure=True,
                     services=("trainer", "evaluator"))
    with pytest.raises(SettingsError, match="no password for evaluator"):
        sup._use_copied_secrets()


def test_nats_listens_beyond_this_machine_only_with_passwords(tmp_path: Path):
    with pytest.raises(SettingsError, match="FLYWHEEL_NATS_LISTEN: 0.0.0.0 is reachable"):
        Supervisor(tmp_path / "data", environ={"FLYWHEEL_NATS_LISTEN": "0.0.0.0:4222"})
    with pytest.raises(SettingsError, match="FLYWHEEL_NATS_LISTEN: host:port"):
        Supervisor(tmp_path / "data", environ={"FLYWHEEL_NATS_LISTEN": "4222"}, secure=True)
    assert Supervisor(tmp_path / "data", environ={"FLYWHEEL_NATS_LISTEN": "0.0.0.0:4222"}, secure=True).listen == (
        "0.0.0.0", 4222)


async def test_a_dataset_goes_from_the_gatekeeper_to_a_trained_checkpoint_under_auth(tmp_path: Path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "NATS_URL"}
    sup = Supervisor(tmp_path / "data", port_base=free_port_base(), services=SERVICES, environ={**base, **ENV},
                     secure=True)
    sup.start()
    done = asyncio.Event()
    supervising = asyncio.create_task(_supervise(sup, done))
    buses: list[Bus] = []
    try:
        secrets_path = sup.data_dir / SECRETS_FILE
        assert stat.S_IMODE(secrets_path.stat().st_mode) == 0o600
        passwords = read_secrets(secrets_path)
        # Without credentials the server refuses at once.
        with pytest.raises(PermissionError):
            await Bus.connect([sup.nats_url], "anonymous", deadline_s=5)

        def auth(user: str) -> NatsAuth:
            return NatsAuth(user, passwords[password_variable(user)])

        watcher = await Bus.connect([sup.nats_url], ADMIN, deadline_s=10, auth=auth(ADMIN))
        buses.append(watcher)
        await watcher.ensure_topology()
        saved: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_saved(msg):
            if not saved.done():
                saved.set_result(msgspec.json.decode(msg.data, type=CheckpointSaved))

        await watcher.nc.subscribe(topology.CHECKPOINT_SAVED, cb=on_saved)
        # The CLI's user submits, as `flywheel submit` does.
        cli = await Bus.connect([sup.nats_url], CLI, deadline_s=10, auth=auth(CLI))
        buses.append(cli)
        await cli.ensure_topology()
        submitted = await submit_file(cli, ArtifactStore(sup.data_dir / "artifacts"), SAMPLE_DATASET, wait_s=240)
        assert submitted.outcome == "accepted", submitted
        checkpoint = await asyncio.wait_for(saved, 300)
        assert checkpoint.step > 0 and checkpoint.sha256

        # `flywheel status` on this machine finds the URL and its own password under the data dir.
        status = subprocess.run([sys.executable, "-m", "flywheel.cli", "status", "--json"], capture_output=True,
                                text=True, timeout=120, env={**base, "FLYWHEEL_DATA_DIR": str(sup.data_dir)},
                                check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)
    finally:
        for bus in buses:
            await bus.close()
        done.set()
        await supervising
        sup.stop()
    logs = {svc: (sup.data_dir / "logs" / f"{svc}.log").read_text() for svc in SERVICES}
    for svc, text in logs.items():
        assert "permissions violation" not in text.lower(), f"{svc}: {text[-3000:]}"
        assert passwords[password_variable(svc)] not in text, f"{svc} logged its password"
        assert sup.children[svc].restarts == 0, f"{svc} restarted: {text[-3000:]}"
