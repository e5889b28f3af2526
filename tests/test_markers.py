"""Markers follow the fixtures a test uses: a nats-server means `integration`, the tiny model `slow`.

The rule runs at collection (`pytest_collection_modifyitems` in tests/conftest.py) over every
collected test; this test fails when it found any. Run on its own or with part of the suite,
it checks the whole suite by collecting it in a child pytest.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MARKER_VIOLATIONS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _collected_whole_suite(config: pytest.Config) -> bool:
    paths = [Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args]
    return any(path == TESTS or path in TESTS.parents for path in paths)


def test_tests_using_a_server_or_the_model_carry_their_markers(request: pytest.FixtureRequest):
    config = request.config
    if _collected_whole_suite(config):
        violations = config.stash.get(MARKER_VIOLATIONS, [])
        assert not violations, "missing markers:\n" + "\n".join(violations)
        return
    # Collect everything, run only this test: it then sees the whole suite.
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS),
         "-k", "test_tests_using_a_server_or_the_model_carry_their_markers"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    violations = dict.fromkeys(re.findall(r"tests/\S+: uses \w+ but is not marked \w+", child.stdout))
    assert not violations, "missing markers:\n" + "\n".join(violations)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
