"""Gatekeeper validation speed at each level, against a plain json.loads + pydantic validator.

    .venv/bin/python -m bench.gatekeeper [--rows 200000] [--data-dir DIR]

Generates a chat_sft_v1 file in a temporary folder (half short English questions and answers,
some with a system prompt or a follow-up turn; half distinct binary-arithmetic problems as the
curriculum writes them, with the `binary` profile), then, on one core (the process pins itself
to one CPU and the tokenizer to one thread):
- baseline: each line through `json.loads` and a pydantic v2 model with the same rules as the
  quick level (roles, non-blank content, the last turn the assistant's, no unknown fields);
  it decides each row's fate and writes nothing;
- each level through the gatekeeper's `Validation`, three ways: `check` (every check, each
  row's fate and findings, nothing written: like for like with the baseline, and what
  `flywheel check` runs); `run` (the same, plus each kept row re-encoded in the normalised
  form the dataset is stored in); and the whole submission (`Gatekeeper.submit_file`: the
  original kept and hashed, the normalised dataset written and hashed, the report written).
The standard and deep levels use the real tokenizer and chat template of the embedded tiny
model (created under --data-dir, a temporary folder by default). Targets: quick validation >= 5x
the baseline; standard validation >= 20k rows/s (both `check`, like the baseline; the figures
with the normalised rows written and for the whole submission are printed beside them). The
last line printed is one JSON object.
"""

from __future__ import annotations

import os

# One core, before any library starts its thread pools.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import msgspec  # noqa: E402
import pydantic  # noqa: E402

TARGETS = {"quick_vs_baseline": 5.0, "standard_rows_per_s": 20_000.0}

# ---------------------------------------------------------------------------- the data

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a careful tutor.")
TOPICS = ("the moon", "photosynthesis", "a lighthouse", "the Thames", "binary numbers", "volcanoes", "bees",
          "glaciers", "the violin", "tides", "interest rates", "the printing press")
ASKS = ("What is {t}?", "Explain {t} simply.", "Give one fact about {t}.", "Why does {t} matter?")


def english_row(rng: random.Random, i: int) -> dict:
    """A short question and answer; some with a system prompt, some with a follow-up turn."""
    topic = rng.choice(TOPICS)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": f"{rng.choice(ASKS).format(t=topic)} (#{i})"},
                 {"role": "assistant", "content": f"In short, {topic} is {rng.randrange(2, 900)} years old."}]
    if rng.random() < 0.15:
        messages += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": f"Case {i} shows it."}]
    return {"messages": messages}


