"""A replica that starts while a deployment is staged loads it and reports, as if it had heard model.staged.

Found by the fault suite (tests/faults/test_kill_nine.py): inference killed while loading a staged
checkpoint came back serving the champion and never reported, so the deployment failed by timeout
("no inference replica reported serving it within 60 s") although the replica was back in 20 s.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import ModelServing
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import free_port, running
from tests.services.inference.test_service import make_checkpoint, put_deployment

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def settings(tmp_path: Path, nats_server: str, tiny_model_dir: Path) -> InferenceSettings:
    return InferenceSettings(data_dir=tmp_path / "data", nats_url=nats_server, http_port=free_port(),
                             base_model=str(tiny_model_dir), device="cpu", replica_id="replica-r")


async def test_a_deployment_staged_while_the_replica_was_down_is_loaded_and_reported(settings, bus: Bus,
                                                                                     tiny_model_dir: Path):
    store = ArtifactStore(settings.data_dir / "artifacts")
    staged = make_checkpoint(store, tiny_model_dir, "run-r-1")
    # Staged by the deployer; its model.staged went out while no replica was listening.
    await put_deployment(bus, staged, "d-missed")
    reports = await bus.js.subscribe(topology.MODEL_SERVING)
    try:
        async with running(settings) as client:
            serving = msgspec.json.decode((await reports.next_msg(timeout=60)).data, type=ModelServing)
            info = (await client.get("/models/info")).json()
    finally:
        await reports.unsubscribe()
    assert (serving.ok, serving.deployment_id, serving.replica) == (True, "d-missed", "replica-r")
    assert serving.checkpoint_sha256 == info["sha256"] == staged.sha256
