"""Every validation check fails on its bad case and passes on a near miss; streaming and normalisation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec
import pytest

from libs.common.chat import ChatRow
from libs.common.models import load_tokenizer
from services.gatekeeper.chat_sft import TokenBudget
from services.gatekeeper.checks import MAX_NESTING, Tally
from services.gatekeeper.schemas import describe_schemas, lookup
from services.gatekeeper.validation import Limits, validate_file
from tests.services.gatekeeper.samples import chat, jsonl, no_tokens

SCHEMA = lookup("chat_sft_v1")
GOOD = json.dumps(chat(("user", "hi"), ("assistant", "hello"))).encode() + b"\n"


def run(tmp_path: Path, data: bytes, *, level="quick", limits=Limits(), tokens=no_tokens, max_findings=1000):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    tally = Tally(max_findings)
    rows = list(validate_file(path, SCHEMA, level, limits, tally, tokens))
    return tally, rows


def line(row: dict) -> bytes:
    return json.dumps(row).encode() + b"\n"


def nested(depth: int) -> bytes:
    """A good row plus an extra field that takes the whole line to `depth` levels."""
    return GOOD[:-2] + b', "meta": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\n"


# (check, bad content, near-miss content that passes, limits)
CASES = [
    ("file_size", GOOD * 3, GOOD * 2, Limits(max_file_bytes=len(GOOD) * 2)),
    ("file_empty", b"", GOOD, Limits()),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", GOOD, Limits()),
    ("no_rows", b"\n \n", b"\n" + GOOD, Limits()),
    ("line_size", GOOD[:-1] + b" " * 2 + b"\n", GOOD[:-1] + b" " + b"\n", Limits(max_line_bytes=len(GOOD))),
    ("utf8", "café".encode("latin-1").join(GOOD.split(b"hi")), "café".encode().join(GOOD.split(b"hi")), Limits()),
    ("json", b'{"messages": [}\n', GOOD, Limits()),
    ("json", b'{"messages": []} {}\n', GOOD, Limits()),
    ("nesting", nested(MAX_NESTING + 1), nested(MAX_NESTING), Limits()),
    ("json_object", b'[{"role": "user", "content": "hi"}]\n', GOOD, Limits()),
    ("json_object", b"null\n", GOOD, Limits()),
    ("messages_field", line({"conversation": []}), GOOD, Limits()),
    ("messages_field", line({"messages": {"role": "user"}}), GOOD, Limits()),
    ("messages_field", line({"messages": []}), GOOD, Limits()),
    ("message_shape", line({"messages": ["hi", {"role": "assistant", "content": "x"}]}), GOOD, Limits()),
    ("message_shape", line({"messages": [{"role": "assistant"}]}), GOOD, Limits()),
    ("message_shape", line(chat(("user", "hi"), ("assistant", 4))), line(chat(("user", "hi"), ("assistant", "4"))),
     Limits()),
    ("role", line(chat(("tool", "hi"), ("assistant", "x"))), line(chat(("system", "hi"), ("assistant", "x"))),
     Limits()),
    ("role", line(chat(("User", "hi"), ("assistant", "x"))), GOOD, Limits()),
    ("content_nonempty", line(chat(("user", ""), ("assistant", "x"))), line(chat(("user", " . "), ("assistant", "x"))),
     Limits()),
    ("content_nonempty", line(chat(("user", "hi"), ("assistant", " \n\t"))), GOOD, Limits()),
    ("has_assistant", line(chat(("system", "s"), ("user", "hi"))), line(chat(("system", "s"), ("assistant", "x"))),
     Limits()),
    ("last_turn_assistant", line(chat(("user", "a"), ("assistant", "b"), ("user", "c"))),
     line(chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))), Limits()),
]


@pytest.mark.parametrize(("check", "bad", "good", "limits"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_check_fails_on_bad_and_passes_on_near_miss(tmp_path: Path, check, bad, good, limits):
    tally, rows = run(tmp_path, bad, limits=limits)
    assert tally.error_counts[check] >= 1, tally.findings
    assert not rows
    found = next(f for f in tally.findings if f.check == check)
    assert found.severity == "error" and found.reason

    tally, rows = run(tmp_path, good, limits=limits)
    assert tally.num_errors == 0, tally.findings
    assert rows


def test_every_error_check_is_covered():
    quick = {c["name"] for c in describe_schemas()[0]["checks"]["quick"] if c["severity"] == "error"}
    submission_level = {"submission", "schema", "uri", "sha256"}  # covered in test_submissions.py
    assert quick - submission_level == {case[0] for case in CASES}


def test_bom_is_stripped_with_a_warning(tmp_path: Path):
    tally, rows = run(tmp_path, b"\xef\xbb\xbf" + GOOD)
    assert tally.counts["bom"] == 1 and tally.num_errors == 0 and tally.findings[0].severity == "warning"
    assert rows == [b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}\n']
    tally, _ = run(tmp_path, GOOD)
    assert "bom" not in tally.counts


def test_blank_lines_and_extra_fields_are_warnings_only(tmp_path: Path):
    data = b"\n" + line(chat(("user", "hi"), ("assistant", "x"), id=7) | {"messages": [
        {"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "x"}]}) + b"\r\n"
    tally, rows = run(tmp_path, data)
    assert tally.num_errors == 0 and tally.num_rows == tally.num_rows_valid == 1
    assert tally.counts == {"blank_line": 2, "extra_fields": 2}
    assert rows == [b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x"}]}\n']
    tally, _ = run(tmp_path, GOOD)
    assert not tally.counts


def test_findings_have_line_numbers_and_a_row_reports_all_its_problems(tmp_path: Path):
    bad = line({"messages": [{"role": "bot", "content": "a"}, {"role": "user", "content": 1}]})
    tally, rows = run(tmp_path, GOOD + bad + GOOD)
    assert len(rows) == 2 and tally.num_rows == 3 and tally.num_rows_dropped == 1
    assert {(f.line, f.check) for f in tally.findings} == {(2, "role"), (2, "message_shape")}


def test_crlf_lines_and_a_missing_final_newline_are_fine(tmp_path: Path):
    tally, rows = run(tmp_path, GOOD.replace(b"\n", b"\r\n") + GOOD.rstrip(b"\n"))
    assert tally.num_errors == 0 and len(rows) == 2


def test_huge_line_is_skipped_without_losing_the_lines_after_it(tmp_path: Path):
    huge = line(chat(("user", "x" * 50_000), ("assistant", "y")))
    tally, rows = run(tmp_path, GOOD + huge + GOOD, limits=Limits(max_line_bytes=1000))
    assert len(rows) == 2 and tally.num_rows == 3 and tally.num_lines == 3
    [finding] = tally.findings
    assert finding.line == 2 and finding.check == "line_size" and str(len(huge)) in finding.reason


def test_findings_are_capped_but_counts_are_complete(tmp_path: Path):
    tally, _ = run(tmp_path, b"[1]\n" * 2000, max_findings=10)
    assert len(tally.findings) == 10 and tally.counts["json_object"] == 2000 and tally.num_findings == 2000


def test_normalised_rows_are_compact_utf8_and_read_as_chat_rows(tmp_path: Path):
    messy = (b'{ "messages" : [ {"content": "caf\\u00e9 \\ud83d\\ude00", "role": "user"},\t'
             b'{"role":"assistant","content":" x "} ] }\n')
    _, rows = run(tmp_path, messy)
    assert rows == ['{"messages":[{"role":"user","content":"café 😀"},{"role":"assistant","content":" x "}]}\n'
                    .encode()]
    decoded = msgspec.json.decode(rows[0], type=ChatRow)
    assert decoded.messages[1].content == " x "


def test_same_conversations_in_any_formatting_give_the_same_dataset_bytes(tmp_path: Path):
    rows = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(3)]
    compact = jsonl(rows)
    pretty = b"\xef\xbb\xbf" + b"\n".join(
        json.dumps({"id": i, **row}, indent=None, separators=(", ", " : ")).encode() for i, row in enumerate(rows)
    ) + b"\n\n"
    _, a = run(tmp_path, compact)
    _, b = run(tmp_path, pretty)
    assert a == b
    assert hashlib.sha256(b"".join(a)).hexdigest() == hashlib.sha256(compact).hexdigest()


def test_quick_level_never_loads_the_tokenizer(tmp_path: Path):
    tally, rows = run(tmp_path, GOOD, level="quick", tokens=no_tokens)
    assert rows and tally.num_errors == 0


# ---------------------------------------------------------------------------- standard level


@pytest.fixture(scope="module")
def budget(tiny_model_dir) -> TokenBudget:
    return TokenBudget(load_tokenizer(tiny_model_dir), max_tokens=48)


def test_token_length_fails_when_no_answer_token_fits(tmp_path: Path, budget: TokenBudget):
    long_prompt = line(chat(("user", "add these two binary numbers " * 20), ("assistant", "42")))
    tally, rows = run(tmp_path, long_prompt, level="standard", tokens=lambda: budget)
    assert tally.error_counts["token_length"] == 1 and not rows
    assert "first 48 tokens" in tally.findings[0].reason

    tally, rows = run(tmp_path, GOOD, level="standard", tokens=lambda: budget)
    assert tally.num_findings == 0 and rows


def test_token_truncation_warns_but_keeps_the_row(tmp_path: Path, budget: TokenBudget):
    long_answer = line(chat(("user", "hi"), ("assistant", "the answer is " * 40)))
    tally, rows = run(tmp_path, long_answer, level="deep", tokens=lambda: budget)
    assert tally.counts == {"token_truncation": 1} and tally.num_errors == 0 and rows
    assert tally.findings[0].severity == "warning"


def test_token_checks_skip_rows_that_already_failed(tmp_path: Path, budget: TokenBudget):
    tally, _ = run(tmp_path, line(chat(("user", "x " * 200))), level="standard", tokens=lambda: budget)
    assert tally.counts == {"has_assistant": 1}
