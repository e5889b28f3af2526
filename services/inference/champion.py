"""Which model should be served: the champion named by the deployer, or the base model.

The deployer owns the champion pointer (KV bucket `champion`, key `current`) and announces
every change, rollbacks included, with `model.deployed`. This module turns the record or a
deployment into a `ModelTarget` and decides whether it differs from what is loaded. The record is decoded
leniently: the deployer may add fields, and only the ones below matter here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.js.kv import KeyValue

from libs.common.events import ModelDeployed
from libs.common.kv import read_entry

CHAMPION_KEY = "current"
Source = Literal["champion", "base"]


class ChampionRecord(msgspec.Struct, kw_only=True):
    checkpoint_uri: str
    checkpoint_sha256: str
    run_id: str = ""
    step: int = 0
    # The ModelDeployed event that announced this record.
    event_id: str = ""


class ChampionError(ValueError):
    """The champion record in the KV bucket cannot be read."""


@dataclass(frozen=True)
class ModelTarget:
    """What to load. For the base model, uri and sha256 are filled in once it is resolved."""

    source: Source
    uri: str = ""
    sha256: str = ""
    run_id: str = ""
    step: int = 0
    event_id: str = ""


BASE = ModelTarget(source="base")


def decode_champion(data: bytes) -> ModelTarget:
    try:
        record = msgspec.json.decode(data, type=ChampionRecord, strict=False)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChampionError(f"champion record does not decode: {exc}") from exc
    return ModelTarget(
        "champion", record.checkpoint_uri, record.checkpoint_sha256, record.run_id, record.step, record.event_id
    )


async def read_champion(kv: KeyValue) -> ModelTarget:
    """The champion in the KV bucket, or BASE when none was ever deployed (or it was deleted)."""
    value, _ = await read_entry(kv, CHAMPION_KEY)
    return decode_champion(value) if value else BASE


def target_for_event(event: ModelDeployed) -> ModelTarget:
    return ModelTarget("champion", event.checkpoint_uri, event.checkpoint_sha256, event.run_id, event.step, event.id)


def needs_reload(loaded: ModelTarget | None, wanted: ModelTarget, *, force: bool = False) -> bool:
    if force or loaded is None:
        return True
    if wanted.source == "base":
        return loaded.source != "base"
    return loaded.source != "champion" or loaded.sha256 != wanted.sha256
