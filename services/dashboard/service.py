"""Dashboard: the loop on one live page, built from the streams and KV as a read model.

On start it replays every stream from its first stored message (`libs.common.history.follow`,
one ordered consumer per stream, nothing durable, nothing acknowledged) and watches the KV
buckets (champion, decisions, deployment, trainer control, curriculum levels), folding all of it
into `services.dashboard.read_model.ReadModel`; then it keeps following. What JetStream does
not push is asked for on a timer: the queue (the gatekeeper's and trainer's consumer state) and
the dead letters from NATS, each service's /health over HTTP. No file is polled.

Browsers get the page (GET /), the whole state (GET /api/state) and live changes over
Server-Sent Events (GET /api/stream): only the sections that changed, at most every
`push_interval_s`. GET /api/lineage explains a model (`libs.common.lineage`).
It publishes nothing and consumes no work queue: any number of dashboards may run.
Run with `python -m services.dashboard`.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import msgspec
import nats.errors
import nats.js.errors

from libs.common import topology
from libs.common.bus import Bus
from libs.common.deadletter import STREAM as DEAD_LETTERS
from libs.common.deadletter import list_dead_letters
from libs.common.history import Recorded, follow, stream_end
from libs.common.log import get_logger
from libs.common.records import CHAMPION, DEPLOY_DECISIONS, DEPLOYMENT, TRAINER_CONTROL, SkillState
from libs.common.runtime import ServiceRuntime
from libs.common.service import Service
from libs.common.settings import SERVICES, load_all
from services.dashboard.api import router
from services.dashboard.read_model import ReadModel
from services.dashboard.settings import DashboardSettings

NAME = "dashboard"
log = get_logger(NAME)
# The streams the read model folds (dead letters are listed by `poll_nats`: a replay deletes one).
STREAMS = ("DATASETS", "TRAINING", "EVALS", "MODELS", "CURRICULUM")
# KV keys by bucket and the read model's name for them (any other key of `curriculum` is a skill).
RECORDS = {
    topology.CHAMPION_BUCKET.name: {CHAMPION.key: ("champion", CHAMPION.kind), DEPLOY_DECISIONS.key: ("decisions", DEPLOY_DECISIONS.kind),
                                    DEPLOYMENT.key: ("deployment", DEPLOYMENT.kind)},
    topology.TRAINER_BUCKET.name: {TRAINER_CONTROL.key: ("trainer", TRAINER_CONTROL.kind)},
}


def service_urls(settings: DashboardSettings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Each other service's base URL: as configured, else `services_host` at its own http_port."""
    ports = {name: s.http_port for name, s in load_all(environ).items()}
    return {name: settings.service_urls.get(name) or f"http://{settings.services_host}:{ports[name]}"
            for name in SERVICES if name != NAME}


