"""kill -9 of nats-server mid-training; the supervisor restarts it on the same port and store.

Every service must ride it out (reconnect by itself, no restart needed), the dataset being
trained when the server died is trained exactly once, every event published around the outage
is settled, and what is served stays blessed.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from libs.common import topology
from libs.common.events import CheckpointSaved, DatasetAccepted
from tests.faults.ledger import Ledger
from tests.faults.stack import KILLED, FaultStack
from tests.faults.trials import ServedWatch, Trial, TrialTable
from tests.faults.workload import Triggers, all_ready, dataset, quiet, submit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]


async def test_nats_server_killed_mid_training(fault_stack: FaultStack, fault_bus, trials: TrialTable):
    bus = fault_bus
    before = (await Ledger.read(bus)).last_seqs()
    restarts_before = {service: fault_stack.restarts(service) for service in KILLED}
    async with Triggers(bus) as triggers, ServedWatch(bus, fault_stack.url("inference"), fault_stack.api_key) as watch:
        # A longer run than the others, so the outage lands in it.
        event = await submit(bus, dataset(rows=400, name="faults-nats"))
        accepted = await triggers.first(lambda s, d: s.startswith("dataset.accepted") and event.id.encode() in d, 120)
        assert accepted, "the dataset was not accepted"
        dataset_id = msgspec.json.decode(accepted[1], type=DatasetAccepted).dataset_id
        saved = await triggers.first(lambda s, d: s == topology.CHECKPOINT_SAVED and dataset_id.encode() in d, 180)
        assert saved, "the dataset's run saved no checkpoint"
        checkpoint = msgspec.json.decode(saved[1], type=CheckpointSaved)
        nats_restarts = fault_stack.nats_restarts
        killed_at = time.monotonic()
        pid = fault_stack.kill_nats()
        while fault_stack.nats_restarts == nats_restarts:
            assert time.monotonic() - killed_at < 30, "the supervisor did not restart nats-server"
            await asyncio.sleep(0.2)
        back_s = time.monotonic() - killed_at
        reconnected_s = await all_ready(fault_stack, 90)

        def ended(ledger: Ledger) -> bool:
            return dataset_id in ledger.runs or dataset_id in ledger.failed_for_good

        ledger = await quiet(bus, fault_stack, timeout=200, until=ended)
    check = ledger.check(since=before)
    blessed_ok, blessed = watch.verdict(ledger.blessed)
    runs = sorted(ledger.runs.get(dataset_id, ()))
    restarted = [s for s in KILLED if fault_stack.restarts(s) != restarts_before[s]]
    ok = check.ok and blessed_ok and runs == [checkpoint.run_id]
    trials.add(Trial(
        "nats restart", f"kill -9 nats-server (pid {pid})",
        f"mid-training: {checkpoint.run_id} step {checkpoint.step}",
        f"server back in {back_s:.1f}s, all ready {reconnected_s:.0f}s later"
        f"{' (restarted: ' + ', '.join(restarted) + ')' if restarted else ', no service restarted'}; "
        f"dataset trained by {runs or 'NO run'}; {check.describe()}",
        len(check.lost), len(check.trained_twice), len(check.unsettled), blessed, ok))

    assert check.ok, check.describe()
    assert runs == [checkpoint.run_id], f"the dataset was trained by {runs}, not once by {checkpoint.run_id}"
    assert blessed_ok, blessed
