"""Who may do what on NATS: each Flywheel user's publish and subscribe allow lists, and the
nats-server configuration that enforces them.

A service's rights follow from its declaration (`libs.common.service.Service`) and the topology
(`libs.common.topology`), so they cannot drift from what it does:
- its publications (a `{parameter}` stands for one token, `*`);
- each durable consumer it drains: fetching (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`),
  settling (`$JS.ACK.<stream>.<durable>.>`: ack, nak, in-progress, term), dead letters of the
  subject it filters (`deadletter.<subject>`) and its failure counts (KV `failures`, keys
  `<durable>.*`: the bus counts failures per consumer);
- each every-replica subscription: an ephemeral ordered consumer on the stream and its flow
  control replies;
- its replies: the subject, and answering only the inbox a request named (`allow_responses`);
- its own inbox, `_INBOX.<user>.>` (`inbox_prefix`): replies to its requests, JetStream API
  answers and publish acks, pushed consumer messages. No user can read another's inbox;
- artifacts in the object store (hosts without a shared disk): written by whoever publishes an
  event naming an artifact (the bus shares it first), read by whoever receives one;
- the topology. `Bus.ensure_topology` runs in every process so that any service may start first:
  every user may look up and create (and bring up to date) Flywheel's streams, KV buckets,
  object store and durable consumers, by their exact names. No user but `admin` may delete or
  purge a stream or a consumer, or touch anything outside Flywheel's names.
What the declarations do not say, the KV records a service keeps or reads and the streams it
reads back, is `STATE` below, in the topology's own names.

`flywheel nats-config` writes the server configuration (`render_config`); `flywheel up --secure`
runs its embedded server with it. Passwords never appear in the configuration: each is read from
the environment variable `password_variable(user)`, which `write_secrets` generates.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from libs.common import topology
from libs.common.service import Client, Service

ACCOUNT = "FLYWHEEL"
# The operator's user: no restrictions (repairs, the `nats` CLI).
ADMIN = "admin"
# The `flywheel` command's user (settings.CLI).
CLI = "cli"
# The object store bucket artifacts travel through between hosts (libs.common.object_transport).
ARTIFACTS_BUCKET = "artifacts"
ARTIFACTS_STREAM = f"OBJ_{ARTIFACTS_BUCKET}"
JS_API = "$JS.API"


def inbox_prefix(user: str) -> str:
    """Where `user`'s replies arrive: its own, so no other user may subscribe to them."""
    return f"_INBOX.{user}"


def password_variable(user: str) -> str:
    """The environment variable the server reads `user`'s password from."""
    return f"NATS_PASSWORD_{re.sub(r'[^A-Za-z0-9]', '_', user).upper()}"


def wildcard(subject: str) -> str:
    """`dataset.accepted.{priority}` -> `dataset.accepted.*`."""
    return ".".join("*" if t.startswith("{") and t.endswith("}") else t for t in subject.split("."))


# ---------------------------------------------------------------------------- what declarations do not say


@dataclass(frozen=True)
class State:
    """What a user reads or writes besides its subscriptions and publications."""

    # KV buckets it writes (compare-and-set reads them too) and only reads.
    writes: tuple[topology.BucketSpec, ...] = ()
    reads: tuple[topology.BucketSpec, ...] = ()
    # Streams it reads back: a message by sequence or subject, a replay with an ordered consumer.
    streams: tuple[str, ...] = ()
    # The object store: "read" or "write" (which includes read), beyond what its events imply.
    artifacts: str = ""
    # Anything else, with the reason in a comment where it is set.
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()


_ALL_STREAMS = tuple(s.name for s in topology.STREAMS)

