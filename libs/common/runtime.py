"""What every service process does around its own logic.

Load and print settings, set up logs and traces, connect the bus (and create the topology),
serve HTTP (/health, /ready, /metrics plus the service's routes), run the service's
background loops, and on SIGTERM / SIGINT stop taking work, let in-flight handlers finish,
drain the bus and exit 0. A background loop that crashes ends the process with 1 so the
supervisor restarts it: a half-alive service is worse than a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import uvicorn

from libs.common.bus import Bus
from libs.common.http import ServiceMetrics, create_app
from libs.common.log import get_logger, setup_logging
from libs.common.settings import CommonSettings, SettingsError, describe, load_settings
from libs.common.tracing import setup_tracing, shutdown_tracing

S = TypeVar("S", bound=CommonSettings)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop; signals are ours, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class ServiceRuntime(Generic[S]):
    def __init__(self, name: str, settings: S, *, shutdown_grace_s: float = 30.0) -> None:
        self.name = name
        self.settings = settings
        self.log = get_logger(name)
        self.metrics = ServiceMetrics(name)
        self.stop = asyncio.Event()
        self.bus: Bus | None = None
        self.checks: dict[str, Callable[[], bool]] = {"bus": lambda: self.bus is not None and self.bus.connected}
        self.app = create_app(name, self.metrics, self.checks)
        self.shutdown_grace_s = shutdown_grace_s
        self._tasks: list[asyncio.Task] = []
        self._crashed: BaseException | None = None
        self._on_shutdown: list[Callable[[], Awaitable[None]]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run a background loop; its crash stops the service."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)
        return task

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._on_shutdown.append(fn)

    def _on_task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._crashed = task.exception()
        self.log.error("background loop crashed", task=task.get_name(), error=repr(task.exception()))
        self.stop.set()

    async def run(self, start: Callable[[ServiceRuntime[S]], Awaitable[None]]) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        port = getattr(self.settings, "http_port", 0)
        server = _EmbeddedServer(uvicorn.Config(
            self.app, host=self.settings.http_host, port=port, log_config=None, access_log=False, lifespan="off",
        ))
        http_task = asyncio.create_task(server.serve(), name="http")
        try:
            self.bus = await Bus.connect(self.settings.nats_servers, self.name)
            await self.bus.ensure_topology()
            await start(self)
            self.log.info("service started", http_port=port)
            await self.stop.wait()
        except Exception as exc:  # noqa: BLE001 - startup failure: log it clearly, exit non-zero
            self._crashed = exc
            self.log.error("service failed", error=repr(exc))
        finally:
            self.log.info("stopping: finishing in-flight work")
            self.stop.set()
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=self.shutdown_grace_s)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for fn in self._on_shutdown:
                with contextlib.suppress(Exception):
                    await fn()
            if self.bus:
                await self.bus.close()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, 5)
            shutdown_tracing()
            self.log.info("stopped")
        return 1 if self._crashed else 0


def run_service(name: str, settings_cls: type[S], start: Callable[[ServiceRuntime[S]], Awaitable[None]]) -> None:
    """The body of every `python -m services.<name>`."""
    try:
        settings = load_settings(settings_cls, name)
    except SettingsError as exc:
        print(f"flywheel-{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    setup_logging(name, settings.log_level)
    setup_tracing(name, settings.data_dir)
    get_logger(name).info("settings", **describe(settings))

    async def main() -> int:
        return await ServiceRuntime(name, settings).run(start)

    raise SystemExit(asyncio.run(main()))
