"""What every service process does around its own logic, driven by its declaration.

`run(SERVICE)` is the whole body of every `python -m services.<name>`: load and print the
settings (a bad one stops the process with exit 2 and the variable's name), set up logs and
traces, serve HTTP (/health, /ready, /metrics plus the service's routes), connect the bus and
create the topology, then start what `SERVICE` declares (see `libs.common.service`).

SIGTERM / SIGINT is honoured at every stage. While starting (connecting to NATS, creating
the topology, loading a model) it cancels the start-up and exits 0 at once. Once running it
stops taking work, calls the service's `on_stop` (interrupt long jobs), lets in-flight
handlers finish within the grace period, drains the bus and exits 0. A declared loop or
subscription that crashes ends the process with 1 so the supervisor restarts it: a
half-alive service is worse than a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import uvicorn

from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.http import ServiceMetrics, answer_errors_as, create_app
from libs.common.log import get_logger, setup_logging
from libs.common.object_transport import connect_store
from libs.common.service import Service
from libs.common.settings import CommonSettings, SettingsError, describe, load_settings
from libs.common.tracing import setup_tracing, shutdown_tracing

S = TypeVar("S", bound=CommonSettings)
T = TypeVar("T")

# How long a stopping service waits for in-flight handlers before cancelling them.
SHUTDOWN_GRACE_S = 30.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop; signals are ours, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class ServiceRuntime(Generic[S]):
    """One service process: its settings, bus, HTTP app, metrics and the tasks it runs."""

    def __init__(self, name: str, settings: S, *, shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.name = name
        self.settings = settings
        self.log = get_logger(name)
        self.metrics = ServiceMetrics(name)
        self.store = ArtifactStore(settings.artifacts_dir, transport=settings.artifact_transport)
        self.stop = asyncio.Event()
        self.bus: Bus | None = None
        self.started = False
        # /ready: connected, and everything declared is built and running (model loaded, ...).
        self.checks: dict[str, Callable[[], bool]] = {
            "bus": lambda: self.bus is not None and self.bus.connected,
            "started": lambda: self.started,
        }
        self.app = create_app(name, self.metrics, self.checks)
        self.shutdown_grace_s = shutdown_grace_s
        self._tasks: list[asyncio.Task] = []
        self._crashed: BaseException | None = None
        self._on_stop: list[Callable[[], None]] = []
        self._on_shutdown: list[Callable[[], Awaitable[None]]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run a background loop; its crash stops the service."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)
        return task

    def _on_task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._crashed = task.exception()
        self.log.error("background loop crashed", task=task.get_name(), error=repr(task.exception()))
        self.stop.set()

    # ------------------------------------------------------------------ start-up

    async def start(self, service: Service[T]) -> T:
        """Connect, create the topology, build the service and start what it declares."""
        self.bus = await Bus.connect(self.settings.nats_servers, self.name,
                                     deadline_s=self.settings.nats_connect_deadline_s, auth=self.settings.nats_auth)
        self.bus.publications = service.publications
        await self.bus.ensure_topology(replicas=self.settings.stream_replicas)
        # Without a shared disk, artifacts travel through the object store; the bus shares what
        # an event names before publishing it.
        self.bus.artifacts = await connect_store(self.store, self.bus.js, replicas=self.settings.stream_replicas)
        # Bound before the build, so an every-replica subscription misses nothing meanwhile.
        sources = [await self.bus.bind(sub) for sub in service.subscriptions]
        self.log.info("building the service (models, state)")
        instance = await service.build(self)
        if service.routes:
            self.app.include_router(service.routes(instance))
        if service.readiness:
            self.checks.update(service.readiness(instance))
        if service.on_stop:
            self._on_stop.append(functools.partial(service.on_stop, instance))
        if service.close:
            self._on_shutdown.append(functools.partial(service.close, instance))
        for reply in service.replies:
            await self.bus.serve(reply.subject, reply.request_type, functools.partial(reply.handler, instance))
        for sub, source in zip(service.subscriptions, sources):
            self.spawn(source.run(instance, self.stop), f"consume {sub.subject}")
        for loop in service.loops:
            self.spawn(loop(instance, self.stop), loop.__name__)
        self.log.info("service started", http_port=self.settings.http_port)
        self.started = True
        return instance

    async def run(self, service: Service[T]) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if service.errors:
            answer_errors_as(self.app, service.errors)
        host, port = self.settings.http_host, self.settings.http_port
        server = _EmbeddedServer(uvicorn.Config(
            self.app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
        ))
        http_task = asyncio.create_task(_serve_http(server, f"{host}:{port}"), name="http")
        starting = asyncio.create_task(self.start(service), name="start")
        stopped = asyncio.create_task(self.stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait({starting, stopped, http_task}, return_when=asyncio.FIRST_COMPLETED)
            if http_task in done:
                http_task.result()  # raises: the HTTP server could not start
            if not starting.done():
                self.log.info("stop requested while starting; start-up abandoned")
                starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
            elif starting.exception() is not None:
                raise starting.exception()
            else:
                done, _ = await asyncio.wait({stopped, http_task}, return_when=asyncio.FIRST_COMPLETED)
                if http_task in done and not self.stop.is_set():
                    http_task.result()
                    raise RuntimeError("the HTTP server stopped on its own")
        except Exception as exc:  # noqa: BLE001 - startup failure: say it clearly, exit non-zero
            self._crashed = exc
            self.log.error("service failed", error=str(exc) or repr(exc))
        finally:
            stopped.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
            await self.shut_down()
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(http_task, 5)
            shutdown_tracing()
            self.log.info("stopped")
        return 1 if self._crashed else 0

    # ------------------------------------------------------------------ shutdown

    async def shut_down(self) -> None:
        """Stop taking work, interrupt long jobs, give in-flight handlers the grace period, drain."""
        self.log.info("stopping: finishing in-flight work")
        self.stop.set()
        for fn in self._on_stop:
            with contextlib.suppress(Exception):
                fn()
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


async def _serve_http(server: uvicorn.Server, address: str) -> None:
    try:
        await server.serve()
    except SystemExit:
        # uvicorn exits the process when it cannot bind; make it an error the runtime reports.
        raise RuntimeError(f"the HTTP server could not start on {address} (port in use?)") from None


def run(service: Service) -> None:
    """The body of every `python -m services.<name>`."""
    try:
        settings = load_settings(service.settings, service.name)
    except SettingsError as exc:
        print(f"flywheel-{service.name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    setup_logging(service.name, settings.log_level)
    setup_tracing(service.name, settings.data_dir)
    limit_torch_threads(settings.torch_threads)
    get_logger(service.name).info("settings", **describe(settings))

    async def main() -> int:
        code = await ServiceRuntime(service.name, settings).run(service)
        await _leave_worker_threads(code)
        return code

    raise SystemExit(asyncio.run(main()))


def limit_torch_threads(threads: int) -> int:
    """Give torch `threads` CPU threads (0: half the cores, at least one); returns the number.

    Set through OMP_NUM_THREADS before torch is imported (a service that never imports torch
    pays nothing), and directly when it already is.
    """
    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


async def _leave_worker_threads(code: int, wait_s: float = 5.0) -> None:
    """Wait briefly for worker threads, then leave without them.

    A thread cannot be cancelled: a model still loading when SIGTERM came would hold the
    interpreter (asyncio.run joins the executor) far past the grace period. What it was
    doing is abandoned on purpose and everything that must survive is written atomically,
    so once the orderly shutdown above is done, exit.
    """
    try:
        await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), wait_s)
    except TimeoutError:
        get_logger("runtime").info("exiting without waiting for a busy worker thread")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
