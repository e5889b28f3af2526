"""The `flywheel` command.

  flywheel up [--port-base N]         start nats-server (unless NATS_URL) and the six services
  flywheel status [--json]            queue, training progress, champion, last scores
  flywheel submit FILE [--wait]       submit a dataset file (chat_sft_v1 JSONL by default)
  flywheel check FILE [--level L]     validate a file here, as the gatekeeper would; keeps nothing
  flywheel pause|resume|stop          control the trainer (NATS request/reply)
  flywheel trace TRACE_ID [--html F]  a dataset's journey, span by span, from local trace files
  flywheel asyncapi [--check]         write (or check) docs/asyncapi.yaml from the event schemas

Every command reads the same settings as the services: FLYWHEEL_DATA_DIR (default ./data),
FLYWHEEL_NATS_URL or NATS_URL. Without a NATS URL, commands other than `up` use the URL that
a running `flywheel up` wrote to <data_dir>/nats.url.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from flywheel.supervisor import NATS_URL_FILE
from libs.common.settings import CommonSettings, SettingsError, load_settings


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


async def _with_bus(settings: CommonSettings, fn):
    from libs.common.bus import Bus

    bus = await Bus.connect(_nats_url(settings), "cli", wait_s=5)
    try:
        await bus.ensure_topology()
        return await fn(bus)
    finally:
        await bus.close()


def cmd_up(args: argparse.Namespace) -> int:
    from flywheel.supervisor import Supervisor

    Supervisor(_settings().data_dir, port_base=args.port_base).run_forever()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flywheel.status import format_status, read_status

    status = asyncio.run(_with_bus(_settings(), read_status))
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from libs.common.artifacts import ArtifactStore
    from libs.common.tracing import setup_tracing
    from flywheel.submit import describe_report, describe_verdict, submit_file

    settings = _settings()
    path = Path(args.file)
    if not path.is_file():
        print(f"flywheel submit: {path} is not a file", file=sys.stderr)
        return 2
    setup_tracing("cli", settings.data_dir)
    store = ArtifactStore(Path(settings.data_dir) / "artifacts")

    async def go(bus):
        return await submit_file(bus, store, path, name=args.name, schema=args.schema, priority=args.priority,
                                 level=args.level, wait_s=args.wait)

    result = asyncio.run(_with_bus(settings, go))
    print(f"submission {result.submission_id}\ntrace      {result.trace_id}\nsha256     {result.sha256}")
    print(describe_verdict(result))
    if result.report is not None:
        print(describe_report(result.report))
    return 1 if result.outcome == "rejected" else 0


def cmd_check(args: argparse.Namespace) -> int:
    """The gatekeeper's verdict on a file, computed here with its settings and data directory; no bus needed."""
    from flywheel.submit import check_progress, describe_check
    from services.gatekeeper.assembly import build_gatekeeper
    from services.gatekeeper.reports import encode_report
    from services.gatekeeper.settings import GatekeeperSettings
    from services.gatekeeper.submissions import Submission

    path = Path(args.file)
    if not path.is_file():
        print(f"flywheel check: {path} is not a file", file=sys.stderr)
        return 2
    gatekeeper = build_gatekeeper(load_settings(GatekeeperSettings, "gatekeeper"))
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
        return await bus.request(f"{CONTROL_TRAINER}.{args.command}", ControlTraining(action=args.command),
                                 ControlReply, timeout=10)

    reply = asyncio.run(_with_bus(_settings(), go))
    print(f"trainer: {reply.state}" + (f" ({reply.message})" if reply.message else ""))
    return 0 if reply.ok else 1


def cmd_trace(args: argparse.Namespace) -> int:
    from libs.common.tracing import format_trace, read_trace

    spans = read_trace(_settings().data_dir, args.trace_id)
    if args.html:
        from flywheel.trace_page import render_trace_page

        Path(args.html).write_text(render_trace_page(args.trace_id, spans))
        print(f"wrote {args.html} ({len(spans)} spans)")
    else:
        print(format_trace(spans))
    return 0 if spans else 1


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from libs.common.asyncapi import ASYNCAPI_PATH, render_asyncapi
    from services.gatekeeper.schemas import json_schemas

    text = render_asyncapi(json_schemas())
    if args.check:
        current = ASYNCAPI_PATH.read_text() if ASYNCAPI_PATH.exists() else ""
        if current != text:
            print(f"{ASYNCAPI_PATH} is out of date: run `flywheel asyncapi`", file=sys.stderr)
            return 1
        print(f"{ASYNCAPI_PATH} is up to date")
        return 0
    ASYNCAPI_PATH.parent.mkdir(parents=True, exist_ok=True)
    ASYNCAPI_PATH.write_text(text)
    print(f"wrote {ASYNCAPI_PATH}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description="A self-improving loop for a small language model.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack on this machine")
    up.add_argument("--port-base", type=int, default=None, help="HTTP ports base..base+5 instead of 8100-8105")
    up.set_defaults(fn=cmd_up)
    status = sub.add_parser("status", help="the loop's state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)
    submit = sub.add_parser("submit", help="submit a dataset file")
    submit.add_argument("file")
    submit.add_argument("--name")
    submit.add_argument("--schema", default="chat_sft_v1")
    submit.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    submit.add_argument("--level", choices=["quick", "standard", "deep"], default="standard")
    submit.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                        help="wait this long for the gatekeeper's verdict (0: don't wait)")
    submit.set_defaults(fn=cmd_submit)
    check = sub.add_parser("check", help="validate a dataset file here, as the gatekeeper would (a dry run)")
    check.add_argument("file")
    check.add_argument("--schema", default="chat_sft_v1")
    check.add_argument("--level", choices=["quick", "standard", "deep"], default="standard")
    check.add_argument("--json", action="store_true", help="print the whole report as JSON")
    check.set_defaults(fn=cmd_check)
    for action in ("pause", "resume", "stop"):
        control = sub.add_parser(action, help=f"{action} the trainer")
        control.set_defaults(fn=cmd_control)
    trace = sub.add_parser("trace", help="show one trace from the local trace files")
    trace.add_argument("trace_id")
    trace.add_argument("--html", metavar="FILE", help="write an HTML waterfall of the trace to FILE")
    trace.set_defaults(fn=cmd_trace)
    asyncapi = sub.add_parser("asyncapi", help="generate docs/asyncapi.yaml")
    asyncapi.add_argument("--check", action="store_true")
    asyncapi.set_defaults(fn=cmd_asyncapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from libs.common.log import setup_logging

    setup_logging("cli", "warning")
    try:
        return args.fn(args)
    except SettingsError as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
