"""Every file in malformed/ is rejected for the reason in malformed/expected.toml, and kept."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from services.gatekeeper.validation import Limits
from tests.services.gatekeeper.samples import make_gatekeeper, submission

FOLDER = Path(__file__).parent / "malformed"
EXPECTED: dict[str, str] = tomllib.loads((FOLDER / "expected.toml").read_text())


def test_every_malformed_file_has_an_expectation():
    assert sorted(p.name for p in FOLDER.iterdir() if p.name != "expected.toml") == sorted(EXPECTED)
    assert len(EXPECTED) >= 15


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_file_is_rejected_for_its_reason_and_kept(tmp_path: Path, name: str):
    gk = make_gatekeeper(tmp_path / "data", limits=Limits(max_line_bytes=4096))
    dropped = tmp_path / name
    shutil.copyfile(FOLDER / name, dropped)
    report = gk.submit_file(submission("m", source=name), dropped, move=True)

    check = EXPECTED[name]
    assert report.status == "rejected", report.reasons
    assert report.counts.get(check, 0) >= 1, report.counts
    assert any(f.check == check and f.severity == "error" for f in report.findings)
    assert check in " ".join(report.reasons), report.reasons
    assert gk.store.path_for(report.original_uri).read_bytes() == (FOLDER / name).read_bytes()
    assert gk.read_report("m") == report
