"""The gatekeeper service: three ways in, one pipeline, one announcement per submission.

In: `dataset.submitted` (durable consumer `gatekeeper`), HTTP (`api.py`), the inbox folder
(`intake.py`). Out: `dataset.accepted.<priority>` or `dataset.rejected`. Validation runs in a
worker thread so /health stays responsive while a large file is checked. HTTP and inbox
submissions call the pipeline directly; they do not round-trip through `dataset.submitted`.

At least once: an acceptance is marked announced in the index only once JetStream acked its
`dataset.accepted`. One whose publish failed (NATS away longer than the retries; the
submission then fails: 503, a redelivery, the inbox file left for the next start) or that a
crash cut short is announced again, with the same event id, by the next submission of the
same content, which is answered as accepted, not as a duplicate (pipeline.py), and by the
sweep (`sweep_unannounced`): a background loop that announces every such acceptance at start
and again after each failed announcement, backing off while publishing fails, so start-up
never waits on NATS and nothing accepted is lost even when no client retries.

Run: `FLYWHEEL_NATS_URL=nats://... FLYWHEEL_DATA_DIR=... python -m services.gatekeeper`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from opentelemetry.trace import Status, StatusCode

from libs.common import topology
from libs.common.artifacts import ArtifactError, ArtifactStore
from libs.common.bus import Bus, Delivery, Interrupted, first_of
from libs.common.events import DatasetAccepted, DatasetRejected, DatasetSubmitted, Event
from libs.common.http import ServiceMetrics
from libs.common.log import get_logger
from libs.common.runtime import ServiceRuntime
from libs.common.service import Publish, Service, Subscribe
from libs.common.tracing import tracer
from services.gatekeeper.api import router
from services.gatekeeper.intake import Inbox, InboxFile, Submission
from services.gatekeeper.pipeline import NAME, ValidationInterrupted, build_gatekeeper
from services.gatekeeper.settings import GatekeeperSettings
from services.gatekeeper.verdict import Report, announcement

log = get_logger(NAME)
# Publishing is tried this many times (1, 2, 4, ... s apart) before a submission fails.
_PUBLISH_ATTEMPTS = 5
# The sweep of acceptances never announced: after a failed announcement it waits this long (the
# client's retry may come first), then while publishing fails twice as long each time, up to the max.
_SWEEP_RETRY_S = 30.0
_SWEEP_RETRY_MAX_S = 600.0
_STALE_UPLOAD_S = 3600.0


class GatekeeperService:
    def __init__(self, settings: GatekeeperSettings, bus: Bus, metrics: ServiceMetrics, store: ArtifactStore) -> None:
        self.settings = settings
        self.bus = bus
        own = settings.service_dir(NAME)
        self.uploads = own / "uploads"
        self.uploads.mkdir(exist_ok=True)
        # Left by a crash mid-upload (their clients got no answer and will send them again); an
        # upload still written by another copy of this service on the same host is fresher.
        for partial in self.uploads.glob("upload-*.part"):
            if time.time() - partial.stat().st_mtime > _STALE_UPLOAD_S:
                log.warning("removing an unfinished upload", path=str(partial))
                partial.unlink(missing_ok=True)
        self.gatekeeper = build_gatekeeper(settings, store)
        self.inbox = Inbox(settings.inbox_path, settings.settle_seconds, settings.default_priority, self.on_inbox_file)
        self._submissions = metrics.counter(
            "flywheel_gatekeeper_submissions_total", "Submissions by channel and outcome", ("channel", "status")
        )
        self._rows = metrics.counter("flywheel_gatekeeper_rows_total", "Rows validated", ("result",))
        self._seconds = metrics.histogram(
            "flywheel_gatekeeper_validation_seconds", "Time to validate one submission",
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800),
        )
        # Set when an acceptance could not be announced: wakes the sweep.
        self._unannounced = asyncio.Event()

    @classmethod
    async def open(cls, rt: ServiceRuntime[GatekeeperSettings]) -> GatekeeperService:
        service = cls(rt.settings, rt.bus, rt.metrics, rt.store)
        # Load the tokenizer now, so a wrong base model stops the service at start, not mid-submission.
        await asyncio.to_thread(service.gatekeeper.tools.tokens)
        return service

    # ------------------------------------------------------------------ the three ways in

    async def on_submitted(self, event: DatasetSubmitted, delivery: Delivery) -> None:
        if event.uri and event.sha256 and self.gatekeeper.store.is_shared(event.uri):
            # Submitted on another host: into this host's store first, where the pipeline reads it.
            try:
                await self.gatekeeper.store.fetch(event.uri, event.sha256)
            except ArtifactError as exc:  # the pipeline's report then says it is not in the store
                log.warning("submitted artifact not fetched", uri=event.uri, error=str(exc))
        try:
            report = await asyncio.to_thread(self.gatekeeper.submit_event, event)
        except ValidationInterrupted as exc:
            raise Interrupted(f"stopping mid-validation ({exc}); redelivered after the restart") from exc
        await self.announce(report)

    async def submit_file(self, submission: Submission, path: Path, *, move: bool) -> Report:
        """HTTP and inbox: validate and announce, in a span of its own (a new trace starts here)."""
        with tracer().start_as_current_span(
            "gatekeeper.submit", attributes={"flywheel.channel": submission.channel, "flywheel.name": submission.name},
        ) as span:
            report = await asyncio.to_thread(self.gatekeeper.submit_file, submission, path, move=move)
            if report.status != "accepted":
                span.set_status(Status(StatusCode.ERROR, report.status))
            await self.announce(report)
            return report

    async def on_inbox_file(self, item: InboxFile) -> None:
        """Copied, not moved: until it is announced the claimed file stays, and a restart resumes it."""
        submission = Submission(
            submission_id=item.submission_id, name=item.name, channel="inbox", source=item.source,
            priority=item.priority, level=item.level, schema=item.schema, profile=item.profile,
        )
        await self.submit_file(submission, item.path, move=False)
        item.path.unlink()

    async def watch_inbox(self, stop: asyncio.Event) -> None:
        await self.inbox.run(stop)

    def interrupt(self) -> None:
        """Validation runs in threads, which cannot be cancelled: tell them to stop instead."""
        self.gatekeeper.stopping.set()

    def readiness(self) -> dict:
        return {"inbox": lambda: self.inbox.watching}

    # ------------------------------------------------------------------ out

    async def announce(self, report: Report) -> None:
        subject, event = announcement(report)
        self._submissions.labels(report.channel, report.status).inc()
        self._rows.labels("valid").inc(report.num_rows_valid)
        self._rows.labels("dropped").inc(report.num_rows_dropped)
        self._seconds.observe(report.duration_s)
        log.info(
            f"dataset {report.status}", submission_id=report.submission_id, name=report.name,
            channel=report.channel, dataset_id=report.dataset_id, rows=report.num_rows_valid,
            dropped=report.num_rows_dropped, reasons=report.reasons, subject=subject,
        )
        if await asyncio.to_thread(self.gatekeeper.was_announced, report):
            # A stored report seen again (a redelivery, an inbox file resumed) after the sweep announced it.
            log.info("already announced", submission_id=report.submission_id, dataset_id=report.dataset_id)
            return
        await self._publish(report, subject, event, _PUBLISH_ATTEMPTS)

    async def _publish(self, report: Report, subject: str, event: Event, attempts: int) -> None:
        """Publish `report`'s announcement; the index learns whether it went out."""
        try:
            # The report is stored already; NATS may be reconnecting: the same event id is safe to retry.
            await self.bus.publish(subject, event, attempts=attempts)
        except BaseException:
            self.gatekeeper.not_announced(report)
            if report.status == "accepted":
                self._unannounced.set()
            raise
        await asyncio.to_thread(self.gatekeeper.announced, report)

    async def sweep_unannounced(self, stop: asyncio.Event) -> None:
        """Announce every acceptance never announced: at start, then after each failed announcement.

        While publishing fails it tries again `_SWEEP_RETRY_S` later, twice as long each time up
        to `_SWEEP_RETRY_MAX_S`; it runs beside the service, which it never holds up.
        """
        failures = 0
        while not stop.is_set():
            self._unannounced.clear()
            if await self._announce_unannounced(stop):
                failures = 0
                await first_of(stop, self._unannounced)
            else:
                failures += 1
            await first_of(stop, timeout=min(_SWEEP_RETRY_S * 2 ** max(failures - 1, 0), _SWEEP_RETRY_MAX_S))

    async def _announce_unannounced(self, stop: asyncio.Event) -> bool:
        """One pass of the sweep; False when publishing failed (the rest wait for the next pass)."""
        reports = await asyncio.to_thread(self.gatekeeper.take_unannounced)
        for n, report in enumerate(reports):
            if stop.is_set():
                self._give_back(reports[n:])
                return True
            subject, event = announcement(report)
            try:
                await self._publish(report, subject, event, 1)  # this loop is the retry
            except Exception as exc:  # noqa: BLE001 - NATS away: the next pass tries again
                log.warning("announcing an earlier acceptance failed; trying again later",
                            dataset_id=report.dataset_id, left=len(reports) - n, error=repr(exc))
                self._give_back(reports[n + 1:])
                return False
            log.info("announced an acceptance whose announcement had not gone out", dataset_id=report.dataset_id,
                     submission_id=report.submission_id, subject=subject)
        return True

    def _give_back(self, reports: list[Report]) -> None:
        for report in reports:
            self.gatekeeper.not_announced(report)


SERVICE = Service(
    name=NAME,
    settings=GatekeeperSettings,
    build=GatekeeperService.open,
    subscriptions=(
        Subscribe(topology.DATASET_SUBMITTED, DatasetSubmitted, GatekeeperService.on_submitted,
                  consumers=(topology.GATEKEEPER,)),
    ),
    publications=(
        Publish(topology.DATASET_ACCEPTED, DatasetAccepted),
        Publish(topology.DATASET_REJECTED, DatasetRejected),
    ),
    routes=router,
    readiness=GatekeeperService.readiness,
    loops=(GatekeeperService.watch_inbox, GatekeeperService.sweep_unannounced),
    on_stop=GatekeeperService.interrupt,
)