STATE: dict[str, State] = {
    "gatekeeper": State(),
    # still_queued: is the dataset being trained still in the stream? Pruning keeps what the
    # champion's history, a staged deployment and the evaluator's scores name.
    "trainer": State(writes=(topology.TRAINER_BUCKET, topology.TRAINER_MODELS_BUCKET), reads=(topology.CHAMPION_BUCKET,),
                     streams=("DATASETS", "EVALS")),
    "evaluator": State(reads=(topology.CHAMPION_BUCKET,)),
    # The newest eval.scored on start, and the champion's history for a rollback.
    "deployer": State(writes=(topology.CHAMPION_BUCKET,), streams=("EVALS",)),
    # Loads the checkpoint a deployment names, from the object store when hosts share no disk.
    "inference": State(reads=(topology.CHAMPION_BUCKET,), artifacts="read"),
    # Levels rise on the champion's scores: it replays the champion record's history.
    "curriculum": State(writes=(topology.CURRICULUM_BUCKET,), reads=(topology.CHAMPION_BUCKET,)),
    # The read model: every stream replayed and followed, every bucket watched.
    "dashboard": State(reads=topology.BUCKETS, streams=_ALL_STREAMS),
    CLI: State(
        reads=topology.BUCKETS, streams=_ALL_STREAMS, artifacts="write",
        # `flywheel deadletters --replay`: a dead letter goes back on the subject it came from
        # (only consumed subjects are dead-lettered) and leaves the dead-letter stream.
        publish=(*sorted({c.filter_subject for c in topology.CONSUMERS}),
                 f"{JS_API}.STREAM.MSG.DELETE.{topology.stream_for(topology.DEAD_LETTER_PREFIX)}"),
        # `flywheel submit --wait` listens for the gatekeeper's verdict.
        subscribe=(wildcard(topology.DATASET_ACCEPTED), topology.DATASET_REJECTED),
    ),
}


# ---------------------------------------------------------------------------- permissions


@dataclass(frozen=True)
class Permissions:
    """One user's allow lists (everything else is denied)."""

    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # May answer requests it received, on their reply subject only.
    allow_responses: bool = False

    def may_publish(self, subject: str) -> bool:
        return any(covers(allowed, subject) for allowed in self.publish)

    def may_subscribe(self, subject: str) -> bool:
        return any(covers(allowed, subject) for allowed in self.subscribe)


def covers(allowed: str, subject: str) -> bool:
    """Whether the allow-list entry `allowed` admits `subject` (which may itself have wildcards),
    as nats-server decides: `*` is one token, a final `>` one or more."""
    a, s = allowed.split("."), subject.split(".")
    for i, token in enumerate(a):
        if token == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">" or (token != "*" and (s[i] == "*" or token != s[i])):
            return False
    return len(a) == len(s)


@dataclass
class _Lists:
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)

    def pub(self, *subjects: str) -> None:
        self.publish.extend(s for s in subjects if s not in self.publish)

    def sub(self, *subjects: str) -> None:
        self.subscribe.extend(s for s in subjects if s not in self.subscribe)


def _topology(lists: _Lists) -> None:
    """`ensure_topology` (and the object store's `open`): look up, create, bring up to date."""
    streams = [*_ALL_STREAMS, *(f"KV_{b.name}" for b in topology.BUCKETS), ARTIFACTS_STREAM]
    for stream in streams:
        lists.pub(*(f"{JS_API}.STREAM.{action}.{stream}" for action in ("INFO", "CREATE", "UPDATE")))
    for consumer in topology.CONSUMERS:
        # nats-py creates a durable by this legacy subject; CONSUMER.INFO when it exists already
        # (and for the queue's state).
        lists.pub(f"{JS_API}.CONSUMER.DURABLE.CREATE.{consumer.stream}.{consumer.durable}",
                  f"{JS_API}.CONSUMER.INFO.{consumer.stream}.{consumer.durable}")


def _read_stream(lists: _Lists, stream: str) -> None:
    """Get a message (by sequence, or the last on a subject) and replay with an ordered consumer,
    whose flow control the client answers (a KV watch also asks for its consumer's info)."""
    lists.pub(f"{JS_API}.STREAM.MSG.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}.>",
              f"{JS_API}.CONSUMER.CREATE.{stream}", f"{JS_API}.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>")


