"""The bus: nats-py JetStream with Flywheel's delivery rules.

- Streams, durable pull consumers and KV buckets are created idempotently (`ensure_topology`).
- `publish` stamps CloudEvents-style headers (`ce-id`, `ce-type`, `ce-source`, `ce-time`),
  `Nats-Msg-Id` = the event id (JetStream drops a republished event inside the duplicate
  window) and the W3C `traceparent` of the current span.
  Only subjects the service declares may be published (`libs.common.service`).
- `bind` attaches a declared subscription; its `Source.run` is the one consume loop. A shared
  work queue: explicit ack, nak with backoff on failure, `in_progress()` heartbeats while a
  long handler runs, and a copy to `deadletter.<subject>` with the reason when a message
  cannot be decoded, is refused by its handler (`Reject`) or has failed `max_deliver` times.
  Only failures count: they are kept per message in KV (`records.message_failures`), since
  JetStream's delivery count also counts interruptions (`Interrupted`, shutdown, kill -9),
  which must never use up a message's tries. Nothing is dropped silently. Given several
  consumers it always drains the first before looking at the next (priorities), and takes
  nothing while its `while_open` valve is shut.
  Every replica: an ordered consumer from the newest message on, through the same span and
  decoding, never acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
import tenacity
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind, Status, StatusCode

from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.events import Event, encode
from libs.common.kv import Record
from libs.common.nats_auth import NatsAuth
from libs.common.records import Key, MessageFailures, message_failures
from libs.common.service import Publish, Subscribe, matches
from libs.common.tracing import extract_context, inject_headers, trace_id_from_headers, tracer

log = structlog.get_logger("bus")

E = TypeVar("E", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)

REASON_HEADER = "Flywheel-Dead-Letter-Reason"
# Also on a dead letter: which consumer gave up on it, and where it was published first.
CONSUMER_HEADER = "Flywheel-Consumer"
SUBJECT_HEADER = "Flywheel-Original-Subject"
# The original message id (the dead letter's own Nats-Msg-Id is per consumer).
ORIGINAL_ID_HEADER = "Flywheel-Original-Msg-Id"
# What an unreachable or not yet started server looks like to a first connect.
_UNREACHABLE = (nats.errors.NoServersError, nats.errors.Error, OSError, TimeoutError)


class Reject(Exception):
    """Raised by a handler: this message can never succeed; dead-letter it now with this reason."""


class UndeclaredPublication(RuntimeError):
    """A service published something its declaration does not list."""


class Interrupted(Exception):
    """Raised by a handler that stopped early on purpose (shutdown, stop command, not its turn).

    The message is released for redelivery, after `retry_in_s` (0: at once), and does not count
    as a failure, however often it happens.
    """

    def __init__(self, reason: str = "", *, retry_in_s: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_in_s = retry_in_s


class Delivery:
    """What a handler may know and do about the message it is handling."""

    def __init__(self, msg: Msg, spec: topology.ConsumerSpec | None) -> None:
        self._msg = msg
        self.spec = spec
        self.subject = msg.subject
        self.headers: dict[str, str] = dict(msg.headers or {})
        # Deliveries so far, interruptions included: use `failures` to decide about retries.
        self.num_delivered = msg.metadata.num_delivered if msg.reply else 1
        self.stream_sequence = msg.metadata.sequence.stream if msg.reply else 0
        # How often handlers failed on this message before (set by the bus before the handler
        # runs); the message is dead-lettered when failures reach `spec.max_deliver`.
        self.failures = 0

    @property
    def trace_id(self) -> str:
        return trace_id_from_headers(self.headers)

    async def in_progress(self) -> None:
        await self._msg.in_progress()


Handler = Callable[[Any, Delivery], Awaitable[None]]


class Bus:
    """One service's connection to NATS JetStream."""

    def __init__(self, nc: nats.NATS, service: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.service = service
        self._kv: dict[str, KeyValue] = {}
        # JetStream replicas of the streams and buckets this bus creates (ensure_topology).
        self.replicas = 1
        # Set by the runtime from the service's declaration: publishing elsewhere is a bug.
        self.publications: tuple[Publish, ...] | None = None
        # Set by the runtime: the store that shares an event's artifacts before it goes out.
        self.artifacts: ArtifactStore | None = None

    # ------------------------------------------------------------------ connection

    @classmethod
    async def connect(cls, servers: list[str], service: str, *, deadline_s: float = 30.0,
                      auth: NatsAuth | None = None) -> Bus:
        """Connect, retrying with exponential backoff for up to `deadline_s` (0: forever).

        Services may start before the server. An unreachable server is reported once, with the
        deadline, not on every attempt; past the deadline a `ConnectionError` says what was
        tried. Cancelling the task (SIGTERM) stops the attempts at once.
        `auth`: credentials and TLS (`settings.nats_auth`). Credentials the server refuses are not
        retried: a `PermissionError` says so at once.
        """
        connected = False
        options = (auth or NatsAuth()).connect_options(service)

        async def on_error(exc: Exception) -> None:
            # Before the first connection the retry loop below reports; after it, every error counts.
            if connected and "permissions violation" in str(exc).lower():
                # Something this service does is not in its NATS permissions (libs.common.nats_permissions).
                log.error("NATS refused an operation: permissions violation", error=str(exc))
            elif connected:
                await _log_error(exc)

        def refused(exc: BaseException) -> bool:
            return "authorization violation" in str(exc).lower()

        def report_once(state: tenacity.RetryCallState) -> None:
            if state.attempt_number == 1:
                log.warning("cannot reach NATS; retrying with backoff", servers=servers,
                            error=repr(state.outcome.exception()),
                            gives_up_after_s=deadline_s if deadline_s else "never")

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, _UNREACHABLE) and not refused(exc)),
            wait=tenacity.wait_exponential(multiplier=0.25, max=5.0),
            stop=tenacity.stop_after_delay(deadline_s) if deadline_s else tenacity.stop_never,
            before_sleep=report_once,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # One quick try per server, so tenacity paces the retries and the deadline
                    # holds (by default nats-py retries inside connect() for minutes, or forever);
                    # reconnecting is switched on once connected, below.
                    nc = await nats.connect(
                        servers=servers,
                        name=f"flywheel-{service}",
                        connect_timeout=3,
                        allow_reconnect=False,
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0.1,
                        error_cb=on_error,
                        disconnected_cb=_log_disconnected,
                        reconnected_cb=_log_reconnected,
                        **options,
                    )
        except _UNREACHABLE as exc:
            if refused(exc):
                who = (f"user {options['user']}" if "user" in options else "its credentials file" if auth and
                       auth.authenticates else "no credentials given")
                raise PermissionError(f"NATS at {', '.join(servers)} refused {service} ({who}): {exc}") from exc
            raise ConnectionError(f"cannot reach NATS at {', '.join(servers)} within {deadline_s:g} s: {exc!r}") from exc
        # Once connected, ride out server restarts and failovers for as long as it takes.
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 1
        connected = True
        if retrying.statistics.get("attempt_number", 1) > 1:
            log.info("connected to NATS", servers=servers)
        return cls(nc, service)

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def close(self) -> None:
        """Drain: finish in-flight callbacks and flush publishes, then close."""
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    # ------------------------------------------------------------------ topology

    async def ensure_topology(self, replicas: int = 1) -> None:
        """Create the streams, consumers and KV buckets that are missing; bring existing streams'
        own settings (subjects, limits, duplicate window) up to date and leave the rest alone.

        `replicas`: JetStream replicas of what is created (3 on a NATS cluster); an existing
        stream keeps a higher count an operator gave it.
        """
        self.replicas = replicas
        for stream in topology.STREAMS:
            await self._ensure_stream(stream)
        for consumer in topology.CONSUMERS:
            await self._ensure_consumer(consumer)
        for bucket in topology.BUCKETS:
            await self.kv(bucket)

    async def _ensure_stream(self, spec: topology.StreamSpec) -> None:
        owned = {
            "subjects": list(spec.subjects), "retention": api.RetentionPolicy.LIMITS, "max_age": spec.max_age_s,
            "max_bytes": spec.max_bytes, "duplicate_window": spec.duplicate_window_s,
        }
        try:
            existing = (await self.js.stream_info(spec.name)).config
        except nats.js.errors.NotFoundError:
            config = api.StreamConfig(name=spec.name, storage=api.StorageType.FILE, num_replicas=self.replicas, **owned)
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.stream_info(spec.name)  # created concurrently by another service
            return
        # Only what Flywheel owns changes; an operator's other settings (replicas, message
        # limits, placement, a description) survive every start. No change: no update at all.
        wanted = dataclasses.replace(existing, num_replicas=max(existing.num_replicas or 1, self.replicas), **owned)
        if wanted != existing:
            await self.js.update_stream(wanted)

    async def _ensure_consumer(self, spec: topology.ConsumerSpec) -> None:
        config = api.ConsumerConfig(
            durable_name=spec.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=spec.filter_subject,
            ack_wait=spec.ack_wait_s,
            # The server redelivers forever; `_process` dead-letters after spec.max_deliver
            # failures (counted in KV), so an interrupted job (shutdown) is never lost to the limit.
            max_deliver=-1,
            max_ack_pending=spec.max_ack_pending,
        )
        try:
            await self.js.add_consumer(spec.stream, config)
        except nats.js.errors.BadRequestError:
            await self.js.consumer_info(spec.stream, spec.durable)

    async def record(self, key: Key[R]) -> Record[R]:
        """Typed access to one KV record (see libs.common.records for the keys)."""
        return Record(self.js, await self.kv(key.bucket), key)

    async def kv(self, spec: topology.BucketSpec) -> KeyValue:
        if spec.name not in self._kv:
            try:
                self._kv[spec.name] = await self.js.key_value(spec.name)
            except nats.js.errors.BucketNotFoundError:
                try:
                    self._kv[spec.name] = await self.js.create_key_value(
                        bucket=spec.name, history=spec.history, description=spec.description, ttl=spec.max_age_s,
                        replicas=self.replicas,
                    )
                except nats.js.errors.BadRequestError:
                    self._kv[spec.name] = await self.js.key_value(spec.name)
        return self._kv[spec.name]

    async def still_queued(self, spec: topology.ConsumerSpec, stream_sequence: int) -> bool:
        """Whether the message at `stream_sequence` can still come (back) to `spec`'s handlers:
        the stream holds it and the consumer has not settled it (acked, or terminated when
        dead-lettered).

        Exact for a consumer that settles in order (`max_ack_pending` 1, as the trainer's): its
        ack floor passes a message only once it and everything before it is settled.
        """
        try:
            await self.js.get_msg(spec.stream, stream_sequence)
            info = await self.js.consumer_info(spec.stream, spec.durable)
        except nats.js.errors.NotFoundError:
            return False
        return info.ack_floor.stream_seq < stream_sequence

    async def queue_state(self) -> dict[str, dict[str, int]]:
        """Each queue consumer (`topology.QUEUE`): messages waiting, and delivered but not yet acknowledged."""
        state = {}
        for spec in topology.QUEUE:
            info = await self.js.consumer_info(spec.stream, spec.durable)
            state[spec.durable] = {"waiting": info.num_pending, "in_progress": info.num_ack_pending}
        return state

    # ------------------------------------------------------------------ publishing

    async def publish(self, subject: str, event: Event, *, timeout: float = 10.0, attempts: int = 1) -> api.PubAck:
        """Publish `event` and wait for JetStream's ack.

        With `attempts` > 1 a failed publish (NATS reconnecting, no ack in time) is tried again
        with exponential backoff: safe, since the same event id is dropped as a duplicate.
        """
        if self.publications is not None and not any(
            matches(p.subject, subject) and isinstance(event, p.event_type) for p in self.publications
        ):
            raise UndeclaredPublication(
                f"{self.service} publishes {type(event).__name__} on {subject!r}, which its service.py does not declare"
            )
        if not event.source:
            event = msgspec.structs.replace(event, source=self.service)
        if self.artifacts is not None:
            # An event never names what another host cannot fetch (a no-op on one disk).
            for uri, sha256 in event.artifacts():
                await self.artifacts.share(uri, sha256)
        headers = {
            "Nats-Msg-Id": event.id,
            "ce-specversion": "1.0",
            "ce-id": event.id,
            "ce-type": type(event).__name__,
            "ce-source": f"flywheel/{event.source}",
            "ce-time": event.time.isoformat(),
            "content-type": "application/json",
        }
        with tracer().start_as_current_span(f"{subject} publish", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.destination.name", subject)
            span.set_attribute("flywheel.event_id", event.id)
            inject_headers(headers)
            retrying = tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception_type(_UNREACHABLE),
                wait=tenacity.wait_exponential(multiplier=1, max=16),
                stop=tenacity.stop_after_attempt(attempts),
                before_sleep=lambda state: log.warning(
                    "publish failed; retrying", subject=subject, attempt=state.attempt_number,
                    error=repr(state.outcome.exception())),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self.js.publish(subject, encode(event), headers=headers, timeout=timeout)

    # ------------------------------------------------------------------ consuming

    async def bind(self, subscription: Subscribe) -> Source:
        """Attach to a declared subscription's consumers now; `Source.run` then takes events.

        Binding before the service is built means nothing published meanwhile is missed: a
        shared consumer keeps its place anyway, and an every-replica consumer starts here.
        """
        if subscription.every_replica:
            stream = topology.stream_for(subscription.subject)
            # Stream sequences up to here are history. An ordered consumer that resets before
            # its first message restarts from sequence 1; this bound skips that replay.
            seen = (await self.js.stream_info(stream)).state.last_seq
            sub = await self.js.subscribe(
                subscription.subject, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW,
            )
            return _EveryReplica(self, subscription, sub, seen)
        subs = [await self.js.pull_subscribe_bind(c.durable, c.stream) for c in subscription.consumers]
        return _WorkQueue(self, subscription, subs)

    async def _process(self, spec: topology.ConsumerSpec | None, msg: Msg, event_type: type[E],
                       handler: Handler) -> None:
        """One message: a consumer span linked to the producer, decode, handle, settle.

        `spec` None: an every-replica message, which is never acked or redelivered; a failure
        is logged and the next event goes on.
        """
        delivery = Delivery(msg, spec)
        context = extract_context(delivery.headers)
        event_id = delivery.headers.get("ce-id", "")
        with tracer().start_as_current_span(
            f"{msg.subject} process", context=context, kind=SpanKind.CONSUMER,
            attributes={
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": spec.durable if spec else f"{self.service} (every replica)",
                "flywheel.event_id": event_id,
                "flywheel.delivery": delivery.num_delivered,
            },
        ) as span, structlog.contextvars.bound_contextvars(event_id=event_id, subject=msg.subject):
            try:
                event = msgspec.json.decode(msg.data, type=event_type)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                span.set_status(Status(StatusCode.ERROR, "undecodable"))
                reason = f"payload does not decode as {event_type.__name__}: {exc}"
                if spec:
                    await self._dead_letter(spec, msg, reason)
                else:
                    log.error("ignoring an undecodable event", reason=reason)
                return
            if spec is None:
                try:
                    await handler(event, delivery)
                except Exception as exc:  # noqa: BLE001 - one bad event must not stop the follower
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, repr(exc)))
                    log.exception("handler failed on an every-replica event")
                return
            if delivery.num_delivered > 1:  # a first delivery has no failures behind it
                delivery.failures = await self._failures_of(spec, delivery)
            span.set_attribute("flywheel.failures", delivery.failures)
            heartbeat = asyncio.create_task(self._heartbeat(msg, spec)) if spec.long_running else None
            try:
                await handler(event, delivery)
            except Reject as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await self._dead_letter(spec, msg, f"rejected by handler: {exc}")
                if delivery.failures:
                    await self._forget_failures(spec, delivery)
            except Interrupted as exc:
                log.info("handler interrupted; message released", reason=str(exc), retry_in_s=exc.retry_in_s,
                         delivery=delivery.num_delivered, failures=delivery.failures)
                await _quietly(msg.nak(delay=exc.retry_in_s or None))
            except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then dead-lettered
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                failures = await self._count_failure(spec, delivery, exc)
                if failures >= spec.max_deliver:
                    await self._dead_letter(spec, msg, f"failed {failures} times, last: {exc!r}")
                    await self._forget_failures(spec, delivery)
                else:
                    delay = spec.backoff_s[min(failures, len(spec.backoff_s)) - 1]
                    log.warning("handler failed; will retry", error=repr(exc), failures=failures,
                                delivery=delivery.num_delivered, retry_in_s=delay)
                    await _quietly(msg.nak(delay=delay))
            else:
                await _quietly(msg.ack_sync(timeout=5))
                if delivery.failures:
                    await self._forget_failures(spec, delivery)
            finally:
                if heartbeat:
                    heartbeat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await heartbeat

    async def _failures_of(self, spec: topology.ConsumerSpec, delivery: Delivery) -> int:
        try:
            record, _ = await (await self.record(message_failures(spec.durable, delivery.stream_sequence))).read()
        except Exception as exc:  # noqa: BLE001 - counted again (compare-and-set) if the handler fails
            log.warning("failure count not read; taken as none", error=repr(exc))
            return 0
        return record.failures if record else 0

    async def _count_failure(self, spec: topology.ConsumerSpec, delivery: Delivery, exc: Exception) -> int:
        """One more failure of this message, stored; the number of failures so far."""
        def one_more(current: MessageFailures | None, _revision: int) -> tuple[MessageFailures, int]:
            failures = max(current.failures if current else 0, delivery.failures) + 1
            return MessageFailures(failures=failures, last_error=repr(exc)[:500]), failures

        try:
            return await (await self.record(message_failures(spec.durable, delivery.stream_sequence))).change(one_more)
        except Exception as error:  # noqa: BLE001 - NATS is failing too: count this one in memory
            log.warning("failure count not stored", error=repr(error))
            return delivery.failures + 1

    async def _forget_failures(self, spec: topology.ConsumerSpec, delivery: Delivery) -> None:
        """The message is settled: its failure count is not needed any more."""
        key = message_failures(spec.durable, delivery.stream_sequence)
        try:
            await (await self.kv(key.bucket)).purge(key.key)
        except Exception as exc:  # noqa: BLE001 - a leftover count only ages out (FAILURES_BUCKET)
            log.warning("failure count not removed", error=repr(exc))

    async def _heartbeat(self, msg: Msg, spec: topology.ConsumerSpec) -> None:
        while True:
            await asyncio.sleep(spec.ack_wait_s / 3)
            await _quietly(msg.in_progress())

    async def _dead_letter(self, spec: topology.ConsumerSpec, msg: Msg, reason: str) -> None:
        headers = dict(msg.headers or {})
        original_id = headers.get("Nats-Msg-Id", "")
        headers.update({
            REASON_HEADER: reason[:2000],
            CONSUMER_HEADER: spec.durable,
            SUBJECT_HEADER: msg.subject,
            ORIGINAL_ID_HEADER: original_id,
            # Per consumer: two consumers of one event (the deployer and the curriculum on
            # eval.scored) each dead-letter their own copy; one id would drop the second reason.
            "Nats-Msg-Id": f"dead-{spec.durable}-{original_id}" if original_id else "",
        })
        for key in ("Nats-Msg-Id", ORIGINAL_ID_HEADER):
            if not headers[key]:
                del headers[key]
        log.error("dead-lettered", reason=reason, consumer=spec.durable)
        await self.js.publish(topology.dead_letter(msg.subject), msg.data, headers=headers)
        # Only after the copy is stored: stop redelivery.
        await _quietly(msg.term())

    # ------------------------------------------------------------------ request / reply

    async def serve(self, subject: str, request_type: type[E], handler: Callable[[E, str], Awaitable[msgspec.Struct]]):
        """Answer core-NATS requests on `subject` (wildcards or `{parameter}` tokens allowed);
        errors are replied, not raised."""
        subject = ".".join("*" if t.startswith("{") else t for t in subject.split("."))

        async def on_request(msg: Msg) -> None:
            with tracer().start_as_current_span(f"{msg.subject} request", context=extract_context(msg.headers), kind=SpanKind.SERVER):
                try:
                    request = msgspec.json.decode(msg.data, type=request_type)
                    reply = await handler(request, msg.subject)
                    body = encode(reply)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    body = msgspec.json.encode({"ok": False, "state": "error", "message": f"bad request: {exc}"})
                except Exception as exc:  # noqa: BLE001 - the caller gets the reason
                    log.exception("request handler failed")
                    body = msgspec.json.encode({"ok": False, "state": "error", "message": repr(exc)})
                # Publish to the reply inbox ourselves: msg.respond echoes request headers.
                if msg.reply:
                    await self.nc.publish(msg.reply, body)

        subscription = await self.nc.subscribe(subject, cb=on_request)
        # A round trip to the server: once serve() returns, a request from any connection finds
        # this responder (without it, a request right after start could get "no responders").
        await self.nc.flush()
        return subscription

    async def request(self, subject: str, payload: msgspec.Struct, reply_type: type[R], *, timeout: float = 5.0) -> R:
        headers = inject_headers({})
        reply = await self.nc.request(subject, encode(payload), timeout=timeout, headers=headers)
        return msgspec.json.decode(reply.data, type=reply_type)


