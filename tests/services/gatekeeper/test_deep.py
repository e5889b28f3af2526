"""The deep level: duplicates (exact and near, in the file and against recent datasets), leakage, answer profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from libs.common.models import load_tokenizer
from libs.common.skills import binary
from services.gatekeeper.checks import Tally
from services.gatekeeper.checks.deep import binary_answer_problem, leaked_fraction, syllo_answer_problem
from services.gatekeeper.checks.standard import TokenCounter
from services.gatekeeper.duplicates import Fingerprints, RecentIndex, earliest_similar, exact_key, signatures
from services.gatekeeper.pipeline import Tools, Validation, ValidationConfig
from services.gatekeeper.schemas import lookup
from tests.services.gatekeeper.samples import chat, make_gatekeeper, submission

pytestmark = pytest.mark.slow  # loads the tiny tokenizer

PUZZLE = {"syllables": ["ba", "na", "na", "ap", "ple"], "answers": ["banana", "apple"]}
STORY = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, "
         "and watched the ships pass safely along the rocky northern coast.")


@pytest.fixture(scope="module")
def counter(tiny_model_dir: Path) -> TokenCounter:
    return TokenCounter(load_tokenizer(tiny_model_dir))


def deep(tmp_path: Path, counter: TokenCounter, rows: list[dict], *, schema: str = "chat_sft_v1",
         recent: RecentIndex | None = None, **config):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    tally = Tally(100)
    tools = Tools(tokens=lambda: counter, recent=lambda: recent or RecentIndex([]))
    validation = Validation(lookup(schema), "deep", ValidationConfig(**config), tally, tools)
    kept = b"".join(validation.run(path)).splitlines()
    return tally, kept, validation


def qa(question: str, answer: str, **extra) -> dict:
    return chat(("user", question), ("assistant", answer), **extra)


def found(tally: Tally, check: str) -> list[tuple[int, str]]:
    return [(f.line, f.reason) for f in tally.checks[check].findings] if check in tally.checks else []


# ---------------------------------------------------------------------------- duplicates in the file


def test_exact_duplicates_are_dropped_naming_the_first(tmp_path: Path, counter):
    rows = [qa("a?", "1"), qa("b?", "2"), qa("a?", "1"), qa("a?", "1", extra="ignored")]
    tally, kept, _ = deep(tmp_path, counter, rows)
    assert found(tally, "exact_duplicate") == [(3, "the same row as line 1"), (4, "the same row as line 1")]
    assert len(kept) == 2
    tally, kept, _ = deep(tmp_path, counter, [qa("a?", "1"), qa("a?", "2")])  # same prompt, other answer
    assert "exact_duplicate" not in tally.checks and len(kept) == 2


def test_near_duplicates_are_warnings_naming_the_earlier_line(tmp_path: Path, counter):
    rows = [qa("Tell me a story.", STORY), qa("What is 2 + 2?", "4"),
            qa("Tell me a story!", STORY.replace("northern", "Northern").replace("dusk,", "dusk;"))]
    tally, kept, _ = deep(tmp_path, counter, rows)
    [(line, reason)] = found(tally, "near_duplicate")
    assert line == 3 and reason.endswith("similar to line 1") and len(kept) == 3
    assert tally.checks["near_duplicate"].severity == "warning"
    different = [qa("Tell me a story.", STORY), qa("Tell me another.", "Once, a fox and a crow shared cheese.")]
    tally, _, _ = deep(tmp_path, counter, different)
    assert "near_duplicate" not in tally.checks


def test_near_duplicate_threshold_is_a_setting(tmp_path: Path, counter):
    rows = [qa("Tell me a story.", STORY), qa("Tell me a story.", STORY[:80] + " and then it rained all night long.")]
    strict, _, _ = deep(tmp_path, counter, rows, near_duplicate_similarity=0.99)
    loose, _, _ = deep(tmp_path, counter, rows, near_duplicate_similarity=0.3)
    assert "near_duplicate" not in strict.checks and found(loose, "near_duplicate")[0][0] == 2


def test_dedup_capacity_bounds_the_index_and_says_so(tmp_path: Path, counter):
    rows = [qa(f"q{i}", f"a{i}") for i in range(10)] + [qa("q1", "a1")]
    tally, kept, validation = deep(tmp_path, counter, rows, max_dedup_rows=5)
    assert found(tally, "dedup_capacity") == [(0, "the duplicate index holds 5 rows (max_dedup_rows): rows from "
                                                  "line 6 on were not compared with each other")]
    assert found(tally, "exact_duplicate") == [(11, "the same row as line 2")]  # early rows still compared
    assert validation.fingerprints() is None  # incomplete: not remembered
    tally, _, validation = deep(tmp_path, counter, rows[:5])
    assert "dedup_capacity" not in tally.checks and len(validation.fingerprints()) == 5


# ---------------------------------------------------------------------------- against accepted datasets


def recent_of(rows: list[dict], dataset_id: str = "d" * 64) -> RecentIndex:
    schema = lookup("chat_sft_v1")
    decoded = [schema.decoder.decode(json.dumps(row)) for row in rows]
    prints = Fingerprints(np.array([exact_key(schema.encode(r)) for r in decoded], np.uint64),
                          signatures([schema.text(r) for r in decoded]))
    return RecentIndex([(dataset_id, prints)])


def test_rows_already_accepted_are_dropped_and_near_ones_warned(tmp_path: Path, counter):
    recent = recent_of([qa("x?", "y"), qa("Tell me a story.", STORY), qa("a?", "1")])
    rows = [qa("a?", "1"), qa("new?", "fresh"), qa("Tell me a story!", STORY.replace("ships", "boats"))]
    tally, kept, _ = deep(tmp_path, counter, rows, recent=recent)
    assert found(tally, "accepted_duplicate") == [(1, f"the same row is line 3 of accepted dataset {'d' * 64}")]
    [(line, reason)] = found(tally, "accepted_near_duplicate")
    assert line == 3 and reason.endswith(f"similar to line 2 of accepted dataset {'d' * 64}")
    assert len(kept) == 2
    tally, kept, _ = deep(tmp_path, counter, rows)  # nothing accepted before: all kept, nothing said
    assert not tally.checks and len(kept) == 3


def test_a_deep_resubmission_is_a_duplicate_and_fingerprints_are_remembered(tmp_path: Path, counter):
    gk = make_gatekeeper(tmp_path, tokens=lambda: counter)
    rows = [qa(f"What is {i} times 3?", str(3 * i)) for i in range(20)]
    first = gk.submit_rows(submission("first", level="deep"), rows)
    assert first.status == "accepted"
    assert (tmp_path / "gatekeeper" / "fingerprints" / f"{first.dataset_id}.v1.npz").is_file()
    again = gk.submit_rows(submission("again", level="deep"), [dict(r, note="same rows") for r in rows])
    assert again.status == "duplicate" and again.duplicate_of == "first" and again.num_rows_valid == 0
    assert again.reasons[0] == f"every row is already in accepted dataset {first.dataset_id}"
    partly = gk.submit_rows(submission("partly", level="deep"), rows[:2] + [qa("new?", "yes")] * 1)
    assert partly.status == "rejected" and partly.counts == {"accepted_duplicate": 2}


def test_datasets_accepted_below_deep_are_fingerprinted_when_first_needed(tmp_path: Path, counter):
    gk = make_gatekeeper(tmp_path, tokens=lambda: counter)
    quick = gk.submit_rows(submission("quick"), [qa(f"q{i}", f"a{i}") for i in range(30)])
    assert quick.status == "accepted"
    prints_file = tmp_path / "gatekeeper" / "fingerprints" / f"{quick.dataset_id}.v1.npz"
    assert not prints_file.exists()
    report = gk.submit_rows(submission("deep", level="deep"), [qa("q7", "a7"), qa("other", "thing")] + [
        qa(f"fresh {i}", "x") for i in range(40)])
    assert report.counts["accepted_duplicate"] == 1 and report.status == "accepted"
    assert prints_file.is_file()


def test_recent_datasets_are_bounded_by_count_and_rows(tmp_path: Path, counter):
    gk = make_gatekeeper(tmp_path, tokens=lambda: counter, recent_datasets=2)
    for n in range(3):
        gk.submit_rows(submission(f"s{n}"), [qa(f"set {n} q{i}", "a") for i in range(10)])
    index = gk.recent.load()
    assert len(index) == 20 and len(index.dataset_ids) == 2
    gk.recent.max_rows = 15
    assert len(gk.recent.load()) == 10


# ---------------------------------------------------------------------------- leakage


@pytest.mark.parametrize(("prompt", "answer", "leaks"), [
    ("Translate: the cat sat on the mat. Answer: the cat sat on the mat.", "The cat sat on the mat.", True),
    ("Summarise: " + STORY, STORY[:100] + " and that is all.", True),
    ("Summarise: " + STORY, "A keeper lights a lamp each night so ships stay safe.", False),
    ("What is 4 - 0?", "4", False),  # short answers are not judged
    ("Add these binary numbers:\n\n①⓪① + ①①", "add ①⓪① ①① = ①⓪⓪⓪\n\nVerification: 5 + 3 = 8 ✓", False),
])
def test_leaked_fraction(prompt: str, answer: str, leaks: bool):
    assert (leaked_fraction(prompt, answer, min_chars=16) >= 0.5) is leaks


def test_answer_leakage_drops_the_row(tmp_path: Path, counter):
    fox = "The quick brown fox jumps over the lazy dog"
    rows = [qa(f"Repeat after me: {fox.lower()}", fox), qa("Name a fast animal that jumps over dogs.", fox)]
    tally, kept, _ = deep(tmp_path, counter, rows)
    assert found(tally, "answer_leakage") == [(1, "the answer appears verbatim in the prompt")] and len(kept) == 1


# ---------------------------------------------------------------------------- answer profiles


def test_binary_profile_answer_format():
    for row in binary.generate(3, 20, seed=1) + binary.generate(5, 5, seed=1):
        assert binary_answer_problem(row["messages"][-1]["content"]) is None
    assert "no prefix-form result" in binary_answer_problem("The answer is ①⓪①.")
    assert "not a circled-binary" in binary_answer_problem("add ① ① = two")


def test_binary_profile_is_explicit_and_checked_at_deep(tmp_path: Path, counter):
    prompt = "Add these binary numbers:\n\n① + ①"
    rows = [qa(prompt, "It is two.", profile="binary"), qa(prompt, "add ① ① = ①⓪", profile="binary"),
            qa(prompt, "It is two.")]  # no profile: no format is assumed
    tally, kept, _ = deep(tmp_path, counter, rows)
    [(line, reason)] = found(tally, "answer_format")
    assert line == 1 and reason.startswith("binary: no prefix-form result") and len(kept) == 2


def test_syllo_profile_answer_format():
    assert syllo_answer_problem("Banana and apple.", PUZZLE["syllables"], PUZZLE["answers"]) is None
    assert "does not name 'apple'" in syllo_answer_problem("banana, pineapple", PUZZLE["syllables"], PUZZLE["answers"])
    assert "cannot all be built" in syllo_answer_problem("banana nana", PUZZLE["syllables"], ["banana", "nana"])
    assert "cannot all be built" in syllo_answer_problem("cherry", PUZZLE["syllables"], ["cherry"])
    assert syllo_answer_problem("x" * 5, ["x"] * 64, ["x" * 64]) is not None  # a hostile puzzle ends quickly


def test_syllo_rows_are_checked_at_deep(tmp_path: Path, counter):
    rows = [chat(("user", "Syllables: ba na na ap ple"), ("assistant", "banana, apple"), puzzle=PUZZLE),
            chat(("user", "Syllables: ba na na ap ple"), ("assistant", "banana only"), puzzle=PUZZLE)]
    tally, kept, _ = deep(tmp_path, counter, rows, schema="syllo_v1")
    assert found(tally, "answer_format") == [(2, "syllo: the answer does not name 'apple'")] and len(kept) == 1


# ---------------------------------------------------------------------------- fingerprints


def test_signatures_estimate_similarity():
    base = "the quick brown fox jumps over the lazy dog " * 3
    sigs = signatures([base, base + "!", "completely unrelated words about gardening and soil", base.upper()])
    same = (sigs[0] == sigs[1]).mean()
    assert same > 0.8 and (sigs[0] == sigs[2]).mean() < 0.2 and (sigs[0] == sigs[3]).all()  # case-folded
    earlier, sim = earliest_similar(sigs, 0.8)
    assert list(earlier) == [-1, 0, -1, 0] and sim[1] == pytest.approx(same)
    assert signatures([]).shape == (0, 32) and signatures(["a"]).shape == (1, 32)


def test_a_deep_resubmission_of_an_acceptance_never_announced_announces_it(tmp_path: Path, counter):
    rows = [qa(f"What is {i} times 7?", str(7 * i)) for i in range(12)]
    first = make_gatekeeper(tmp_path, tokens=lambda: counter).submit_rows(submission("first", level="deep"), rows)
    assert first.status == "accepted"
    restarted = make_gatekeeper(tmp_path, tokens=lambda: counter)  # the announcement never went out
    retry = restarted.submit_rows(submission("retry", level="deep"), [dict(r, note="again") for r in rows])
    assert retry == first
    restarted.announced(retry)
    again = restarted.submit_rows(submission("again", level="deep"), rows)
    assert again.status == "duplicate" and again.duplicate_of == "first"
