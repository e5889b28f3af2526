"""Each service under its own NATS user on a real nats-server running the generated configuration:
what it declares works with no permissions violation, what it does not is refused; and TLS.

nats-py reports a refused publish or subscribe asynchronously (an -ERR through error_cb, which the
bus logs as "NATS refused an operation"); a refused JetStream request never gets its answer. So
every step must succeed, and the log must hold no violation once the server has answered a flush.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
import structlog

from flywheel.contract import declarations
from flywheel.supervisor import nats_users
from libs.common import topology
from libs.common.bus import Bus, Delivery
from libs.common.nats_auth import NatsAuth
from libs.common.nats_permissions import (
    ADMIN,
    ARTIFACTS_BUCKET,
    CLI,
    Permissions,
    Tls,
    password_variable,
    render_config,
    write_secrets,
)
from libs.common.nats_server import NatsServer
from libs.common.service import Service
from libs.common.settings import SERVICES
from libs.common.stored import stored
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REFUSED = "NATS refused an operation: permissions violation"
# Who moves artifacts through the object store: writers publish events naming one (the bus shares
# it first) or upload (the CLI); readers receive such events or load a deployment's checkpoint.
ARTIFACT_WRITERS = {"gatekeeper", "trainer", "evaluator", "curriculum", CLI}
ARTIFACT_READERS = {"deployer", "inference"}


@pytest.fixture(scope="module")
def users() -> dict[str, Permissions]:
    return nats_users()


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    return {s.name: s for s in declarations()}


class Secured:
    def __init__(self, url: str, passwords: dict[str, str]) -> None:
        self.url = url
        self.passwords = passwords

    def auth(self, user: str, **tls: str) -> NatsAuth:
        return NatsAuth(user, self.passwords[password_variable(user)], **tls)

    async def connect(self, user: str, **tls: str) -> Bus:
        return await Bus.connect([self.url], user, deadline_s=5, auth=self.auth(user, **tls))


def _start(tmp_path: Path, users: dict[str, Permissions], tls: Tls | None = None) -> tuple[NatsServer, Secured]:
    config = tmp_path / "nats.conf"
    config.write_text(render_config(users, store_dir=None, monitor_port=None, tls=tls))
    passwords = write_secrets(tmp_path / "secrets" / "nats.env", [*users, ADMIN])
    server = NatsServer(tmp_path / "jetstream", config=config, env=passwords)
    return server, Secured(server.start(), passwords)


@pytest.fixture
def secured(tmp_path: Path, users: dict[str, Permissions]):
    server, secured = _start(tmp_path, users)
    try:
        yield secured
    finally:
        server.stop()


def _concrete(subject: str) -> str:
    """A subject the declaration's `{parameter}` or wildcard stands for."""
    return ".".join(str(topology.SUBJECT_PARAMETERS.get(t[1:-1], {}).get("enum", ["x"])[0])
                    if t.startswith("{") else "x" if t in ("*", ">") else t for t in subject.split("."))


async def _settle_probes(bus: Bus, spec: topology.ConsumerSpec) -> None:
    """What the bus does with a consumer's messages: fetch, heartbeat, ack; count a failure, nak,
    take it again, dead-letter it (publish + term) and forget the count."""
    sub = await bus.js.pull_subscribe_bind(spec.durable, spec.stream)
    first = (await sub.fetch(1, timeout=5))[0]
    await first.in_progress()
    await first.ack_sync(timeout=5)
    second = (await sub.fetch(1, timeout=5))[0]
    delivery = Delivery(second, spec)
    assert await bus._count_failure(spec, delivery, RuntimeError("probe")) == 1
    await second.nak()
    again = (await sub.fetch(1, timeout=5))[0]
    again_delivery = Delivery(again, spec)
    assert await bus._failures_of(spec, again_delivery) == 1
    await bus._dead_letter(spec, again, "probe")
    await bus._forget_failures(spec, again_delivery)
    await sub.unsubscribe()


