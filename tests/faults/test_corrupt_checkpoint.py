"""A corrupted checkpoint: bytes of its weights flipped after it was announced, before it is read.

The evaluator (held still with SIGSTOP until the bytes are flipped) must refuse it by its sha256
and dead-letter it with the reason; once repaired, a replay of the dead letter scores it. Then
inference (held still the same way) is asked to load it for a deployment while it is corrupted
again: it must refuse it by its sha256, the deployment fails and the champion keeps serving: the
corrupted checkpoint is never served.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from flywheel.deadletters import replay
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import REASON_HEADER
from libs.common.events import CheckpointSaved, DatasetAccepted
from tests.faults.ledger import Ledger
from tests.faults.stack import FaultStack
from tests.faults.trials import ServedWatch, Trial, TrialTable
from tests.faults.workload import Triggers, manual_deploy, quiet, submit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

WEIGHTS = "model.safetensors"


class Flipped:
    """64 bytes in the middle of a file inverted, until `restore`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.original = path.read_bytes()
        middle = len(self.original) // 2
        data = bytearray(self.original)
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        path.write_bytes(bytes(data))

    def restore(self) -> None:
        self.path.write_bytes(self.original)


async def _wait(predicate, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := await predicate():
            return found
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


async def test_a_corrupted_checkpoint_is_refused_and_never_served(fault_stack: FaultStack, fault_bus, trials: TrialTable):
    bus = fault_bus
    store = ArtifactStore(fault_stack.data_dir / "artifacts")
    before = (await Ledger.read(bus)).last_seqs()
    async with Triggers(bus) as triggers, ServedWatch(bus, fault_stack.url("inference"), fault_stack.api_key) as watch:
        # ---------------------------------------------------------------- the evaluator
        fault_stack.pause("evaluator")
        try:
            event = await submit(bus)
            accepted = await triggers.first(lambda s, d: s.startswith("dataset.accepted") and event.id.encode() in d, 120)
            assert accepted, "the dataset was not accepted"
            dataset_id = msgspec.json.decode(accepted[1], type=DatasetAccepted).dataset_id
            saved = await triggers.first(lambda s, d: s == topology.CHECKPOINT_SAVED and b'"final":true' in d
                                        and dataset_id.encode() in d, 180)
            assert saved, "no final checkpoint"
            checkpoint = msgspec.json.decode(saved[1], type=CheckpointSaved)
            flipped = Flipped(store.path_for(checkpoint.uri) / WEIGHTS)
        finally:
            fault_stack.resume("evaluator")

        async def dead_letter():
            ledger = await Ledger.read(bus)
            return next((m for m in ledger.messages["DEADLETTER"] if m.headers.get("Flywheel-Consumer") == "evaluator"
                         and msgspec.json.decode(m.data).get("sha256") == checkpoint.sha256), None)

        try:
            letter = await _wait(dead_letter, "the evaluator to dead-letter the corrupted checkpoint", 120)
        finally:
            flipped.restore()
        reason = letter.headers.get(REASON_HEADER, "")
        await replay(bus, letter.seq)

        async def scored():
            return checkpoint.sha256 in (await Ledger.read(bus)).scored

        await _wait(scored, "the repaired checkpoint, replayed, to be scored", 120)

        # ---------------------------------------------------------------- inference
        fault_stack.pause("inference")
        try:
            staged = asyncio.create_task(triggers.next(
                lambda s, d: s == topology.MODEL_STAGED and checkpoint.sha256.encode() in d, 60))
            await asyncio.sleep(0)
            reply = await manual_deploy(bus, checkpoint.sha256)
            assert reply is not None and reply.state == "staged", reply
            assert await staged, "the deployment was not staged"
            flipped = Flipped(store.path_for(checkpoint.uri) / WEIGHTS)
        finally:
            fault_stack.resume("inference")
        try:
            async def failed():
                return (await Ledger.read(bus)).deploy_failed.get(reply.deployment_id)

            deploy_failed = await _wait(failed, "the deployment of the corrupted checkpoint to fail", 120)
        finally:
            flipped.restore()
        ledger = await quiet(bus, fault_stack, timeout=90)
    check = ledger.check(since=before)
    blessed_ok, blessed = watch.verdict(ledger.blessed, never={checkpoint.sha256})

    evaluator_ok = "sha256" in reason and checkpoint.sha256 in ledger.scored
    trials.add(Trial("corrupt → evaluator", f"64 bytes of {WEIGHTS} flipped", "announced, before the evaluator read it",
                     f"refused: {reason[:60]}; repaired + replayed: scored",
                     len(check.lost), len(check.trained_twice), len(check.unsettled), blessed, evaluator_ok and check.ok))
    inference_ok = "sha256" in deploy_failed.reason and blessed_ok
    trials.add(Trial("corrupt → inference", f"64 bytes of {WEIGHTS} flipped", "staged, before inference loaded it",
                     f"refused, deployment failed: {deploy_failed.reason[:70]}; never served",
                     len(check.lost), len(check.trained_twice), len(check.unsettled), blessed, inference_ok and check.ok))

    assert check.ok, check.describe()
    assert evaluator_ok, reason
    assert inference_ok, (deploy_failed.reason, blessed)