def binary_rows(rng: random.Random, n: int) -> list[dict]:
    """Distinct binary-arithmetic problems (levels 2-5) as the curriculum writes them."""
    from libs.common.skills import binary

    rows, seen = [], set()
    while len(rows) < n:
        for row in binary.generate(rng.randint(2, binary.MAX_LEVEL), 1000, seed=rng.randrange(1 << 30)):
            prompt = row["messages"][0]["content"]
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"messages": row["messages"], "profile": "binary"})
    rng.shuffle(rows)
    return rows[:n]


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """Write `rows` chat rows to `path` (compact JSON lines), half English, half binary; the counts."""
    rng = random.Random(seed)
    binary = binary_rows(rng, rows // 2)
    kinds = {"english": 0, "binary": 0}
    encoder = msgspec.json.Encoder()
    with open(path, "wb") as fh:
        for i in range(rows):
            if binary and (i % 2 or len(binary) >= rows - i):
                row, kind = binary.pop(), "binary"
            else:
                row, kind = english_row(rng, i), "english"
            kinds[kind] += 1
            fh.write(encoder.encode(row) + b"\n")
    return kinds


# ---------------------------------------------------------------------------- the baseline


class Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str

    @pydantic.field_validator("content")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty content")
        return value


class Row(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    messages: list[Message] = pydantic.Field(min_length=1)
    profile: Literal["binary"] | None = None

    @pydantic.model_validator(mode="after")
    def ends_with_the_assistant(self) -> Row:
        if self.messages[-1].role != "assistant":
            raise ValueError("the last turn must be the assistant's")
        return self


def baseline(path: Path) -> tuple[int, int]:
    """(rows, valid rows): a straightforward validator, one line at a time."""
    rows = valid = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rows += 1
            try:
                Row.model_validate(json.loads(line))
                valid += 1
            except (ValueError, pydantic.ValidationError):
                pass
    return rows, valid


# ---------------------------------------------------------------------------- the gatekeeper


def best_of(repeats: int, measure) -> tuple[float, object]:
    """The shortest of `repeats` timed runs (the usual guard against a noisy neighbour), and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = measure()
        best = min(best, time.perf_counter() - started)
    return best, result


def run_level(level: str, source: Path, root: Path, counter, repeats: int) -> dict:
    from libs.common.artifacts import ArtifactStore
    from services.gatekeeper.checks import Tally
    from services.gatekeeper.duplicates import AcceptedIndex, RecentDatasets
    from services.gatekeeper.intake import Submission
    from services.gatekeeper.pipeline import Gatekeeper, Tools, Validation, ValidationConfig
    from services.gatekeeper.schemas import lookup

    config = ValidationConfig()

    def validate(normalise: bool) -> int:
        tally = Tally(100)
        validation = Validation(lookup("chat_sft_v1"), level, config, tally, Tools(tokens=lambda: counter))
        if normalise:
            for _ in validation.run(source):
                pass
        else:
            validation.check(source)
        return tally.num_rows

    validate_s, rows = best_of(repeats, lambda: validate(False))
    normalised_s, _ = best_of(repeats, lambda: validate(True))

    store, index = ArtifactStore(root / "artifacts"), AcceptedIndex(root / "gatekeeper" / "accepted")
    gatekeeper = Gatekeeper(store, index, RecentDatasets(index, store, root / "gatekeeper" / "fingerprints",
                                                         max_datasets=16, max_rows=250_000),
                            config=config, max_error_fraction=0.1, max_findings=100, tokens=lambda: counter)
    submission = Submission(submission_id=f"bench-{level}", name="bench", channel="bench", source=source.name,
                            level=level)  # type: ignore[arg-type]
    started = time.perf_counter()
    report = gatekeeper.submit_file(submission, source, move=False)
    whole_s = time.perf_counter() - started
    return {
        "rows_per_s": rows / validate_s,
        "normalised_rows_per_s": rows / normalised_s,
        "stored_rows_per_s": report.num_rows / report.duration_s,
        "submission_rows_per_s": report.num_rows / whole_s,
        "status": report.status, "kept": report.num_rows_valid, "counts": report.counts,
        "tokens": report.lengths.mean * report.lengths.count if report.lengths else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gatekeeper", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--data-dir", type=Path, help="where the tiny model is created (default: a temporary folder)")
    args = parser.parse_args(argv)

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    with tempfile.TemporaryDirectory(prefix="bench-gatekeeper-") as tmp:
        work = Path(tmp)
        source = work / "chat.jsonl"
        kinds = generate(source, args.rows)
        size = source.stat().st_size
        print(f"generated {args.rows:,} chat_sft_v1 rows ({kinds['english']:,} English, {kinds['binary']:,} binary "
              f"arithmetic with profile=binary), {size / 1e6:.1f} MB, in {source}")

        from libs.common.models import ensure_base_model, load_tokenizer
        from services.gatekeeper.checks.standard import TokenCounter

        started = time.perf_counter()
        model = ensure_base_model(args.data_dir or work / "models-data")
        counter = TokenCounter(load_tokenizer(model))
        print(f"tokenizer and chat template of {model.name} ready in {time.perf_counter() - started:.1f} s "
              f"(layout {'learned' if counter.layout else 'not usable: full rendering'}); pinned to CPU {cpu}, "
              "RAYON_NUM_THREADS=1")

        # Best of 5 for the short runs (baseline and quick), of 2 for standard (a target, ~10 s a run), one deep run.
        seconds, (rows, valid) = best_of(5, lambda: baseline(source))
        base = rows / seconds
        print(f"baseline  json.loads + pydantic v2, line by line: {base:>11,.0f} rows/s ({valid:,} of {rows:,} valid)")

        results = {}
        for level, repeats in (("quick", 5), ("standard", 2), ("deep", 1)):
            result = results[level] = run_level(level, source, work / level, counter, repeats)
            if level == "quick":
                speed = f"{result['rows_per_s'] / base:.2f}x the baseline"
            else:
                tokens = result["tokens"] / rows
                speed = f"{tokens:.0f} tokens a row, {tokens * result['rows_per_s']:,.0f} tokens/s"
            print(f"{level:<9} validation: {result['rows_per_s']:>11,.0f} rows/s ({speed}); with the rows normalised: "
                  f"{result['normalised_rows_per_s']:,.0f} rows/s; with the dataset stored: "
                  f"{result['stored_rows_per_s']:,.0f} rows/s; whole submission: "
                  f"{result['submission_rows_per_s']:,.0f} rows/s")
            print(f"{'':<9} {result['status']}: {result['kept']:,} rows kept; findings {result['counts'] or 'none'}")

    quick_ratio = results["quick"]["rows_per_s"] / base
    summary = {
        "rows": rows,
        "baseline_rows_per_s": round(base),
        "quick_rows_per_s": round(results["quick"]["rows_per_s"]),
        "quick_vs_baseline": round(quick_ratio, 2),
        "standard_rows_per_s": round(results["standard"]["rows_per_s"]),
        "deep_rows_per_s": round(results["deep"]["rows_per_s"]),
        "normalised_rows_per_s": {level: round(r["normalised_rows_per_s"]) for level, r in results.items()},
        "quick_normalised_vs_baseline": round(results["quick"]["normalised_rows_per_s"] / base, 2),
        "stored_rows_per_s": {level: round(r["stored_rows_per_s"]) for level, r in results.items()},
        "submission_rows_per_s": {level: round(r["submission_rows_per_s"]) for level, r in results.items()},
        "targets": TARGETS,
        "met": {
            "quick_vs_baseline": quick_ratio >= TARGETS["quick_vs_baseline"],
            "standard_rows_per_s": results["standard"]["rows_per_s"] >= TARGETS["standard_rows_per_s"],
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
