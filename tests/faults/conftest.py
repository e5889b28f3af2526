"""The fault suite's shared pieces: one running stack for every trial, a bus per test, the
trial table (printed at the end of the session whatever `-s` says, and written to a file).

    .venv/bin/pytest -m faults tests/faults -q          (FAULTS_SEED=<n> repeats a kill schedule)
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.faults.stack import FaultStack
from tests.faults.trials import TrialTable
from tests.faults.workload import all_ready

# Not FLYWHEEL_*: the services refuse variables with that prefix that name no setting.
SEED_ENV = "FAULTS_SEED"
TABLE = pytest.StashKey[TrialTable]()
TABLE_PATH = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def trials(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TrialTable:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1, 2**31))
    table = TrialTable(seed=seed)
    request.config.stash[TABLE] = table
    request.config.stash[TABLE_PATH] = tmp_path_factory.getbasetemp() / "faults" / "trials.txt"
    return table


# Per package: the stack (seven services) stops once the last trial is done, not at the end of
# the whole test session, where it would keep two cores busy under every later test.
@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory: pytest.TempPathFactory, trials: TrialTable):
    stack = FaultStack(tmp_path_factory.mktemp("faults-stack") / "data")
    stack.start()
    if not stack.checkpoints.mounted:
        trials.notes.append(f"checkpoint tmpfs not mounted ({stack.checkpoints.why_not}); the full-disk trial "
                            "limits the trainer's file size instead (RLIMIT_FSIZE)")
    try:
        yield stack
    finally:
        stack.stop()
        trials.ended = time.monotonic()


@pytest.fixture
async def fault_bus(fault_stack: FaultStack):
    """A bus on the stack, once every service is ready."""
    from libs.common.bus import Bus

    await all_ready(fault_stack, timeout=240)
    bus = await Bus.connect([fault_stack.nats_url], "fault-suite")
    try:
        yield bus
    finally:
        await bus.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    table = config.stash.get(TABLE, None)
    if table is None or not table.rows:
        return
    path = config.stash[TABLE_PATH]
    table.write(path)
    terminalreporter.write_sep("=", "fault trials")
    terminalreporter.write_line(table.render())
    terminalreporter.write_line(f"(also in {path})")
