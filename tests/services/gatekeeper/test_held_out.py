"""Submitted rows that pose a held-out problem are dropped with the problem named; the rest of the file is kept."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from flywheel.cli import main
from libs.common.chat import ChatRow
from libs.common.skills import binary, syllo
from services.gatekeeper.checks import Batch, Tally
from services.gatekeeper.checks.held_out import HeldOut, held_out_reason
from services.gatekeeper.pipeline import checks_for
from services.gatekeeper.schemas import lookup
from tests.services.gatekeeper.samples import chat


def _rows(skill, level: int, n: int, split: str) -> list[dict]:
    return [{"messages": row["messages"]} for row in skill.generate(level, n, seed=3, split=split)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def test_held_out_items_of_every_skill_are_dropped_and_training_rows_kept():
    held_out = _rows(binary, 1, 3, "eval") + _rows(binary, 3, 3, "eval") + _rows(syllo, 2, 2, "eval")
    trained = _rows(binary, 1, 5, "train") + _rows(syllo, 1, 2, "train") + [chat(("user", "hi"), ("assistant", "hello"))]
    rows = msgspec.convert(trained[:3] + held_out + trained[3:], list[ChatRow])
    tally = Tally(100)
    batch = Batch(rows, range(1, len(rows) + 1), tally)
    tally.rows(len(rows), len(rows))
    HeldOut(lookup("chat_sft_v1"))(batch)
    assert tally.error_counts == {"held_out": len(held_out)}
    assert [i for i in range(len(rows)) if i not in batch.live()] == list(range(3, 3 + len(held_out)))
    reasons = [f.reason for f in tally.checks["held_out"].findings]
    assert [f.line for f in tally.checks["held_out"].findings] == list(range(4, 4 + len(held_out)))
    assert reasons[0].startswith("poses a held-out binary problem: binary add ")
    assert reasons[-1].startswith("poses a held-out syllo problem: syllo word ")


def test_a_held_out_problem_is_recognised_in_another_wording_and_operand_order():
    [row] = _rows(binary, 1, 1, "eval")
    prompt = row["messages"][0]["content"]
    first, second = prompt.split("\n\n")[1].split(" + ")
    reworded = f"Add these two binary numbers using ⓪① notation:\n\n{second} + {first}\n\nShow your work in prefix notation."
    assert held_out_reason(reworded) == held_out_reason(prompt) is not None


def test_a_sum_that_states_a_held_out_number_on_the_way_is_dropped_too():
    # 11 + 31 = 42, and 42 is a held-out number: its conversion is a held-out item of level 2.
    reason = held_out_reason(binary._arithmetic("add", 11, 31, verified=False).prompt)
    assert reason and reason.startswith("states a held-out binary fact on the way")
    assert held_out_reason("What is the capital of France?") is None
    assert held_out_reason("Convert ① to binary, then tell me a joke") is None  # a trained conversion


def test_the_check_runs_at_the_standard_level_the_default_of_every_channel():
    for schema in ("chat_sft_v1", "syllo_v1"):
        assert "held_out" not in {c.name for c in checks_for(lookup(schema), "quick")}
        assert "held_out" in {c.name for c in checks_for(lookup(schema), "standard")}


@pytest.mark.slow  # loads the tiny tokenizer
def test_flywheel_check_shows_the_same_drops(tmp_path: Path, monkeypatch, capsys, tiny_model_dir: Path):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLYWHEEL_BASE_MODEL", str(tiny_model_dir))
    source = tmp_path / "mine.jsonl"
    source.write_bytes(_jsonl(_rows(binary, 1, 30, "train") + _rows(binary, 1, 2, "eval")))
    assert main(["check", str(source), "--json"]) == 0
    report = msgspec.json.decode(capsys.readouterr().out)
    assert report["level"] == "standard" and report["counts"] == {"held_out": 2}
    assert all(f["reason"].startswith("poses a held-out binary problem: binary add ") for f in report["findings"]["held_out"]["findings"])
