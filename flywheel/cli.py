"""The `flywheel` command.

  flywheel up [--port-base N]                start nats-server (unless NATS_URL) and the services
  flywheel up --tracing-ui phoenix           ... and Arize Phoenix beside them, every service exporting to it
  flywheel up --secure                       ... with NATS users and passwords, each service allowed only its own subjects
  flywheel nats-config [--secrets FILE]      write deploy/nats/nats.conf (users, permissions); generate passwords into FILE
  flywheel nats-config --check               check that deploy/nats/nats.conf is what the declarations give
  flywheel demo [--data-dir D] [--keep]      `make demo`: one dataset through the whole loop, then stop
  flywheel status [--json]                   queue, training progress, champion, last scores
  flywheel status --watch [--interval S]     the same, redrawn live, with a progress bar and ETA
  flywheel submit FILE [--wait S] [--json]   submit a dataset file (chat_sft_v1 JSONL by default)
  flywheel submit FILE --profile P           ... trained under a data profile (emoji_think, regime3)
  flywheel check FILE [--level L] [--json]   validate a file here, as the gatekeeper would; keeps nothing
  flywheel pause|resume|stop [--json]        control the trainer (NATS request/reply)
  flywheel skip --reason TEXT [--json]       give up the dataset training now: never trained, failed with the reason
  flywheel deploy CHECKPOINT [--json]        serve a checkpoint (sha256 or URI) scored on the current suite
  flywheel deploy --rollback [--json]        serve the previous champion again (NATS request/reply)
  flywheel history [--limit N] [--json]      the deployer's last decisions with their reasons, newest first
  flywheel deadletters [--limit N] [--json]  messages no service could handle, with reason and consumer
  flywheel deadletters --replay SEQ [--json] publish one again on its subject (after fixing the cause)
  flywheel lineage [MODEL] [--json]          where a model comes from: datasets, runs, scores, deployments
  flywheel trace TRACE_ID [--html F|--json]  a dataset's journey, span by span, from local trace files
  flywheel asyncapi [--check [--json]]       write (or check) docs/asyncapi.yaml from the event schemas

`--json` prints exactly one JSON document on stdout and nothing else there: the status, the
submission with its verdict and report, the validation report, the trainer's reply
({"ok", "state", "message"}), the deployer's reply (the same plus "checkpoint_uri",
"checkpoint_sha256"), the decisions (a list, newest first), the dead letters (a list, oldest
first; one for `--replay`), the lineage (`libs.common.lineage.Lineage`), the trace
({"trace_id", "spans"}) or, for `asyncapi --check`, {"up_to_date", "path"}.

Every command reads the same settings as the services: FLYWHEEL_DATA_DIR (default ./data),
FLYWHEEL_NATS_URL or NATS_URL. Without a NATS URL, commands other than `up` use the URL that
a running `flywheel up` wrote to <data_dir>/nats.url, and, with `up --secure`, the CLI's own
password from <data_dir>/secrets/nats.env. Elsewhere set FLYWHEEL_NATS_USER=cli and
FLYWHEEL_NATS_PASSWORD (README: Security).

Failures are one line on stderr, never a traceback: a command that cannot talk to NATS (no
server within a few seconds, nobody answering, a timeout, a JetStream error) names what failed
and what to do and exits 1; a configuration error exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec
import nats.errors
import nats.js.errors

from flywheel.supervisor import NATS_URL_FILE, SECRETS_FILE
from libs.common.settings import SERVICES, CommonSettings, SettingsError, load_settings

if TYPE_CHECKING:
    from libs.common.bus import Bus
    from libs.common.nats_auth import NatsAuth

T = TypeVar("T")

# The `flywheel` command's NATS user, whose inbox and permissions are its own.
CLI_USER = "cli"
# The server configuration compose.yaml mounts (flywheel nats-config).
NATS_CONFIG_PATH = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "nats.conf"

# A person is waiting: say within seconds that NATS is unreachable instead of retrying the way a
# starting service does.
CONNECT_DEADLINE_S = 5.0


class NatsUnreachable(Exception):
    """No NATS server answered at `servers` within CONNECT_DEADLINE_S."""

    def __init__(self, servers: list[str]) -> None:
        super().__init__(f"cannot reach NATS at {', '.join(servers)}")
        self.servers = servers


# What talking to NATS can raise: every nats-py error (nats.js.errors.* derive from
# nats.errors.Error), a failed connect, and timeouts (a request's, or a wait for a verdict).
_NATS_FAILURES = (NatsUnreachable, nats.errors.Error, ConnectionError, TimeoutError, PermissionError)


def _settings() -> CommonSettings:
    return load_settings(CommonSettings, "cli")


def _nats_url(settings: CommonSettings) -> list[str]:
    if settings.nats_url:
        return settings.nats_servers
    url_file = Path(settings.data_dir) / NATS_URL_FILE
    if url_file.is_file():
        return [url_file.read_text().strip()]
    raise SettingsError(
        f"no NATS server: set FLYWHEEL_NATS_URL, or start `flywheel up` with FLYWHEEL_DATA_DIR={settings.data_dir}"
    )


async def _with_bus(settings: CommonSettings, fn: Callable[[Bus], Awaitable[T]]) -> T:
    from libs.common.bus import Bus

    servers = _nats_url(settings)
    auth = _nats_auth(settings)
    try:
        # The outer bound is the CLI's promise whatever the bus's retry policy does inside
        # (nats-py may retry a server in its pool for minutes within one connect call).
        bus = await asyncio.wait_for(Bus.connect(servers, CLI_USER, deadline_s=CONNECT_DEADLINE_S, auth=auth),
                                     CONNECT_DEADLINE_S)
    except PermissionError:  # refused credentials: say so, not "unreachable"
        raise
    except (nats.errors.Error, OSError) as exc:  # OSError: ConnectionError, TimeoutError, refused sockets
        raise NatsUnreachable(servers) from exc
    try:
        await bus.ensure_topology()
        return await fn(bus)
    finally:
        await bus.close()


def _nats_auth(settings: CommonSettings) -> NatsAuth:
    """The settings' credentials; without any, and without a NATS URL, the CLI user's password that
    a local `flywheel up --secure` generated."""
    from libs.common.nats_auth import NatsAuth
    from libs.common.nats_permissions import password_variable, read_secrets

    auth = settings.nats_auth
    secrets_file = Path(settings.data_dir) / SECRETS_FILE
    if auth.authenticates or settings.nats_url or not secrets_file.is_file():
        return auth
    password = read_secrets(secrets_file).get(password_variable(CLI_USER), "")
    return NatsAuth(CLI_USER, password, tls_ca_file=auth.tls_ca_file, tls_cert_file=auth.tls_cert_file,
                    tls_key_file=auth.tls_key_file) if password else auth


def _print_json(value: object) -> None:
    """The one shape of every `--json` output: a single JSON document on stdout."""
    print(json.dumps(msgspec.to_builtins(value), indent=2))


def _service_list(text: str) -> tuple[str, ...]:
    """`--services a,b`: known service names, in the supervisor's order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if unknown := sorted(names - set(SERVICES)):
        raise argparse.ArgumentTypeError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    if not names:
        raise argparse.ArgumentTypeError("name at least one service")
    return tuple(name for name in SERVICES if name in names)