def _consume(lists: _Lists, consumer: topology.ConsumerSpec) -> None:
    lists.pub(f"{JS_API}.CONSUMER.MSG.NEXT.{consumer.stream}.{consumer.durable}",
              # Acks carry the stream and consumer first (v1) or after domain and account (v2).
              f"$JS.ACK.{consumer.stream}.{consumer.durable}.>", f"$JS.ACK.*.*.{consumer.stream}.{consumer.durable}.>",
              topology.dead_letter(consumer.filter_subject),
              f"$KV.{topology.FAILURES_BUCKET.name}.{consumer.durable}.>")
    _read_stream(lists, f"KV_{topology.FAILURES_BUCKET.name}")


def _artifacts(lists: _Lists, access: str) -> None:
    if not access:
        return
    _read_stream(lists, ARTIFACTS_STREAM)
    # nats-py's own ObjectStore.get looks its stream up by subject (stream names only).
    lists.pub(f"{JS_API}.STREAM.NAMES")
    if access == "write":
        lists.pub(f"$O.{ARTIFACTS_BUCKET}.C.>", f"$O.{ARTIFACTS_BUCKET}.M.>",
                  # Replacing or deleting an object purges its old chunks.
                  f"{JS_API}.STREAM.PURGE.{ARTIFACTS_STREAM}")


def _carries_artifacts(event_type: type) -> bool:
    return bool(getattr(event_type, "artifact_fields", ()))


def _state(lists: _Lists, state: State) -> None:
    for bucket in (*state.writes, *state.reads):
        _read_stream(lists, f"KV_{bucket.name}")
    lists.pub(*(f"$KV.{bucket.name}.>" for bucket in state.writes))
    for stream in state.streams:
        _read_stream(lists, stream)
    lists.pub(*state.publish)
    lists.sub(*state.subscribe)


def _most(*levels: str) -> str:
    return "write" if "write" in levels else "read" if "read" in levels else ""


def service_permissions(service: Service, state: State | None = None) -> Permissions:
    """What `service` may publish and subscribe, from its declaration (and its `STATE`)."""
    state = STATE.get(service.name, State()) if state is None else state
    lists = _Lists()
    lists.sub(f"{inbox_prefix(service.name)}.>")
    _topology(lists)
    lists.pub(*(wildcard(p.subject) for p in service.publications))
    for subscription in service.subscriptions:
        if subscription.every_replica:
            _read_stream(lists, topology.stream_for(subscription.subject))
        for consumer in subscription.consumers:
            _consume(lists, consumer)
    for reply in service.replies:
        lists.sub(wildcard(reply.subject))
    _artifacts(lists, _most(
        state.artifacts,
        *("write" for p in service.publications if _carries_artifacts(p.event_type)),
        *("read" for s in service.subscriptions if _carries_artifacts(s.event_type)),
    ))
    _state(lists, state)
    return Permissions(service.name, tuple(lists.publish), tuple(lists.subscribe), allow_responses=bool(service.replies))


def client_permissions(user: str, client: Client, state: State | None = None) -> Permissions:
    """What a client (the CLI) may publish and request, from its declaration (and its `STATE`)."""
    state = STATE.get(user, State()) if state is None else state
    lists = _Lists()
    lists.sub(f"{inbox_prefix(user)}.>")
    _topology(lists)
    lists.pub(*(wildcard(p.subject) for p in client.publications))
    lists.pub(*(wildcard(r.subject) for r in client.requests))
    _artifacts(lists, _most(state.artifacts, *("write" for p in client.publications if _carries_artifacts(p.event_type))))
    _state(lists, state)
    return Permissions(user, tuple(lists.publish), tuple(lists.subscribe))