async def _exercise(service: str, bus: Bus, admin: Bus, cli: Bus, declared: Service | None, perms: Permissions) -> None:
    """Everything `service` does on NATS, as it does it."""
    await bus.ensure_topology()
    await bus.queue_state()
    if declared is not None:
        for subscription in declared.subscriptions:
            for spec in subscription.consumers:
                for _ in range(2):
                    await admin.js.publish(spec.filter_subject, b"{}")
                await _settle_probes(bus, spec)
            source = await bus.bind(subscription)  # the runtime's own binding
            for sub in getattr(source, "subs", ()):
                with pytest.raises(nats.errors.TimeoutError):
                    await sub.fetch(1, timeout=0.2)
                await sub.unsubscribe()
            if subscription.every_replica:
                await admin.js.publish(_concrete(subscription.subject), b"{}")
                assert (await source.sub.next_msg(timeout=5)).subject == _concrete(subscription.subject)
                await source.sub.unsubscribe()
        for publication in declared.publications:
            assert (await bus.js.publish(_concrete(publication.subject), b"{}", timeout=5)).stream
        for reply in declared.replies:
            async def answer(_request, _subject):
                raise AssertionError("not reached: the probe is not a valid request")
            await bus.serve(reply.subject, reply.request_type, answer)
            await bus.nc.flush(timeout=5)
            # The CLI asks; the service answers on the CLI's own inbox. The server may take a moment
            # to route a new subscription's interest to another connection: ask until it answers.
            async def ask(subject: str = _concrete(reply.subject)) -> bytes | None:
                try:
                    return (await cli.nc.request(subject, b"[]", timeout=5)).data
                except nats.errors.NoRespondersError:
                    return None

            assert b"bad request" in await wait_for(ask, f"{service} to answer {reply.subject}", timeout=10)
    # Records and streams it keeps or reads back.
    for bucket in topology.BUCKETS:
        if perms.may_publish(f"$KV.{bucket.name}.probe"):
            kv = await bus.kv(bucket)
            await kv.put("probe", b"{}")
            assert (await kv.get("probe")).value == b"{}"
        if perms.may_publish(f"$JS.API.CONSUMER.CREATE.KV_{bucket.name}"):
            kv = await bus.kv(bucket)
            await admin.js.publish(f"$KV.{bucket.name}.seen", b"{}")
            watcher = await kv.watchall()
            assert (await watcher.updates(timeout=5)) is not None
            await watcher.stop()
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await kv.get("never-written")
    for stream in topology.STREAMS:
        if perms.may_publish(f"$JS.API.STREAM.MSG.GET.{stream.name}") and stream.name != "DEADLETTER":
            await admin.js.publish(_concrete(stream.subjects[0]), b"{}")
            assert [m async for m in stored(bus.js, stream.name, stream.subjects[0])]
            assert (await bus.js.get_msg(stream.name, 1)).seq == 1
    # Artifacts through the object store.
    if service in ARTIFACT_WRITERS | ARTIFACT_READERS:
        try:
            store = await bus.js.object_store(ARTIFACTS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            store = await bus.js.create_object_store(ARTIFACTS_BUCKET)
        if service in ARTIFACT_WRITERS:
            await store.put(f"probe-{service}", b"first")
            await store.put(f"probe-{service}", b"second")  # replacing purges the old chunks
            assert (await store.get(f"probe-{service}")).data == b"second"
        else:
            await (await admin.js.object_store(ARTIFACTS_BUCKET)).put("for-readers", b"checkpoint")
            assert (await store.get("for-readers")).data == b"checkpoint"
    await bus.nc.flush(timeout=5)


@pytest.mark.parametrize("service", [*SERVICES, CLI])
async def test_each_user_does_what_it_declares_without_a_permissions_violation(
        service: str, secured: Secured, users: dict[str, Permissions], services: dict[str, Service]):
    admin = await secured.connect(ADMIN)
    cli = await secured.connect(CLI)
    bus = await secured.connect(service)
    try:
        with structlog.testing.capture_logs() as logs:
            try:
                await admin.ensure_topology()
                await _exercise(service, bus, admin, cli, services.get(service), users[service])
                await cli.nc.flush(timeout=5)
            except Exception as exc:  # a refused request shows as a timeout: say what was refused
                raise AssertionError(f"failed; refused: {_refused(logs)}") from exc
    finally:
        for each in (bus, cli, admin):
            await each.close()
    assert _refused(logs) == []


def _refused(logs: list[dict]) -> list[str]:
    return [entry["error"] for entry in logs if entry["event"] == REFUSED]


async def test_what_a_user_does_not_declare_is_refused(secured: Secured):
    admin = await secured.connect(ADMIN)
    await admin.ensure_topology()
    inference = await secured.connect("inference")
    gatekeeper = await secured.connect("gatekeeper")
    dashboard = await secured.connect("dashboard")
    trainer = await secured.connect("trainer")
    try:
        with structlog.testing.capture_logs() as logs:
            # Inference may not accept datasets, nor read other users' inboxes or dataset subjects.
            with pytest.raises(nats.errors.TimeoutError):
                await inference.js.publish(topology.dataset_accepted("high"), b"{}", timeout=1)
            await inference.nc.subscribe("_INBOX.>")
            await inference.nc.subscribe("dataset.>")
            # The gatekeeper may create streams but never delete one.
            with pytest.raises(nats.errors.TimeoutError):
                await gatekeeper.js.delete_stream("DATASETS")
            # The dashboard reads the champion but may not write it; the trainer may not deploy.
            with pytest.raises(nats.errors.TimeoutError):
                await (await dashboard.kv(topology.CHAMPION_BUCKET)).put("current", b"{}")
            with pytest.raises(nats.errors.TimeoutError):
                await trainer.nc.request(topology.CONTROL_DEPLOYER_ROLLBACK, b"{}", timeout=1)
            for bus in (inference, gatekeeper, dashboard, trainer):
                await bus.nc.flush(timeout=5)
        refused = [e.lower() for e in _refused(logs)]  # nats-py reports them in lower case
        assert any("publish to \"dataset.accepted.high\"" in e for e in refused), refused
        assert any("subscription to \"_inbox.>\"" in e for e in refused), refused
        assert any("subscription to \"dataset.>\"" in e for e in refused), refused
        assert any("publish to \"$js.api.stream.delete.datasets\"" in e for e in refused), refused
        assert any("publish to \"$kv.champion.current\"" in e for e in refused), refused
        assert any(f"publish to \"{topology.CONTROL_DEPLOYER_ROLLBACK}\"" in e for e in refused), refused
        assert (await admin.js.stream_info("DATASETS")).config.name == "DATASETS"
    finally:
        for bus in (inference, gatekeeper, dashboard, trainer, admin):
            await bus.close()


async def test_a_wrong_or_missing_password_is_refused_at_once(secured: Secured):
    with pytest.raises(PermissionError, match=r"refused gatekeeper \(user gatekeeper\)"):
        await Bus.connect([secured.url], "gatekeeper", deadline_s=30, auth=NatsAuth("gatekeeper", "wrong"))
    with pytest.raises(PermissionError, match="no credentials given"):
        await Bus.connect([secured.url], "gatekeeper", deadline_s=30)


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (the `cryptography`
    package is not installed here; the openssl command is)."""
    directory.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=flywheel test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "san.ext", cwd=directory)
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_a_bus_connects_over_tls_with_its_credentials(tmp_path: Path, users: dict[str, Permissions]):
    ca, cert, key = _certificates(tmp_path / "tls")
    server, secured = _start(tmp_path, users, tls=Tls(str(cert), str(key)))
    try:
        bus = await secured.connect("gatekeeper", tls_ca_file=str(ca))
        try:
            await bus.ensure_topology()
            assert (await bus.js.publish(topology.DATASET_REJECTED, b"{}", timeout=5)).stream == "DATASETS"
        finally:
            await bus.close()
        # Without the CA the server's certificate is not trusted; without TLS the server refuses.
        with pytest.raises((ConnectionError, OSError)):
            await Bus.connect([secured.url], "gatekeeper", deadline_s=2, auth=secured.auth("gatekeeper"))
    finally:
        server.stop()
