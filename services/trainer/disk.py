"""The disk floor: below it the trainer writes no checkpoint and starts no run; it pauses itself.

Checked before every checkpoint write (on the training thread, at a step boundary) and before a
run starts. Falling below pauses the trainer (services/trainer/service.py: the run stops without
writing, its dataset is released, `training.paused` says why); it takes work again by itself
once `floor * (1 + RESUME_MARGIN)` bytes are free, whether retention freed them or an operator
did. Not `paused` mode: the operator's pause stays the operator's, and a disk that has room again
needs nobody to remember to resume. The margin keeps it from flapping at the edge, where each
pause costs the steps since the last checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

# Room needed to take work again, beyond the floor.
RESUME_MARGIN = 0.1

Probe = Callable[[Path], int]


class DiskFull(Exception):
    """Less than the floor is free: nothing more may be written until there is room again."""

    def __init__(self, free_bytes: int, floor_bytes: int, before: str) -> None:
        super().__init__(f"{free_bytes / 1e9:.3f} GB free under the artifacts, below the floor of "
                         f"{floor_bytes / 1e9:.3f} GB; paused before {before}")
        self.free_bytes = free_bytes
        self.floor_bytes = floor_bytes
        self.before = before


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem `path` will be written to: its nearest existing folder's
    (checkpoints may live on a mount of their own, apart from the rest of the artifacts)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(path: Path, floor_bytes: int, before: str, probe: Probe = free_bytes) -> int:
    """The free bytes at `path`; raises DiskFull when they are below `floor_bytes` (0: no floor)."""
    free = probe(path)
    if floor_bytes and free < floor_bytes:
        raise DiskFull(free, floor_bytes, before)
    return free


def room_again(free: int, floor_bytes: int) -> bool:
    """Whether a paused trainer may take work again with `free` bytes free."""
    return free >= floor_bytes * (1 + RESUME_MARGIN)
