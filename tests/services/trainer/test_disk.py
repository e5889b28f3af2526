"""Unit: the disk floor's decisions with an injected free-space probe (a real small filesystem is
exercised in tests/services/trainer/test_disk_floor.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.disk import DiskFull, check_room, room_again


def test_below_the_floor_nothing_may_be_written_and_the_error_says_how_much_is_free():
    with pytest.raises(DiskFull) as caught:
        check_room(Path("/x"), 1_000_000_000, "checkpoint of step 7", probe=lambda _: 250_000_000)
    assert (caught.value.free_bytes, caught.value.floor_bytes) == (250_000_000, 1_000_000_000)
    assert "0.250 GB free" in str(caught.value) and "checkpoint of step 7" in str(caught.value)
    assert check_room(Path("/x"), 1_000_000_000, "run", probe=lambda _: 1_000_000_000) == 1_000_000_000
    assert check_room(Path("/x"), 0, "run", probe=lambda _: 0) == 0  # no floor


def test_work_resumes_only_with_a_margin_above_the_floor():
    assert not room_again(1_050_000_000, 1_000_000_000)
    assert room_again(1_100_000_000, 1_000_000_000)
