"""`spans`: the spans this process finishes during a test, in memory (the real SDK pipeline);
`running`: the inference service as `python -m services.inference` runs it, in this process;
`free_port`."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.common.runtime import ServiceRuntime
from libs.common.tracing import setup_tracing
from services.inference.auth import GENERATED_KEY_PATH
from services.inference.service import SERVICE
from services.inference.settings import InferenceSettings
from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def running(settings: InferenceSettings, *, ready: bool = True, key: str = ""):
    """The service over real HTTP (uvicorn) in this process; yields a client with its key.

    `ready`: wait for /ready to say 200 (else only for it to answer with a model check);
    `key`: the bearer key to send (default: the settings' api_key, else the generated one).
    """
    runtime = ServiceRuntime("inference", settings)
    task = asyncio.create_task(runtime.run(SERVICE))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as client:
        try:
            async def started() -> bool:
                assert not task.done(), "the service stopped while starting"
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get("/ready")
                    return response.status_code == 200 or (not ready and "model" in response.json()["checks"])
                return False

            await wait_for(started, "the service to start", interval=0.1)
            key = key or settings.api_key or (settings.data_dir / GENERATED_KEY_PATH).read_text().strip()
            client.headers["Authorization"] = f"Bearer {key}"
            yield client
        finally:
            runtime.stop.set()
            assert await asyncio.wait_for(task, 30) == 0


@pytest.fixture
def spans():
    """The process's tracer provider (made here if no test made it yet) also keeps finished spans in memory.

    Ask for it before any fixture that loads a model, so the "model load" span is recorded.
    """
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    setup_tracing("test", None).add_span_processor(processor)
    yield exporter
    processor.shutdown()  # the provider keeps the processor; a stopped exporter drops what comes later
