"""Which model should be served: the champion named by the deployer, or the base model.

The deployer owns the champion record (`libs.common.records.CHAMPION`) and announces every
change, rollbacks included, with `model.deployed`; before a change it stages the checkpoint
(`model.staged`) for inference to load and confirm. This module turns the record, a deployment
or a staged checkpoint into a `ModelTarget` and decides whether it differs from what is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from libs.common.events import ModelDeployed, ModelStaged
from libs.common.kv import Record
from libs.common.records import Champion, Deployment

Source = Literal["champion", "base"]


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


async def read_champion(record: Record[Champion]) -> ModelTarget:
    """The champion in KV, or BASE when none was ever deployed (or it was deleted)."""
    try:
        champion, _ = await record.read()
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChampionError(f"champion record does not decode: {exc}") from exc
    return target_for_champion(champion)


def target_for_champion(champion: Champion | None) -> ModelTarget:
    if champion is None:
        return BASE
    return ModelTarget("champion", champion.checkpoint_uri, champion.checkpoint_sha256, champion.run_id,
                       champion.step, champion.event_id)


def target_for_event(event: ModelDeployed | ModelStaged) -> ModelTarget:
    return ModelTarget("champion", event.checkpoint_uri, event.checkpoint_sha256, event.run_id, event.step, event.id)


def target_for_deployment(deployment: Deployment) -> ModelTarget:
    """A staged deployment read from KV (its `model.staged` missed): the candidate it would crown."""
    candidate = deployment.candidate
    return ModelTarget("champion", candidate.checkpoint_uri, candidate.checkpoint_sha256, candidate.run_id,
                       candidate.step, candidate.event_id)


def needs_reload(loaded: ModelTarget | None, wanted: ModelTarget, *, force: bool = False) -> bool:
    if force or loaded is None:
        return True
    if wanted.source == "base":
        return loaded.source != "base"
    return loaded.source != "champion" or loaded.sha256 != wanted.sha256
