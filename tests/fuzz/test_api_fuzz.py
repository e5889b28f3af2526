"""Every service's HTTP API fuzzed from its own OpenAPI document (schemathesis) on the real stack.

`flywheel up`'s supervisor runs a real nats-server and the seven services on the tiny model. For
each service, `st run` reads its `/openapi.json` over HTTP and sends every operation it declares
schemathesis' examples, coverage (boundary and invalid values, wrong methods) and fuzzing cases
over real HTTP, each with a timeout. Every answer must be: no 5xx, the declared schema and content
type where one is declared, and a 4xx body in the service's error shape (hooks.py): FastAPI's
`{"detail": ...}`, or OpenAI's `{"error": {...}}` for inference. The routes that change state
(trainer control, deployer rollback, gatekeeper submissions, inference reload) are fuzzed too; after
its fuzz each service must still be the process that started, and ready.

The command line, not schemathesis' pytest plugin: the plugin rewrites pytest's private
`Node._nodeid`, which pytest 9.2 no longer has.

Run: .venv/bin/pytest tests/fuzz (a failure prints schemathesis' report, with curl commands and the seed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flywheel.demo import free_port_base
from flywheel.supervisor import Supervisor
from libs.common.settings import SERVICES
from tests.conftest import wait_for_sync

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
ST = Path(sys.executable).with_name("st")
API_KEY = "fuzz-test-key"
# Cases per operation and phase: the whole fuzz stays within a few minutes on two cores.
EXAMPLES = 12
# No answer may take longer: a hang fails the test instead of stalling it. Generous, because two
# cores are shared with six services training and scoring in the background.
REQUEST_TIMEOUT_S = 30
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance,error_shape"
# The dashboard's live stream never ends by design (SSE until the client leaves) and takes no
# parameters; tests/services/dashboard follows it. Nothing else is left out: no route stops a process.
EXCLUDED = {"dashboard": ["--exclude-path", "/api/stream"]}


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    environ = {
        **os.environ,
        "FLYWHEEL_BASE_MODEL": str(tiny_model_dir),
        "FLYWHEEL_INFERENCE_API_KEY": API_KEY,
        # Fuzzed requests ask for up to 128 choices: a few tokens each keep every answer quick.
        "FLYWHEEL_INFERENCE_MAX_TOKENS_LIMIT": "8",
    }
    sup = Supervisor(tmp_path_factory.mktemp("fuzz") / "data", port_base=free_port_base(), environ=environ)
    try:
        sup.start()
        wait_for_sync(lambda: (sup.poll(), all(_ready(sup.ports[s]) for s in SERVICES))[1],
                      "every service to be ready", timeout=180)
        yield sup
    finally:
        sup.stop()


@pytest.mark.parametrize("service", SERVICES)
def test_api_survives_its_fuzz(stack: Supervisor, service: str, tmp_path: Path):
    started = stack.children[service].process
    command = [
        str(ST), "run", f"http://127.0.0.1:{stack.ports[service]}/openapi.json", "--checks", CHECKS,
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES),
        "--request-timeout", str(REQUEST_TIMEOUT_S), "--header", f"Authorization: Bearer {API_KEY}",
        "--workers", "1", "--generation-database", "none", "--no-color", *EXCLUDED.get(service, []),
    ]
    # Run elsewhere than the checkout: schemathesis keeps a cache in its working directory.
    environ = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks", "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"schemathesis found problems in {service}'s API:\n{run.stdout[-30000:]}{run.stderr[-3000:]}"
    print(run.stdout[run.stdout.rfind("Test cases:"):])  # how many cases, and the seed (pytest -s shows it)
    # The service survived its fuzz, as the same process, and is still ready.
    stack.poll()
    assert stack.children[service].process is started, f"{service} died during its fuzz: {stack.children[service].log_path}"
    assert _ready(stack.ports[service]), f"{service} is not ready after its fuzz"
