"""Inference's part, played for the deployer: report serving a staged deployment (`model.serving`).

A deployment is final only once a replica reports serving it. `replica(bus)` answers every
`model.staged` the way an inference replica that loaded it would; `report` and `confirm`
answer one deployment, for tests that drive the deployer's handlers directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from nats.aio.msg import Msg

from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.events import ModelServing, ModelStaged
from libs.common.records import DEPLOYMENT, Deployment
from tests.conftest import wait_for

REPLICA = "test-replica"


def report(deployment: Deployment | ModelStaged, *, ok: bool = True, sha256: str | None = None, reason: str = "",
           replica: str = REPLICA) -> ModelServing:
    """What a replica says about `deployment`: by default that it serves the staged sha256."""
    deployment_id = deployment.id if isinstance(deployment, Deployment) else deployment.deployment_id
    return ModelServing(deployment_id=deployment_id, replica=replica, ok=ok, reason=reason,
                        checkpoint_sha256=deployment.checkpoint_sha256 if sha256 is None else sha256)


async def newest(bus: Bus) -> Deployment | None:
    return (await (await bus.record(DEPLOYMENT)).read())[0]


def serving_delivery(bus: Bus) -> Delivery:
    """What the consume loop hands `on_model_serving`, for calling it directly."""
    return Delivery(Msg(bus.nc, subject=topology.MODEL_SERVING, data=b""), topology.DEPLOYER_SERVING)


async def confirm(deployer, **report_fields) -> Deployment:
    """Report serving the deployer's newest deployment, through its handler; the deployment after it."""
    deployment = await newest(deployer.bus)
    assert deployment is not None, "nothing is staged"
    await deployer.on_model_serving(report(deployment, **report_fields), serving_delivery(deployer.bus))
    return await newest(deployer.bus)


async def settled(bus: Bus, deployment_id: str | None = None) -> Deployment:
    """Wait until the newest deployment (`deployment_id`, if given) has an outcome and all that follows it."""
    async def done() -> Deployment | None:
        current = await newest(bus)
        if current and current.settled and deployment_id in (None, current.id):
            return current
        return None
    return await wait_for(done, f"deployment {deployment_id or '(newest)'} to be settled")


@contextlib.asynccontextmanager
async def replica(bus: Bus, *, ok: bool = True, reason: str = "") -> AsyncIterator[list[ModelStaged]]:
    """A stand-in inference replica while the block runs: every `model.staged` is answered with a
    `model.serving` (ok: serving its sha256; not ok: `reason`). Yields the staged events seen."""
    seen: list[ModelStaged] = []

    async def on_staged(msg: Msg) -> None:
        staged = msgspec.json.decode(msg.data, type=ModelStaged)
        seen.append(staged)
        await bus.publish(topology.MODEL_SERVING, report(staged, ok=ok, reason=reason, sha256=None if ok else ""))

    sub = await bus.nc.subscribe(topology.MODEL_STAGED, cb=on_staged)
    try:
        yield seen
    finally:
        await sub.unsubscribe()