class Source:
    """A bound subscription: `run(service, stop)` handles its events until `stop` is set."""

    def __init__(self, bus: Bus, subscription: Subscribe) -> None:
        self.bus = bus
        self.subscription = subscription

    def _handler(self, service: Any) -> Handler:
        method = self.subscription.handler
        return lambda event, delivery: method(service, event, delivery)

    async def run(self, service: Any, stop: asyncio.Event) -> None:
        raise NotImplementedError


class _WorkQueue(Source):
    """Shared durable consumers, one message at a time; earlier consumers drain first."""

    def __init__(self, bus: Bus, subscription: Subscribe, subs: list[JetStreamContext.PullSubscription]) -> None:
        super().__init__(bus, subscription)
        self.subs = subs

    async def run(self, service: Any, stop: asyncio.Event) -> None:
        specs = self.subscription.consumers
        handler = self._handler(service)
        valve = self.subscription.while_open(service) if self.subscription.while_open else None
        # With one consumer a long poll is fine; with several, poll briefly so a message on
        # a higher-priority consumer is seen soon.
        poll_s = 1.0 if len(specs) == 1 else 0.2
        try:
            while not stop.is_set():
                if valve is not None and not valve.is_set():
                    await first_of(valve, stop)
                    continue
                handled = False
                for spec, sub in zip(specs, self.subs, strict=True):
                    try:
                        msgs = await sub.fetch(1, timeout=poll_s)
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        continue
                    except nats.errors.ConnectionClosedError:
                        return
                    for msg in msgs:
                        await self.bus._process(spec, msg, self.subscription.event_type, handler)
                    handled = True
                    break
                if not handled and not self.bus.nc.is_connected:
                    await first_of(stop, timeout=0.5)
        finally:
            for sub in self.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


class _EveryReplica(Source):
    """An ordered consumer of this process alone, from the newest message on."""

    def __init__(self, bus: Bus, subscription: Subscribe, sub: Subscription, seen_seq: int) -> None:
        super().__init__(bus, subscription)
        self.sub = sub
        self.seen_seq = seen_seq

    async def run(self, service: Any, stop: asyncio.Event) -> None:
        handler = self._handler(service)
        try:
            while not stop.is_set():
                try:
                    msg = await self.sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                sequence = msg.metadata.sequence.stream
                if sequence <= self.seen_seq:
                    continue
                self.seen_seq = sequence
                await self.bus._process(None, msg, self.subscription.event_type, handler)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await self.sub.unsubscribe()


async def first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of `events` is set (or `timeout` passes)."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Acks can fail when the connection drops; redelivery covers that, so log and go on."""
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001
        log.warning("ack/nak failed", error=repr(exc))


async def _log_error(exc: Exception) -> None:
    log.warning("nats error", error=repr(exc))


async def _log_disconnected() -> None:
    # Also called on a deliberate close: info, not warning; a real outage shows as errors.
    log.info("nats disconnected")


async def _log_reconnected() -> None:
    log.info("nats reconnected")
