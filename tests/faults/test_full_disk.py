"""A full disk during a checkpoint write.

The trainer's checkpoints are on a tmpfs of their own (tests/faults/stack.py). Just before a
dataset is trained the trial fills it with a ballast file, leaving less room than one checkpoint
takes. The trainer's disk floor (checked where checkpoints are written) should see it first and
pause training with `training.paused` before writing anything; if the disk fills past the check
(another writer) the write fails with ENOSPC and the run fails to be retried. Either way no
partial checkpoint is announced, the dataset stays queued (retried, or dead-lettered with the
reason), and once the ballast is gone it is trained, once. Where mounting a tmpfs is not
permitted (no CAP_SYS_ADMIN in a container), the trainer's file size is limited instead
(RLIMIT_FSIZE via prlimit: a write past it fails with EFBIG, as CPython ignores SIGXFSZ).
"""

from __future__ import annotations

import os
import resource
import time

import msgspec
import pytest

from libs.common import topology
from libs.common.artifacts import ArtifactError, ArtifactStore
from libs.common.events import CheckpointSaved, DatasetAccepted, TrainingFailed
from tests.faults.ledger import Ledger
from tests.faults.stack import FaultStack
from tests.faults.trials import ServedWatch, Trial, TrialTable
from tests.faults.workload import Triggers, quiet, submit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

# Less than one checkpoint of the tiny model (~5 MB of weights): the write starts and cannot end.
LEFT_FREE = 2 << 20


class Ballast:
    """Fills the checkpoints' tmpfs but `LEFT_FREE` bytes (or limits the trainer's file size)."""

    def __init__(self, stack: FaultStack) -> None:
        self.stack = stack
        self.path = stack.checkpoints.path / ".ballast"
        self.limited_pid: int | None = None

    def fill(self) -> str:
        disk = self.stack.checkpoints
        if disk.mounted:
            size = disk.free_bytes() - LEFT_FREE
            with open(self.path, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, size)
            return f"tmpfs {disk.size_mb} MB filled, {disk.free_bytes() >> 10} KB left"
        self.limited_pid = self.stack.pid("trainer")
        log_size = (self.stack.data_dir / "logs" / "trainer.log").stat().st_size
        limit = log_size + (1 << 20)  # the log (appended to) may still grow; a checkpoint's weights may not
        resource.prlimit(self.limited_pid, resource.RLIMIT_FSIZE, (limit, limit))
        return f"RLIMIT_FSIZE {limit >> 10} KB on the trainer ({disk.why_not})"

    def empty(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.limited_pid is not None:
            try:
                resource.prlimit(self.limited_pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            except ProcessLookupError:
                pass  # it died of it and was restarted without the limit


async def test_a_full_disk_during_a_checkpoint_write(fault_stack: FaultStack, fault_bus, trials: TrialTable):
    bus = fault_bus
    store = ArtifactStore(fault_stack.data_dir / "artifacts")
    before = (await Ledger.read(bus)).last_seqs()
    ballast = Ballast(fault_stack)
    async with Triggers(bus) as triggers, ServedWatch(bus, fault_stack.url("inference"), fault_stack.api_key) as watch:
        how = ballast.fill()
        try:
            event = await submit(bus)
            accepted = await triggers.first(lambda s, d: s.startswith("dataset.accepted") and event.id.encode() in d, 120)
            assert accepted, "the dataset was not accepted"
            dataset_id = msgspec.json.decode(accepted[1], type=DatasetAccepted).dataset_id
            # The first failure (a dead letter is an outcome too); then room again.
            hit = await triggers.first(lambda s, d: dataset_id.encode() in d and s in (
                topology.TRAINING_FAILED, topology.TRAINING_FINISHED, topology.TRAINING_PAUSED), 180)
            failure_at = time.monotonic()
        finally:
            ballast.empty()
        assert hit, "the trainer neither failed nor finished with the disk full"
        first = hit[0]
        failed = msgspec.json.decode(hit[1], type=TrainingFailed) if first == topology.TRAINING_FAILED else None
        paused = first == topology.TRAINING_PAUSED

        def ended(ledger: Ledger) -> bool:
            return dataset_id in ledger.runs or dataset_id in ledger.failed_for_good
        ledger = await quiet(bus, fault_stack, timeout=180, until=ended)
    recovered_s = time.monotonic() - failure_at
    check = ledger.check(since=before)
    blessed_ok, blessed = watch.verdict(ledger.blessed)

    # Every checkpoint announced for the dataset is whole: its bytes are the announced hash
    # (retention may have removed some since; a removed one was whole when announced or it would
    # not have been resumed from).
    announced = [m.event for m in ledger.messages["TRAINING"]
                 if isinstance(m.event, CheckpointSaved) and m.event.dataset_id == dataset_id]
    broken = []
    for checkpoint in announced:
        try:
            store.verify(checkpoint.uri, checkpoint.sha256)
        except ArtifactError as exc:
            if "does not exist" not in str(exc):
                broken.append(str(exc))
    runs = sorted(ledger.runs.get(dataset_id, ()))
    letter = ledger.dead_letters.get(("trainer-normal", accepted_id(ledger, dataset_id)))
    if failed is not None:
        what = f"training.failed (will_retry={failed.will_retry}): {failed.error[:70]}"
    elif paused:
        what = "training.paused by the disk floor before the write"
    else:
        what = f"{first} (no failure seen)"
    outcome = (f"{what}; room again → " + (f"trained once ({runs[0]}) {recovered_s:.0f} s later" if len(runs) == 1
               else f"dead-lettered: {letter.headers.get('Flywheel-Dead-Letter-Reason', '')[:60]}" if letter
               else f"runs {runs}") + (f"; BROKEN checkpoints announced: {broken}" if broken else
                                       f"; {len(announced)} checkpoints announced, all whole"))
    ok = check.ok and blessed_ok and not broken and (len(runs) == 1 or letter is not None) and (
        failed is not None or paused)
    trials.add(Trial("full disk", f"disk full: {how}", "the dataset's first checkpoint write", outcome,
                     len(check.lost), len(check.trained_twice), len(check.unsettled), blessed, ok))

    assert check.ok, check.describe()
    assert not broken, broken
    assert failed is not None or paused, f"the full disk neither paused nor failed the run: {first}"
    assert len(runs) == 1 or letter is not None, f"dataset neither trained once nor dead-lettered: runs {runs}"
    assert blessed_ok, blessed


def accepted_id(ledger: Ledger, dataset_id: str) -> str:
    return next((m.headers.get("Nats-Msg-Id", "") for m in ledger.messages["DATASETS"]
                 if isinstance(m.event, DatasetAccepted) and m.event.dataset_id == dataset_id), "")
