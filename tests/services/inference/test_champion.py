"""Which model to serve: the champion record, announcements and the reload decision."""

from __future__ import annotations

import msgspec
import pytest

from libs.common.events import ModelDeployed
from libs.common.records import Champion
from services.inference.champion import (
    BASE,
    ChampionError,
    ModelTarget,
    needs_reload,
    read_champion,
    target_for_champion,
    target_for_event,
)
from services.inference.serving import served_model_id

A = ModelTarget("champion", "file:///a", "aaaa" * 16, "run-1", 10)
B = ModelTarget("champion", "file:///b", "bbbb" * 16, "run-1", 20)


def test_the_champion_record_names_its_checkpoint_and_fields_added_later_are_ignored():
    record = msgspec.json.encode({
        "checkpoint_uri": "file:///a", "checkpoint_sha256": "aaaa" * 16, "run_id": "run-1", "step": 10,
        "exact_match": 0.5, "val_loss": 1.0, "suite_version": "s", "deployed_at": "2025-01-01T00:00:00Z",
        "history": [1, 2], "event_id": "e1",
    })
    champion = msgspec.json.decode(record, type=Champion)
    assert target_for_champion(champion) == ModelTarget("champion", A.uri, A.sha256, "run-1", 10, "e1")
    assert target_for_champion(None) == BASE


class _Unreadable:
    """A KV record whose stored bytes do not decode."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self):
        return msgspec.json.decode(self.data, type=Champion), 1


@pytest.mark.parametrize("data", [b'{"run_id": "x"}', b"not json"])
async def test_an_unreadable_record_is_a_champion_error(data: bytes):
    with pytest.raises(ChampionError):
        await read_champion(_Unreadable(data))


def test_reload_only_when_the_wanted_model_differs():
    assert needs_reload(None, BASE)
    assert needs_reload(None, A)
    assert not needs_reload(A, A)
    assert not needs_reload(A, ModelTarget("champion", "file:///elsewhere", A.sha256))  # same bytes
    assert needs_reload(A, B)
    assert needs_reload(A, BASE)
    assert needs_reload(ModelTarget("base", "file:///base"), A)
    assert not needs_reload(ModelTarget("base", "file:///base"), BASE)
    assert needs_reload(A, A, force=True)


def test_deployment_names_its_checkpoint():
    event = ModelDeployed(checkpoint_uri=B.uri, checkpoint_sha256=B.sha256, run_id="run-1", step=20,
                          exact_match=0.9, val_loss=1.0, reason="better")
    assert target_for_event(event) == ModelTarget("champion", B.uri, B.sha256, "run-1", 20, event.id)


def test_served_model_ids():
    assert served_model_id("flywheel", BASE) == "flywheel:base"
    assert served_model_id("flywheel", A) == "flywheel:run-1-step10"
    assert served_model_id("flywheel", ModelTarget("champion", "u", "abcdef0123456789")) == "flywheel:abcdef012345"
