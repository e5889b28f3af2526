"""Every file in malformed/ is rejected for the reason in malformed/expected.toml, and nothing is lost.

Nothing lost: the original is kept byte for byte, the report is stored and readable, every row
is counted (kept + dropped = rows), no dataset is stored, and the finding names a line (or 0
for the file as a whole).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from libs.common.models import load_tokenizer
from services.gatekeeper.checks.standard import TokenCounter
from services.gatekeeper.pipeline import ValidationConfig
from services.gatekeeper.reading import Limits
from tests.services.gatekeeper.samples import make_gatekeeper, submission

pytestmark = pytest.mark.slow  # loads the tiny tokenizer

FOLDER = Path(__file__).parent / "malformed"
EXPECTED: dict[str, str | dict] = tomllib.loads((FOLDER / "expected.toml").read_text())
CONFIG = ValidationConfig(limits=Limits(max_line_bytes=4096, max_file_bytes=65536), max_length=512)


@pytest.fixture(scope="module")
def counter(tiny_model_dir: Path) -> TokenCounter:
    return TokenCounter(load_tokenizer(tiny_model_dir))


def test_every_malformed_file_has_an_expectation():
    assert sorted(p.name for p in FOLDER.iterdir() if p.name != "expected.toml") == sorted(EXPECTED)
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_file_is_rejected_for_its_reason_and_nothing_is_lost(tmp_path: Path, name: str, counter):
    expected = EXPECTED[name]
    spec = {"check": expected} if isinstance(expected, str) else expected
    gk = make_gatekeeper(tmp_path / "data", config=CONFIG, tokens=lambda: counter)
    dropped = tmp_path / name
    shutil.copyfile(FOLDER / name, dropped)
    report = gk.submit_file(
        submission("m", source=name, level=spec.get("level", "quick"), schema=spec.get("schema", "chat_sft_v1")),
        dropped, move=True,
    )

    check = spec["check"]
    assert report.status == "rejected", report.reasons
    assert report.counts.get(check, 0) >= 1, report.counts
    found = report.findings[check]
    assert found.severity == "error" and found.findings[0].reason
    assert found.findings[0].line >= (1 if found.scope in ("line", "row") else 0)
    assert any(reason.startswith(f"{check}: ") or f"{check} (" in reason for reason in report.reasons), report.reasons
    # Nothing lost.
    assert gk.store.path_for(report.original_uri).read_bytes() == (FOLDER / name).read_bytes()
    assert gk.read_report("m") == report
    assert report.num_rows_valid + report.num_rows_dropped == report.num_rows
    assert report.dataset_uri == "" and not (gk.store.root / "datasets").exists()
    assert not list((gk.store.root / "staging").iterdir()) if (gk.store.root / "staging").exists() else True
