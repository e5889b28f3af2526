"""The champion pointer in KV (bucket `champion`, key `current`), read and written with compare-and-set.

`write` succeeds only if the key is still at the revision that was read; otherwise it raises
`ChampionChanged` and the caller decides again on the newer champion. That is what keeps two
deployers from both promoting: only one write per revision can win.
"""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from libs.common.kv import RevisionConflict, read_entry, write_entry

from services.deployer.promotion import Champion

KEY = "current"


class ChampionChanged(Exception):
    """Someone else wrote the champion since it was read."""


class NothingToRollBack(Exception):
    """There is no earlier champion to return to."""


class ChampionBoard:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def read(self) -> tuple[Champion | None, int]:
        """The champion and its revision; (None, revision to write over) when there is none."""
        value, revision = await read_entry(self.kv, KEY)
        return (msgspec.json.decode(value, type=Champion) if value else None), revision

    async def write(self, champion: Champion, revision: int) -> int:
        """Store `champion` if the key is still at `revision` (0: absent); the new revision."""
        try:
            return await write_entry(self.kv, KEY, msgspec.json.encode(champion), revision)
        except RevisionConflict as exc:
            raise ChampionChanged(str(exc)) from exc

    async def history(self) -> list[Champion]:
        """Every champion still kept by the bucket (its history depth), oldest first."""
        try:
            entries = await self.kv.history(KEY)
        except nats.js.errors.NoKeysError:
            return []
        return [msgspec.json.decode(e.value, type=Champion) for e in entries if e.value]
