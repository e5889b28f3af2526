"""Running a declared service in this process, exactly as `python -m services.<name>` starts it
(bus, topology, build, routes, replies, subscriptions), without the HTTP server and signals."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from libs.common.runtime import ServiceRuntime
from libs.common.service import Service
from libs.common.settings import CommonSettings

T = TypeVar("T")


@contextlib.asynccontextmanager
async def running(service: Service[T], settings: CommonSettings) -> AsyncIterator[T]:
    """The service object while the service runs; stopped as on SIGTERM when the block ends."""
    runtime = ServiceRuntime(service.name, settings)
    try:
        instance = await runtime.start(service)
        yield instance
    finally:
        await runtime.shut_down()
