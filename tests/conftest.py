"""Shared fixtures: a real nats-server per test (random port, temporary store), a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libs.common.nats_server import NatsServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(autouse=True)
def _fresh_logging_config():
    """Code under test may call setup_logging (the CLI does); never leak that into later tests."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture
def nats_server(tmp_path: Path):
    """A real nats-server with JetStream on a random loopback port; yields its URL."""
    server = NatsServer(tmp_path / "nats", port=-1)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_server: str):
    """A connected Bus with the whole topology created."""
    from libs.common.bus import Bus

    connected = await Bus.connect([nats_server], "test")
    await connected.ensure_topology()
    try:
        yield connected
    finally:
        await connected.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny Qwen3 model and tokenizer, created once per test session."""
    from libs.common.models import ensure_base_model

    return ensure_base_model(tmp_path_factory.mktemp("models-data"))