def cmd_up(args: argparse.Namespace) -> int:
    from flywheel.supervisor import Supervisor
    from flywheel.tracing_ui import TracingUiError

    try:
        Supervisor(_settings().data_dir, port_base=args.port_base, services=args.services, tracing_ui=args.tracing_ui,
                   tracing_ui_port=args.tracing_ui_port, tracing_ui_python=args.tracing_ui_python,
                   secure=args.secure).run_forever()
    except TracingUiError as exc:
        print(f"flywheel up: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flywheel.demo import run_and_report

    return run_and_report(args.data_dir, keep=args.keep)


def cmd_status(args: argparse.Namespace) -> int:
    from flywheel.status import format_status, read_status

    if args.watch:
        from flywheel.watch import watch

        try:
            asyncio.run(_with_bus(_settings(), lambda bus: watch(bus, interval_s=args.interval, frames=args.frames)))
        except KeyboardInterrupt:
            pass
        return 0

    status = asyncio.run(_with_bus(_settings(), read_status))
    if args.json:
        _print_json(status)
    else:
        print(format_status(status))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from flywheel.submit import describe_report, describe_verdict, submit_file
    from libs.common.artifacts import ArtifactStore
    from libs.common.tracing import setup_tracing

    settings = _settings()
    path = Path(args.file)
    if not path.is_file():
        print(f"flywheel submit: {path} is not a file", file=sys.stderr)
        return 2
    setup_tracing("cli", settings.data_dir)
    store = ArtifactStore(settings.artifacts_dir, transport=settings.artifact_transport)

    async def go(bus):
        from libs.common.object_transport import connect_store

        # Without a shared disk the upload travels through the object store (shared on publish).
        bus.artifacts = await connect_store(store, bus.js, replicas=settings.stream_replicas)
        return await submit_file(bus, store, path, name=args.name, schema=args.schema, profile=args.profile,
                                 priority=args.priority, level=args.level, wait_s=args.wait)

    result = asyncio.run(_with_bus(settings, go))
    if args.json:
        _print_json(result)
    else:
        print(f"submission {result.submission_id}\ntrace      {result.trace_id}\nsha256     {result.sha256}")
        print(describe_verdict(result))
        if result.report is not None:
            print(describe_report(result.report))
    return 1 if result.outcome == "rejected" else 0


def cmd_check(args: argparse.Namespace) -> int:
    """The gatekeeper's verdict on a file, computed here with its settings and data directory; no bus needed."""
    from flywheel.submit import check_progress, describe_check
    from libs.common.artifacts import ArtifactStore
    from services.gatekeeper.intake import Submission
    from services.gatekeeper.pipeline import build_gatekeeper
    from services.gatekeeper.settings import GatekeeperSettings
    from services.gatekeeper.verdict import encode_report

    path = Path(args.file)
    if not path.is_file():
        print(f"flywheel check: {path} is not a file", file=sys.stderr)
        return 2
    settings = load_settings(GatekeeperSettings, "gatekeeper")
    gatekeeper = build_gatekeeper(settings, ArtifactStore(settings.artifacts_dir))
    submission = Submission(submission_id="check", name=path.stem, channel="cli", source=path.name,
                            schema=args.schema, level=args.level)
    with check_progress(path) as bar:
        report = gatekeeper.check_file(submission, path, progress=bar.update)
    print(encode_report(report).decode() if args.json else describe_check(report))
    return 0 if report.status == "accepted" else 1


def cmd_control(args: argparse.Namespace) -> int:
    from libs.common.events import ControlReply, ControlTraining
    from libs.common.topology import CONTROL_TRAINER

    async def go(bus):
        request = ControlTraining(action=args.command, reason=getattr(args, "reason", "") or "")
        return await bus.request(f"{CONTROL_TRAINER}.{args.command}", request, ControlReply, timeout=10)

    reply = asyncio.run(_with_bus(_settings(), go))
    if args.json:
        _print_json(reply)
    else:
        print(f"trainer: {reply.state}" + (f" ({reply.message})" if reply.message else ""))
    return 0 if reply.ok else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from libs.common.events import DeployCheckpoint, DeployReply, RollBackDeployment
    from libs.common.topology import CONTROL_DEPLOYER_DEPLOY, CONTROL_DEPLOYER_ROLLBACK

    if bool(args.checkpoint) == args.rollback:
        print("flywheel deploy: name a CHECKPOINT (sha256 or URI) or give --rollback, not both",
              file=sys.stderr)
        return 2
    if args.rollback:
        args.subject, request = CONTROL_DEPLOYER_ROLLBACK, RollBackDeployment()
    else:
        args.subject, request = CONTROL_DEPLOYER_DEPLOY, DeployCheckpoint(checkpoint=args.checkpoint)

    async def go(bus):
        # A deploy reads the eval.scored stream to find the checkpoint's score: allow it time.
        return await bus.request(args.subject, request, DeployReply, timeout=30)

    reply = asyncio.run(_with_bus(_settings(), go))
    if args.json:
        _print_json(reply)
    else:
        print(f"deployer: {reply.state}" + (f" ({reply.message})" if reply.message else ""))
        if reply.ok and reply.checkpoint_uri:
            # Staged: final once an inference replica reports serving it (`flywheel history`).
            print(f"{'staging' if reply.state == 'staged' else 'serving'}   {reply.checkpoint_uri}")
    return 0 if reply.ok else 1


def cmd_history(args: argparse.Namespace) -> int:
    from libs.common.records import DEPLOY_DECISIONS

    async def go(bus):
        kept, _ = await (await bus.record(DEPLOY_DECISIONS)).read()
        return list(reversed(kept.decisions))[: args.limit] if kept else []

    decisions = asyncio.run(_with_bus(_settings(), go))
    if args.json:
        _print_json(decisions)
    elif not decisions:
        print("no deployment decisions yet")
    else:
        for d in decisions:
            who = "" if d.requested_by == "eval.scored" else f"  (requested by {d.requested_by})"
            print(f"{d.time:%Y-%m-%d %H:%M:%S}  {d.outcome:<11} {d.checkpoint_uri or d.checkpoint_sha256}{who}")
            print(f"    {d.reason}")
    return 0


def cmd_deadletters(args: argparse.Namespace) -> int:
    from flywheel.deadletters import NoSuchDeadLetter, format_dead_letters, list_dead_letters, replay

    if args.replay is not None:
        try:
            letter = asyncio.run(_with_bus(_settings(), lambda bus: replay(bus, args.replay)))
        except NoSuchDeadLetter as exc:
            print(str(exc), file=sys.stderr)
            return 1
        if args.json:
            _print_json(letter)
        else:
            print(f"replayed #{letter.seq} on {letter.subject} (it had failed: {letter.reason})")
        return 0
    letters = asyncio.run(_with_bus(_settings(), lambda bus: list_dead_letters(bus, args.limit)))
    if args.json:
        _print_json(letters)
    else:
        print(format_dead_letters(letters))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from flywheel.lineage import format_lineage
    from libs.common.lineage import UnknownModel, read_lineage

    try:
        lineage = asyncio.run(_with_bus(_settings(), lambda bus: read_lineage(bus, args.model)))
    except UnknownModel as exc:
        print(f"flywheel lineage: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(lineage)
    else:
        print(format_lineage(lineage))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from libs.common.tracing import format_trace, read_trace

    spans = read_trace(_settings().data_dir, args.trace_id)
    if args.html:
        from libs.common.trace_page import render_trace_page

        Path(args.html).write_text(render_trace_page(args.trace_id, spans))
        print(f"wrote {args.html} ({len(spans)} spans)")
    elif args.json:
        _print_json({"trace_id": args.trace_id, "spans": spans})
    else:
        print(format_trace(spans))
    return 0 if spans else 1


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from flywheel.contract import render
    from libs.common.asyncapi import ASYNCAPI_PATH

    if args.json and not args.check:
        print("flywheel asyncapi: --json goes with --check (writing the document has nothing to report)",
              file=sys.stderr)
        return 2
    text = render()
    if args.check:
        up_to_date = ASYNCAPI_PATH.exists() and ASYNCAPI_PATH.read_text() == text
        if args.json:
            _print_json({"up_to_date": up_to_date, "path": str(ASYNCAPI_PATH)})
        elif up_to_date:
            print(f"{ASYNCAPI_PATH} is up to date")
        else:
            print(f"{ASYNCAPI_PATH} is out of date: run `flywheel asyncapi`", file=sys.stderr)
        return 0 if up_to_date else 1
    ASYNCAPI_PATH.parent.mkdir(parents=True, exist_ok=True)
    ASYNCAPI_PATH.write_text(text)
    print(f"wrote {ASYNCAPI_PATH}")
    return 0


def cmd_nats_config(args: argparse.Namespace) -> int:
    """The committed NATS server configuration from the declarations; the passwords only into a
    0600 file, never on the terminal."""
    from flywheel.supervisor import nats_users
    from libs.common.nats_permissions import ADMIN, Tls, render_config, write_secrets

    tls = Tls(args.tls_cert, args.tls_key, args.tls_ca or "", args.tls_verify) if args.tls_cert else None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SettingsError("--tls-cert and --tls-key go together")
    users = nats_users()
    text = render_config(users, port=args.port, store_dir=args.store_dir,
                         monitor_port=args.monitor_port or None, tls=tls)
    out = Path(args.out)
    if args.check:
        up_to_date = out.is_file() and out.read_text() == text
        print(f"{out} is up to date" if up_to_date else f"{out} is out of date: run `flywheel nats-config`",
              file=sys.stdout if up_to_date else sys.stderr)
        return 0 if up_to_date else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(users) + 1} users)")
    if args.secrets:
        write_secrets(Path(args.secrets), [*users, ADMIN])
        print(f"passwords in {args.secrets} (mode 0600; existing ones kept): keep it secret, never commit it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from libs.common.topology import CONTROL_DEPLOYER_DEPLOY, CONTROL_TRAINER

    parser = argparse.ArgumentParser(prog="flywheel", description="A self-improving loop for a small language model.")
    # Who should answer a command over NATS, and on which subject: named in its one-line error
    # when nobody does.
    parser.set_defaults(peer="NATS server", subject=None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack on this machine")
    up.add_argument("--port-base", type=int, default=None, help="HTTP ports base..base+5 instead of 8100-8105")
    up.add_argument("--services", type=_service_list, default=SERVICES, metavar="NAME,...",
                    help="only these services on this host, e.g. gatekeeper,trainer,curriculum on a training box and "
                         "evaluator,deployer,inference,dashboard on a serving box (default: all)")
    up.add_argument("--tracing-ui", choices=["phoenix"], default=None,
                    help="also run Arize Phoenix (make phoenix installs it); every service exports to it")
    up.add_argument("--tracing-ui-port", type=int, default=6006, help="Phoenix's UI and OTLP/HTTP port (default 6006)")
    up.add_argument("--tracing-ui-python", default=None, metavar="PYTHON",
                    help="the python of an environment where Phoenix is installed "
                         "(default: make phoenix's .venv-phoenix when there is one, else this one)")
    up.add_argument("--secure", action="store_true",
                    help="run the embedded nats-server with a user and password per service, each allowed only "
                         "its own subjects (passwords in <data_dir>/secrets/nats.env)")
    up.set_defaults(fn=cmd_up)
    nats_config = sub.add_parser("nats-config", help="write the NATS server configuration: users and permissions "
                                 "from the services' declarations")
    nats_config.add_argument("--out", default=str(NATS_CONFIG_PATH), help=f"default {NATS_CONFIG_PATH}")
    nats_config.add_argument("--secrets", metavar="FILE", help="also give every user a password in this env file "
                             "(mode 0600; existing ones are kept), e.g. deploy/nats/secrets.env")
    nats_config.add_argument("--check", action="store_true", help="only check that --out is up to date")
    nats_config.add_argument("--port", type=int, default=4222)
    nats_config.add_argument("--store-dir", default="/data/jetstream", help="JetStream's store (default /data/jetstream)")
    nats_config.add_argument("--monitor-port", type=int, default=8222, help="HTTP monitoring (0: none)")
    nats_config.add_argument("--tls-cert", help="the server's certificate: clients must then connect with TLS")
    nats_config.add_argument("--tls-key", help="the server certificate's key")
    nats_config.add_argument("--tls-ca", help="the CA of the clients' certificates (with --tls-verify)")
    nats_config.add_argument("--tls-verify", action="store_true", help="require a client certificate from --tls-ca")
    nats_config.set_defaults(fn=cmd_nats_config)
    demo = sub.add_parser("demo", help="one dataset through the whole loop on a fresh stack, then stop (make demo)")
    demo.add_argument("--data-dir", type=Path, default=None, help="where the demo's stack keeps its data "
                      "(default: data/demo in the repository; emptied first)")
    demo.add_argument("--keep", action="store_true", help="keep the previous demo's data directory")
    demo.set_defaults(fn=cmd_demo)
    status = sub.add_parser("status", help="the loop's state")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", action="store_true", help="redraw it live, with a progress bar for the running dataset")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between frames of --watch (default 1)")
    status.add_argument("--frames", type=int, default=0, help="stop --watch after this many frames (default: never)")
    status.set_defaults(fn=cmd_status)
    submit = sub.add_parser("submit", help="submit a dataset file")
    submit.add_argument("file")
    submit.add_argument("--name")
    submit.add_argument("--schema", default="chat_sft_v1")
    submit.add_argument("--profile", default="none",
                        help="the data profile the trainer applies: none (default), emoji_think or regime3 "
                             "(the gatekeeper rejects an unknown name)")
    submit.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    submit.add_argument("--level", choices=["quick", "standard", "deep"], default="standard")
    submit.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                        help="wait this long for the gatekeeper's verdict (0: don't wait)")
    submit.add_argument("--json", action="store_true", help="print the submission, verdict and report as JSON")
    submit.set_defaults(fn=cmd_submit, peer="gatekeeper")
    check = sub.add_parser("check", help="validate a dataset file here, as the gatekeeper would (a dry run)")
    check.add_argument("file")
    check.add_argument("--schema", default="chat_sft_v1")
    check.add_argument("--level", choices=["quick", "standard", "deep"], default="standard")
    check.add_argument("--json", action="store_true", help="print the whole report as JSON")
    check.set_defaults(fn=cmd_check)
    for action in ("pause", "resume", "stop", "skip"):
        control = sub.add_parser(action, help="give up the dataset the trainer is training (never trained; "
                                 "announced as failed with the reason)" if action == "skip" else f"{action} the trainer")
        if action == "skip":
            control.add_argument("--reason", required=True, help="why: said on the dataset's training.failed")
        control.add_argument("--json", action="store_true", help="print the trainer's reply as JSON")
        control.set_defaults(fn=cmd_control, peer="trainer", subject=f"{CONTROL_TRAINER}.{action}")
    deploy = sub.add_parser("deploy", help="serve a scored checkpoint, or roll back to the previous champion")
    deploy.add_argument("checkpoint", nargs="?", help="the checkpoint's sha256 or artifact URI "
                        "(it must have been scored on the current suite)")
    deploy.add_argument("--rollback", action="store_true", help="serve the previous champion again; the current "
                        "champion's run is never promoted again")
    deploy.add_argument("--json", action="store_true", help="print the deployer's reply as JSON")
    deploy.set_defaults(fn=cmd_deploy, peer="deployer", subject=CONTROL_DEPLOYER_DEPLOY)
    history = sub.add_parser("history", help="the deployer's last decisions with their reasons")
    history.add_argument("--limit", type=int, default=20, help="show at most this many (default 20)")
    history.add_argument("--json", action="store_true", help="print the decisions as JSON")
    history.set_defaults(fn=cmd_history)
    dead = sub.add_parser("deadletters", help="messages no service could handle, with the reason; replay one")
    dead.add_argument("--replay", type=int, metavar="SEQ", help="publish dead letter SEQ again on its subject")
    dead.add_argument("--limit", type=int, default=100, help="how many of the most recent to list (default 100)")
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(fn=cmd_deadletters)
    lineage = sub.add_parser("lineage", help="where a model comes from, from the event history: datasets, runs, "
                             "scores, deployments, back to the base")
    lineage.add_argument("model", nargs="?", help="a checkpoint sha256 (or its first 8+ hex digits), a checkpoint "
                         "URI, RUN_ID or RUN_ID@STEP, or 'base' (default: the served model)")
    lineage.add_argument("--json", action="store_true", help="print the lineage as JSON")
    lineage.set_defaults(fn=cmd_lineage)
    trace = sub.add_parser("trace", help="show one trace from the local trace files")
    trace.add_argument("trace_id")
    shown = trace.add_mutually_exclusive_group()
    shown.add_argument("--html", metavar="FILE", help="write an HTML waterfall of the trace to FILE")
    shown.add_argument("--json", action="store_true", help="print the spans as JSON")
    trace.set_defaults(fn=cmd_trace)
    asyncapi = sub.add_parser("asyncapi", help="generate docs/asyncapi.yaml")
    asyncapi.add_argument("--check", action="store_true", help="only check that the document is up to date")
    asyncapi.add_argument("--json", action="store_true", help="with --check: print {up_to_date, path} as JSON")
    asyncapi.set_defaults(fn=cmd_asyncapi)
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _explain_nats_failure(exc: BaseException, peer: str, subject: str | None) -> str:
    """One line: what failed while talking to NATS, and what to do about it."""
    up = "is `flywheel up` running?"
    on = f" on {subject}" if subject else ""
    match exc:
        case NatsUnreachable():
            return (f"cannot reach NATS at {', '.join(exc.servers)} within {CONNECT_DEADLINE_S:g} s "
                    f"({up} if NATS runs elsewhere, set FLYWHEEL_NATS_URL)")
        case nats.errors.NoRespondersError():
            return f"no {peer} is answering{on} ({up})"
        case nats.js.errors.ServiceUnavailableError():  # before APIError: it is one
            return "JetStream is not available on the NATS server (is it started with JetStream enabled, -js?)"
        case nats.js.errors.APIError():
            return f"JetStream refused a request: {_one_line(exc.description or repr(exc))} (see the nats-server log)"
        case nats.errors.ConnectionClosedError():
            return f"the connection to NATS closed before the command finished ({up})"
        case TimeoutError() if isinstance(exc, nats.errors.Error) or not str(exc):
            return f"the {peer} did not answer{on} in time ({up})"
        case _:
            # Errors that explain themselves (the demo's deadlines, a connect that gave up).
            return _one_line(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from libs.common.log import setup_logging

    # Errors only: a command reports its own failure in one line, which the bus's warnings
    # (a retried connect, a lost connection) would otherwise bury.
    setup_logging("cli", "error")
    # The one place where failures become messages, so no command prints a traceback for them.
    try:
        return args.fn(args)
    except SettingsError as exc:
        print(f"flywheel {args.command}: {exc}", file=sys.stderr)
        return 2
    except _NATS_FAILURES as exc:
        print(f"flywheel {args.command}: {_explain_nats_failure(exc, args.peer, args.subject)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
