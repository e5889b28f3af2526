"""Shared fixtures: a real nats-server per test (random port, temporary store), a tiny model;
`wait_for` / `wait_for_sync` to wait on a condition instead of sleeping; the marker rule."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libs.common.nats_server import NatsServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Generous: a wait ends as soon as its condition holds; the timeout only bounds a failure,
# and a machine with a busy core is several times slower than an idle one.
WAIT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------- waiting


async def wait_for(predicate: Callable[[], Any], what: str | Callable[[], str], *,
                   timeout: float = WAIT_TIMEOUT_S, interval: float = 0.05) -> Any:
    """Poll `predicate` (plain or async) until it returns something truthy; return that.

    Raises AssertionError naming `what` (a text, or a function giving one: it may show the
    last value seen) when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout))
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], Any], what: str | Callable[[], str], *,
                  timeout: float = WAIT_TIMEOUT_S, interval: float = 0.05) -> Any:
    """`wait_for` outside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout))
        time.sleep(interval)


def _timed_out(what: str | Callable[[], str], timeout: float) -> str:
    return f"timed out after {timeout:g}s waiting for {what if isinstance(what, str) else what()}"


# ---------------------------------------------------------------------- markers

# A test that uses one of these fixtures, directly or through another fixture, must carry
# the marker: `-m "not integration"` then runs without a nats-server, `-m "not slow"`
# without loading a model.
MARKER_FOR_FIXTURE = {"nats_server": "integration", "bus": "integration", "tiny_model_dir": "slow"}
MARKER_VIOLATIONS = pytest.StashKey[list[str]]()


@pytest.hookimpl(tryfirst=True)  # before -m / -k deselect: the rule covers every collected test
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[MARKER_VIOLATIONS] = [
        f"{item.nodeid}: uses {fixture} but is not marked {marker}"
        for item in items
        for fixture, marker in MARKER_FOR_FIXTURE.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None
    ]


# ---------------------------------------------------------------------- fixtures


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


async def consume(bus, specs, event_type, handler, stop) -> None:
    """Run `handler(event, delivery)` on shared durable consumers until `stop` is set, through
    the same path the runtime uses for a declared subscription (`Bus.bind` + `Source.run`)."""
    from libs.common.service import Subscribe
    from libs.common.topology import ConsumerSpec

    specs = (specs,) if isinstance(specs, ConsumerSpec) else tuple(specs)
    subject = specs[0].filter_subject if len(specs) == 1 else ">"
    subscription = Subscribe(subject, event_type, lambda _service, event, delivery: handler(event, delivery),
                             consumers=specs)
    await (await bus.bind(subscription)).run(None, stop)
