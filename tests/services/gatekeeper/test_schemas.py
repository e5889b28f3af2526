"""Every quick check fails on its bad case and passes on a near miss, for every schema; streaming and normalisation."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import msgspec
import pytest

from libs.common.chat import ChatRow
from services.gatekeeper.checks import MAX_NESTING, Tally
from services.gatekeeper.pipeline import (
    Tools,
    Validation,
    ValidationConfig,
    ValidationInterrupted,
    checks_for,
    describe_schemas,
)
from services.gatekeeper.reading import Limits
from services.gatekeeper.schemas import SCHEMAS, json_schemas, lookup
from tests.services.gatekeeper.samples import chat, jsonl, no_tokens

GOOD = json.dumps(chat(("user", "hi"), ("assistant", "hello"))).encode() + b"\n"
PUZZLE = {"syllables": ["ba", "na", "na", "ap", "ple"], "answers": ["banana", "apple"], "difficulty": 2}
SYLLO = json.dumps(chat(("user", "ba na na ap ple?"), ("assistant", "banana, apple"), puzzle=PUZZLE)).encode() + b"\n"
TEXT = b'{"text": "Once upon a time"}\n'


def validate(tmp_path: Path, data: bytes, *, schema: str = "chat_sft_v1", level: str = "quick",
             limits: Limits | None = None, max_findings: int = 100, stop: threading.Event | None = None):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    tally = Tally(max_findings)
    config = ValidationConfig(limits=limits or Limits())
    validation = Validation(lookup(schema), level, config, tally, Tools(tokens=no_tokens))
    rows = b"".join(validation.run(path, stop)).splitlines(keepends=True)
    return tally, rows


def line(row: dict) -> bytes:
    return json.dumps(row).encode() + b"\n"


def nested(depth: int) -> bytes:
    """A good row plus an extra field that takes the whole line to `depth` levels."""
    return GOOD[:-2] + b', "meta": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\n"


def syllo(**puzzle) -> bytes:
    return line(chat(("user", "q"), ("assistant", "banana apple"), puzzle={**PUZZLE, **puzzle}))


# (schema, check, bad content, near-miss content that passes, limits)
CASES = [
    ("chat_sft_v1", "file_size", GOOD * 3, GOOD * 2, Limits(max_file_bytes=len(GOOD) * 2)),
    ("chat_sft_v1", "file_empty", b"", GOOD, Limits()),
    ("chat_sft_v1", "gzip", b"\x1f\x8b\x08\x00broken", GOOD, Limits()),
    ("chat_sft_v1", "binary", b"\x89PNG\r\n\x1a\n\x00\x00", GOOD, Limits()),
    ("chat_sft_v1", "encoding", GOOD.decode().encode("utf-16"), GOOD, Limits()),
    ("chat_sft_v1", "no_rows", b"\n \n", b"\n" + GOOD, Limits()),
    ("chat_sft_v1", "line_size", GOOD[:-1] + b" " * 2 + b"\n", GOOD[:-1] + b" " + b"\n",
     Limits(max_line_bytes=len(GOOD))),
    ("chat_sft_v1", "utf8", "café".encode("latin-1").join(GOOD.split(b"hi")), "café".encode().join(GOOD.split(b"hi")),
     Limits()),
    ("chat_sft_v1", "json", b'{"messages": [}\n', GOOD, Limits()),
    ("chat_sft_v1", "json", b'{"messages": []} {}\n', GOOD, Limits()),
    ("chat_sft_v1", "json", GOOD.replace(b"hello", b"\\ud83d"), GOOD.replace(b"hello", b"\\ud83d\\ude00"), Limits()),
    ("chat_sft_v1", "nesting", nested(MAX_NESTING + 1), nested(MAX_NESTING), Limits()),
    ("chat_sft_v1", "nesting", b"[" * 100_000 + b"]" * 100_000 + b"\n", GOOD, Limits()),
    ("chat_sft_v1", "json_object", b'[{"role": "user", "content": "hi"}]\n', GOOD, Limits()),
    ("chat_sft_v1", "json_object", b"null\n", GOOD, Limits()),
    ("chat_sft_v1", "messages_field", line({"conversation": []}), GOOD, Limits()),
    ("chat_sft_v1", "messages_field", line({"messages": {"role": "user"}}), GOOD, Limits()),
    ("chat_sft_v1", "messages_field", line({"messages": []}), GOOD, Limits()),
    ("chat_sft_v1", "message_shape", line({"messages": ["hi", {"role": "assistant", "content": "x"}]}), GOOD, Limits()),
    ("chat_sft_v1", "message_shape", line({"messages": [{"role": "assistant"}]}), GOOD, Limits()),
    ("chat_sft_v1", "message_shape", line(chat(("user", "hi"), ("assistant", 4))),
     line(chat(("user", "hi"), ("assistant", "4"))), Limits()),
    ("chat_sft_v1", "role", line(chat(("tool", "hi"), ("assistant", "x"))),
     line(chat(("system", "hi"), ("assistant", "x"))), Limits()),
    ("chat_sft_v1", "role", line(chat(("User", "hi"), ("assistant", "x"))), GOOD, Limits()),
    ("chat_sft_v1", "profile", line(chat(("user", "hi"), ("assistant", "x"), profile="maths")),
     line(chat(("user", "hi"), ("assistant", "x"), profile="binary")), Limits()),
    ("chat_sft_v1", "content_nonempty", line(chat(("user", ""), ("assistant", "x"))),
     line(chat(("user", " . "), ("assistant", "x"))), Limits()),
    ("chat_sft_v1", "content_nonempty", line(chat(("user", "hi"), ("assistant", " \n\t\u3000"))), GOOD, Limits()),
    ("chat_sft_v1", "has_assistant", line(chat(("system", "s"), ("user", "hi"))),
     line(chat(("system", "s"), ("assistant", "x"))), Limits()),
    ("chat_sft_v1", "last_turn_assistant", line(chat(("user", "a"), ("assistant", "b"), ("user", "c"))),
     line(chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))), Limits()),
    ("syllo_v1", "puzzle", line(chat(("user", "q"), ("assistant", "banana"))), SYLLO, Limits()),
    ("syllo_v1", "puzzle", syllo(syllables=[]), syllo(syllables=["x"]), Limits()),
    ("syllo_v1", "puzzle", syllo(answers=["banana", ""]), syllo(answers=["banana"]), Limits()),
    ("syllo_v1", "puzzle", syllo(difficulty=0), syllo(difficulty=1), Limits()),
    ("syllo_v1", "puzzle", syllo(syllables="ba na"), syllo(syllables=["ba na"]), Limits()),
    ("syllo_v1", "last_turn_assistant",
     line(chat(("assistant", "x"), ("user", "q"), puzzle=PUZZLE)), SYLLO, Limits()),
    ("completion_v1", "text_field", b'{"txt": "a"}\n', TEXT, Limits()),
    ("completion_v1", "text_field", b'{"text": ["a"]}\n', TEXT, Limits()),
    ("completion_v1", "content_nonempty", b'{"text": "  \\n "}\n', b'{"text": " x "}\n', Limits()),
]


@pytest.mark.parametrize(("schema", "check", "bad", "good", "limits"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_check_fails_on_bad_and_passes_on_near_miss(tmp_path: Path, schema, check, bad, good, limits):
    tally, rows = validate(tmp_path, bad, schema=schema, limits=limits)
    assert tally.error_counts[check] >= 1, tally.counts
    assert not rows
    finding = tally.checks[check].findings[0]
    assert tally.checks[check].severity == "error" and finding.reason

    tally, rows = validate(tmp_path, good, schema=schema, limits=limits)
    assert tally.num_errors == 0, tally.counts
    assert rows


def test_every_quick_error_check_of_every_schema_is_covered():
    submission_level = {"submission", "schema", "uri", "sha256"}  # covered in test_pipeline.py
    for schema in SCHEMAS.values():
        quick = {c.name for c in checks_for(schema, "quick") if c.severity == "error"}
        covered = {case[1] for case in CASES if case[0] == schema.name}
        shared = {case[1] for case in CASES if case[0] == "chat_sft_v1"}
        assert quick - submission_level <= covered | shared, (schema.name, quick - covered - shared)


def test_checks_nest_by_level_and_specs_list_each_level_once():
    for schema in SCHEMAS.values():
        quick, standard, deep = (checks_for(schema, level) for level in ("quick", "standard", "deep"))
        assert quick == standard[: len(quick)] and standard == deep[: len(standard)]
    described = {s["name"]: s for s in describe_schemas()}
    assert set(described) == {"chat_sft_v1", "syllo_v1", "completion_v1"} and described["chat_sft_v1"]["default"]
    assert [c["name"] for c in described["chat_sft_v1"]["checks"]["standard"]] == [
        "held_out", "template", "token_length", "token_truncation"]
    assert "held_out" not in [c["name"] for c in described["completion_v1"]["checks"]["standard"]]
    deep = [c["name"] for c in described["syllo_v1"]["checks"]["deep"]]
    assert deep[:2] == ["answer_format", "answer_leakage"] and "exact_duplicate" in deep
    assert "answer_leakage" not in [c["name"] for c in described["completion_v1"]["checks"]["deep"]]
    assert "puzzle" in [c["name"] for c in described["syllo_v1"]["checks"]["quick"]]


def test_row_json_schemas_describe_each_registered_schema():
    schemas = json_schemas()
    assert {"chat_sft_v1", "syllo_v1", "completion_v1"} <= set(schemas)
    assert schemas["syllo_v1"]["required"] == ["messages", "puzzle"]
    assert schemas["completion_v1"]["properties"]["text"]["type"] == "string"


def test_bom_is_stripped_with_a_warning(tmp_path: Path):
    tally, rows = validate(tmp_path, b"\xef\xbb\xbf" + GOOD)
    assert tally.counts == {"bom": 1} and tally.num_errors == 0
    assert rows == [b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}\n']


def test_blank_lines_and_extra_fields_are_warnings_only(tmp_path: Path):
    data = b"\n" + line(chat(("user", "hi"), ("assistant", "x"), id=7) | {"messages": [
        {"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "x"}]}) + b"\r\n"
    tally, rows = validate(tmp_path, data)
    assert tally.num_errors == 0 and tally.num_rows == tally.num_rows_valid == 1
    assert tally.counts == {"blank_line": 2, "extra_fields": 2}
    assert rows == [b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x"}]}\n']


def test_findings_have_line_numbers_and_a_row_reports_all_its_problems(tmp_path: Path):
    bad = line({"messages": [{"role": "bot", "content": "a"}, {"role": "user", "content": 1}]})
    tally, rows = validate(tmp_path, GOOD + bad + GOOD)
    assert len(rows) == 2 and tally.num_rows == 3 and tally.num_rows_dropped == 1
    assert {(f.line, name) for name, found in tally.checks.items() for f in found.findings} == {
        (2, "role"), (2, "message_shape")}


def test_fast_and_slow_paths_agree_on_a_big_mixed_file(tmp_path: Path):
    """Bad rows far apart in a large file: each block takes the path it needs, and nothing shifts."""
    good = [line(chat(("user", f"q{i}"), ("assistant", f"a{i}"))) for i in range(20_000)]
    bad_at = {17: line(chat(("user", "x"))), 9_001: b"  \n", 15_555: b'{"messages": 1}\n', 19_999: b"[]\n"}
    data = b"".join(bad_at.get(i, row) for i, row in enumerate(good))
    tally, rows = validate(tmp_path, data)
    found = {f.line: name for name, check in tally.checks.items() for f in check.findings}
    assert found == {18: "has_assistant", 9_002: "blank_line", 15_556: "messages_field", 20_000: "json_object"}
    assert len(rows) == 20_000 - 4 and tally.num_rows == 19_999
    kept = {i for i in range(20_000) if i not in bad_at}
    assert rows == [msgspec.json.encode(msgspec.json.decode(good[i])) + b"\n" for i in sorted(kept)]


def test_profile_is_kept_in_the_normalised_row(tmp_path: Path):
    _, rows = validate(tmp_path, line(chat(("user", "q"), ("assistant", "a"), profile="binary")))
    assert rows == [b'{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],'
                    b'"profile":"binary"}\n']


def test_syllo_and_completion_rows_are_normalised(tmp_path: Path):
    tally, rows = validate(tmp_path, line(json.loads(SYLLO) | {"source": "generator"}), schema="syllo_v1")
    assert tally.counts == {"extra_fields": 1}
    assert msgspec.json.decode(rows[0]) == json.loads(SYLLO)  # puzzle kept, extra field dropped
    assert msgspec.json.decode(rows[0], type=ChatRow).messages[1].content == "banana, apple"
    tally, rows = validate(tmp_path, b'{ "text" : "a\\u00e9", "id": 3 }\n', schema="completion_v1")
    assert rows == ['{"text":"aé"}\n'.encode()] and tally.counts == {"extra_fields": 1}


def test_findings_are_capped_per_check_but_counts_are_complete(tmp_path: Path):
    tally, _ = validate(tmp_path, b"[1]\n" * 2000 + b"\n" * 50, max_findings=10)
    assert len(tally.checks["json_object"].findings) == 10 and tally.checks["json_object"].count == 2000
    assert len(tally.checks["blank_line"].findings) == 10 and tally.checks["blank_line"].count == 50


def test_normalised_rows_are_compact_utf8_and_read_as_chat_rows(tmp_path: Path):
    messy = (b'{ "messages" : [ {"content": "caf\\u00e9 \\ud83d\\ude00", "role": "user"},\t'
             b'{"role":"assistant","content":" x "} ] }\n')
    _, rows = validate(tmp_path, messy)
    assert rows == ['{"messages":[{"role":"user","content":"café 😀"},{"role":"assistant","content":" x "}]}\n'
                    .encode()]
    assert msgspec.json.decode(rows[0], type=ChatRow).messages[1].content == " x "


def test_same_conversations_in_any_formatting_give_the_same_dataset_bytes(tmp_path: Path):
    rows = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(3)]
    compact = jsonl(rows)
    pretty = b"\xef\xbb\xbf" + b"\n".join(
        json.dumps({"id": i, **row}, indent=None, separators=(", ", " : ")).encode() for i, row in enumerate(rows)
    ) + b"\n\n"
    _, a = validate(tmp_path, compact)
    _, b = validate(tmp_path, pretty)
    assert a == b
    assert hashlib.sha256(b"".join(a)).hexdigest() == hashlib.sha256(compact).hexdigest()


def test_a_stop_interrupts_within_a_few_blocks(tmp_path: Path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(ValidationInterrupted):
        validate(tmp_path, GOOD * 100_000, stop=stop)


def test_every_check_is_named_in_a_test():
    """A guard for "every check has a test": each check's name appears in this folder's tests."""
    from services.gatekeeper.checks import SUBMISSION_CHECKS

    names = {c.name for schema in SCHEMAS.values() for c in checks_for(schema, "deep")}
    names |= {c.name for c in SUBMISSION_CHECKS}
    sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    sources += (Path(__file__).parent / "malformed" / "expected.toml").read_text()
    assert {name for name in names if f'"{name}"' not in sources} == set()


def test_a_value_spread_over_lines_is_not_taken_for_rows_on_the_fast_path(tmp_path: Path):
    # Three lines, each starting with "{", that hold three values between them: one spread over
    # the first two lines, two on the third. None of the three lines is one JSON object.
    row = SYLLO.rstrip(b"\n")
    split = row.index(b'"puzzle":') + len(b'"puzzle":')
    data = row[:split] + b"\n" + row[split:].lstrip() + b"\n" + row + b" " + row + b"\n"
    assert all(part.startswith(b"{") for part in data.splitlines())
    tally, rows = validate(tmp_path, data, schema="syllo_v1")
    assert rows == []
    assert tally.num_rows == 3 and tally.num_rows_valid == 0
    assert set(tally.counts) == {"json"}


def test_check_runs_every_check_of_run_and_reports_progress_in_bytes(tmp_path: Path):
    data = GOOD * 5000 + line(chat(("user", "no answer"))) + b"  \n" + GOOD
    tally_run, rows = validate(tmp_path, data)
    path = tmp_path / "again.jsonl"
    path.write_bytes(data)
    tally, seen = Tally(100), []
    Validation(lookup("chat_sft_v1"), "quick", ValidationConfig(), tally, Tools(tokens=no_tokens)).check(
        path, progress=seen.append)
    assert tally.counts == tally_run.counts == {"has_assistant": 1, "blank_line": 1}
    assert (tally.num_rows, tally.num_rows_valid) == (tally_run.num_rows, tally_run.num_rows_valid) == (5002, 5001)
    assert len(seen) > 1 and sum(seen) == len(data)