def flywheel_permissions(services: Iterable[Service], clients: Mapping[str, Client]) -> dict[str, Permissions]:
    """Every restricted user: the services by their names, the clients by the user names given."""
    users = {s.name: service_permissions(s) for s in services}
    users.update({user: client_permissions(user, client) for user, client in clients.items()})
    return users


# ---------------------------------------------------------------------------- server configuration


@dataclass(frozen=True)
class Tls:
    """The server's certificate and key, and the CA its clients' certificates must come from (mTLS)
    when `verify`."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    verify: bool = False


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: Iterable[str], indent: str) -> str:
    return "[\n" + "".join(f"{indent}  {_quoted(v)}\n" for v in values) + f"{indent}]"


def render_config(users: Mapping[str, Permissions], *, port: int = 4222, store_dir: str | None = "/data/jetstream",
                  monitor_port: int | None = 8222, tls: Tls | None = None, admin: bool = True) -> str:
    """The nats-server configuration: one account with JetStream, a user per entry of `users`
    (plus `admin`, unrestricted) whose password is read from `password_variable(user)`.
    `store_dir` None: JetStream's store is given on the command line (`NatsServer` does)."""
    lines = [
        "# Generated by `flywheel nats-config` from the services' declarations",
        "# (libs/common/nats_permissions.py): regenerate it, do not edit it.",
        "# Passwords are not here: nats-server reads each from the environment variable named below",
        "# (`flywheel nats-config --secrets FILE` generates them); one that is unset stops the server.",
        f"port: {port}",
    ]
    if monitor_port is not None:
        lines.append(f"monitor_port: {monitor_port}")
    lines += ["jetstream {", f"  store_dir: {_quoted(store_dir)}", "}"] if store_dir else ["jetstream: enabled"]
    if tls:
        lines += ["tls {", f"  cert_file: {_quoted(tls.cert_file)}", f"  key_file: {_quoted(tls.key_file)}"]
        if tls.ca_file:
            lines.append(f"  ca_file: {_quoted(tls.ca_file)}")
        if tls.verify:
            lines.append("  verify: true")
        lines.append("}")
    lines += ["accounts {", f"  {ACCOUNT} {{", "    jetstream: enabled", "    users: ["]
    entries = [*users.values()]
    for perms in entries:
        indent = " " * 12
        lines += [
            "      {",
            f"        user: {_quoted(perms.user)}",
            f"        password: ${password_variable(perms.user)}",
            "        permissions: {",
            f"          publish: {{ allow: {_list(perms.publish, indent)} }}",
            f"          subscribe: {{ allow: {_list(perms.subscribe, indent)} }}",
        ]
        if perms.allow_responses:
            lines.append("          allow_responses: true")
        lines += ["        }", "      }"]
    if admin:
        lines += ["      {", f"        user: {_quoted(ADMIN)}", f"        password: ${password_variable(ADMIN)}", "      }"]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- secrets


def read_secrets(path: Path) -> dict[str, str]:
    """A secrets file's `NAME=value` lines (comments and blank lines skipped)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value.strip()
    return values


def write_secrets(path: Path, users: Iterable[str]) -> dict[str, str]:
    """Give every user in `users` a random password in the env file `path` (mode 0600), keeping
    the ones it holds already; returns all of them by variable name. Nothing is printed."""
    path = Path(path)
    current = read_secrets(path) if path.exists() else {}
    for user in users:
        # nats-server parses the variable's value as a configuration value: one starting with a
        # digit or a dash would be read as a number. A letter, then hex, is always a string.
        current.setdefault(password_variable(user), "p" + secrets.token_hex(24))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# NATS passwords for Flywheel's users (flywheel nats-config). Secret: never commit or log it.\n"
    text += "".join(f"{name}={value}\n" for name, value in sorted(current.items()))
    # Created with 0600 from the start: the passwords are never readable by others, not even briefly.
    fd = os.open(path.with_name(path.name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path.with_name(path.name + ".tmp"), 0o600)
    os.replace(path.with_name(path.name + ".tmp"), path)
    return current
