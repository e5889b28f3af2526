"""`flywheel skip --reason TEXT`: the reason is required, and travels with the request on
control.trainer.skip; the trainer's reply is printed (one JSON document with --json)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from flywheel.cli import build_parser
from libs.common import topology
from libs.common.bus import Bus
from libs.common.events import ControlReply, ControlTraining
from tests.flywheel.test_cli import cli_env, run_cli_async


def test_skip_without_a_reason_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["skip"])
    assert exited.value.code == 2 and "--reason" in capsys.readouterr().err
    assert build_parser().parse_args(["skip", "--reason", "bad labels"]).reason == "bad labels"


@pytest.mark.integration
async def test_skip_sends_its_reason_and_prints_the_trainers_reply(bus: Bus, nats_server: str, tmp_path: Path):
    asked: list[ControlTraining] = []

    async def answer_like_the_trainer(msg) -> None:
        asked.append(msgspec.json.decode(msg.data, type=ControlTraining))
        await msg.respond(msgspec.json.encode(ControlReply(ok=True, state="skipping", message="skipping dataset d")))

    await bus.nc.subscribe(f"{topology.CONTROL_TRAINER}.skip", cb=answer_like_the_trainer)
    code, out, _ = await run_cli_async("skip", "--reason", "labels are wrong", "--json",
                                       env=cli_env(tmp_path, nats_server))
    assert code == 0 and json.loads(out) == {"ok": True, "state": "skipping", "message": "skipping dataset d"}
    assert asked == [ControlTraining(action="skip", requested_by="cli", reason="labels are wrong")]