class Dashboard:
    def __init__(self, settings: DashboardSettings, bus: Bus, data_dir: Path, urls: dict[str, str]) -> None:
        self.settings = settings
        self.bus = bus
        self.data_dir = data_dir
        self.urls = urls
        self.model = ReadModel(trace_url=settings.trace_url or "/traces/{trace_id}",
                               max_points=settings.max_points, max_rows=settings.max_rows)
        self.stop = asyncio.Event()
        # Set (and replaced) on every change: each browser's stream waits on the current one.
        self._changed = asyncio.Event()

    @classmethod
    async def open(cls, rt: ServiceRuntime[DashboardSettings]) -> Dashboard:
        dashboard = cls(rt.settings, rt.bus, rt.settings.data_dir, service_urls(rt.settings))
        dashboard.stop = rt.stop
        return dashboard

    def changed(self, sections: set[str]) -> None:
        if sections:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float) -> bool:
        """True once something changed; False after `timeout` or when the service stops."""
        waiters = [asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return waiters[0] in done

    async def validation_report(self, submission_id: str) -> tuple[int, bytes]:
        """The gatekeeper's report for a submission (status, JSON body): the gatekeeper owns the file."""
        url = f"{self.urls['gatekeeper']}/datasets/{quote(submission_id, safe='')}/report"
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                response = await client.get(url)
        except httpx.HTTPError as exc:
            return 502, msgspec.json.encode({"detail": f"the gatekeeper at {self.urls['gatekeeper']} did not answer: {exc!r}"})
        return response.status_code, response.content

    # ------------------------------------------------------------------ loops

    async def follow_streams(self, stop: asyncio.Event) -> None:
        """Replay every stream, then follow; `meta.caught_up` once each reached its end at start."""
        ends = {name: await stream_end(self.bus, name) for name in STREAMS}
        behind = {name for name, end in ends.items() if end > 0}

        def on_record(record: Recorded) -> None:
            self.changed(self.model.apply(record))
            if record.stream in behind and record.seq >= ends[record.stream]:
                behind.discard(record.stream)
                if not behind:
                    self.changed(self.model.mark_caught_up())

        if not behind:
            self.changed(self.model.mark_caught_up())
        await asyncio.gather(*(follow(self.bus, name, on_record, stop) for name in STREAMS))

    async def watch_records(self, stop: asyncio.Event) -> None:
        """The KV records' current values, then every change."""
        await asyncio.gather(*(self._watch_bucket(spec, stop) for spec in
                               (topology.CHAMPION_BUCKET, topology.TRAINER_BUCKET, topology.CURRICULUM_BUCKET)))

    async def _watch_bucket(self, spec: topology.BucketSpec, stop: asyncio.Event) -> None:
        kv = await self.bus.kv(spec)
        watcher = await kv.watchall()
        keys = RECORDS.get(spec.name, {})
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # the end of the current values
                    continue
                name, kind = keys.get(entry.key, (entry.key, SkillState))
                try:
                    record = msgspec.json.decode(entry.value, type=kind) if entry.value else None
                except msgspec.DecodeError as exc:
                    log.warning("undecodable record", bucket=spec.name, key=entry.key, error=str(exc))
                    continue
                self.changed(self.model.apply_record(record, key=name))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def poll_nats(self, stop: asyncio.Event) -> None:
        """The queue (JetStream pushes no consumer state) and the dead letters, every `queue_interval_s`.

        The dead letters are listed again (a request each) only when the stream's state says one
        came or went (a replay deletes it): one stream_info a round otherwise."""
        listed = None
        while not stop.is_set():
            try:
                self.changed(self.model.set_queue(await self.bus.queue_state()))
                state = (await self.bus.js.stream_info(DEAD_LETTERS)).state
                if (state.first_seq, state.last_seq, state.messages) != listed:
                    letters = await list_dead_letters(self.bus, limit=self.settings.max_rows)
                    self.changed(self.model.set_dead_letters(
                        {"seq": d.seq, "time": d.time.isoformat() if d.time else None, "subject": d.subject,
                         "consumer": d.consumer, "reason": d.reason} for d in reversed(letters)))
                    listed = (state.first_seq, state.last_seq, state.messages)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning("could not read the queue", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.queue_interval_s)

    async def poll_health(self, stop: asyncio.Event) -> None:
        """Each service's /health over HTTP, every `health_interval_s`."""
        async with httpx.AsyncClient(timeout=min(2.0, self.settings.health_interval_s)) as client:
            while not stop.is_set():
                results = await asyncio.gather(*(self._health(client, n, u) for n, u in self.urls.items()))
                for name, health in zip(self.urls, results, strict=True):
                    self.changed(self.model.set_health(name, health))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.health_interval_s)

    async def _health(self, client: httpx.AsyncClient, name: str, url: str) -> dict:
        checked = datetime.now(UTC).isoformat()
        try:
            response = await client.get(f"{url}/ready")
        except httpx.HTTPError as exc:
            return {"url": url, "ok": False, "status": "down", "checked": checked, "detail": type(exc).__name__}
        detail = ""
        with contextlib.suppress(ValueError):
            body = response.json()
            failing = [k for k, v in (body.get("checks") or {}).items() if not v] if isinstance(body, dict) else []
            detail = "not ready: " + ", ".join(failing) if failing else ""
        ok = response.status_code == 200
        return {"url": url, "ok": ok, "status": "ready" if ok else "starting", "checked": checked, "detail": detail}


SERVICE = Service(
    name=NAME,
    settings=DashboardSettings,
    build=Dashboard.open,
    routes=router,
    loops=(Dashboard.follow_streams, Dashboard.watch_records, Dashboard.poll_nats, Dashboard.poll_health),
)
