"""lm-eval's OpenAI chat backend (`local-chat-completions`), unmodified, against the real server.

The whole service runs in this process over real HTTP (uvicorn) and a real nats-server, serving the
embedded tiny model; lm-eval (EleutherAI's lm-evaluation-harness) evaluates it on a five-row task
of its own format from lm_eval_tasks/, as any user would point it at an OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = "flywheel_binary_arithmetic"
ROWS = len((TASKS / "binary_arithmetic.jsonl").read_text().splitlines())
KEY = "lm-eval-test-key"


def chat_requests(metrics_text: str) -> float:
    """Chat completions the server counted, whatever their labels."""
    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == "flywheel_inference_requests_total")


async def test_lm_eval_chat_backend_runs_unmodified_against_the_server(
    tmp_path: Path, nats_server: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
):
    import datasets
    import lm_eval
    from lm_eval.models.api_models import LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER as NONE_ANSWER
    from lm_eval.tasks import TaskManager

    # Nothing from a hub: the task's rows are the local JSONL, the model is the server's.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert datasets.config.HF_HUB_OFFLINE  # read at import: tests/conftest.py sets it first
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what lm-eval's local-chat-completions sends as its bearer key
    monkeypatch.chdir(TASKS)  # the task's data_files path is relative to it

    settings = InferenceSettings(
        data_dir=tmp_path / "data", nats_url=nats_server, http_port=free_port(), base_model=str(tiny_model_dir),
        device="cpu", max_tokens_limit=64, api_key=KEY,
    )
    async with running(settings) as client:
        model_id = (await client.get("/v1/models")).json()["data"][0]["id"]
        before = chat_requests((await client.get("/metrics")).text)
        results = await asyncio.to_thread(
            lm_eval.simple_evaluate,
            model="local-chat-completions",
            model_args={
                "model": model_id,
                "base_url": f"http://127.0.0.1:{settings.http_port}/v1/chat/completions",
                "num_concurrent": 4, "max_retries": 1, "tokenized_requests": False, "timeout": 60,
            },
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            apply_chat_template=True,
            log_samples=True,
            bootstrap_iters=0,
        )
        served = chat_requests((await client.get("/metrics")).text) - before

    assert results is not None
    exact_match = results["results"][TASK]["exact_match,none"]
    assert isinstance(exact_match, float) and 0.0 <= exact_match <= 1.0  # random weights: any score
    assert results["n-samples"][TASK]["effective"] == ROWS
    samples = results["samples"][TASK]
    assert len(samples) == ROWS
    # One non-empty generation per row, each from the server (lm-eval's placeholder marks a null content).
    for sample in samples:
        assert len(sample["resps"]) == 1 and len(sample["resps"][0]) == 1, sample
        text = sample["resps"][0][0]
        assert isinstance(text, str) and text and text != NONE_ANSWER, sample
    assert served == ROWS, f"the server counted {served} chat completions for {ROWS} rows"
