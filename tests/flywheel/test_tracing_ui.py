"""Traces to a real receiver: every service process exports OTLP/HTTP, and `flywheel up --tracing-ui
phoenix` runs Phoenix beside the stack (here a stand-in with Phoenix's command line and endpoints:
the locked test install has no Phoenix), points every child at it, and stops it with the stack."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import httpx
import nats
import pytest

from flywheel import tracing_ui
from flywheel.cli import main
from flywheel.demo import free_port_base
from flywheel.supervisor import Supervisor, child_environment, service_ports
from flywheel.tracing_ui import INSTALL_HINT, PHOENIX_VENV, Phoenix, TracingUiError, default_python, make_tracing_ui
from libs.common import topology
from libs.common.settings import SERVICES, load_all
from tests.conftest import wait_for_sync
from tests.flywheel.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]

# `python -m phoenix.server.main serve --host H --port P --grpc-port G`, as Phoenix is started:
# records how, then receives OTLP/HTTP on P (tests/flywheel/otlp_receiver.py) until SIGTERM.
STANDIN = '''
import json, os, signal, sys, threading
from pathlib import Path
from tests.flywheel.otlp_receiver import OtlpReceiver

args = sys.argv[1:]
work = Path(os.environ["PHOENIX_WORKING_DIR"])
work.mkdir(parents=True, exist_ok=True)
if os.environ.get("STANDIN_CRASH"):
    print("stand-in: cannot open the database", flush=True)
    sys.exit(3)
env = {k: v for k, v in os.environ.items() if k.startswith(("PHOENIX_", "OTEL_"))}
(work / "started.json").write_text(json.dumps({"argv": args, "env": env}))

def keep(spans):
    with (work / "spans.jsonl").open("a") as fh:
        fh.writelines(json.dumps(s) + "\\n" for s in spans)

receiver = OtlpReceiver(args[args.index("--host") + 1], int(args[args.index("--port") + 1]), on_spans=keep)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=receiver.server.shutdown).start())
receiver.server.serve_forever()
(work / "stopped").write_text("on SIGTERM")
'''

PHOENIX_INSTALLED = importlib.util.find_spec("phoenix") is not None


def _standin(tmp_path: Path) -> str:
    """A PYTHONPATH on which `phoenix.server.main` is the stand-in (and the tests package importable)."""
    package = tmp_path / "standin" / "phoenix" / "server"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(STANDIN)
    return os.pathsep.join([str(tmp_path / "standin"), str(ROOT)])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _environ_of(pid: int) -> dict[str, str]:
    """The environment a child process really got (Linux)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


async def _publish_undecodable(nats_url: str, subjects: list[str], trace_id: str) -> None:
    """A message no service can decode on each subject, in one trace: each consumer still records its span."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for subject in subjects:
            await js.publish(subject, b"not an event", headers={
                "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", "Nats-Msg-Id": uuid.uuid4().hex})
    finally:
        await nc.close()


# ---------------------------------------------------------------------- what the children get


def test_with_a_tracing_ui_every_child_exports_to_it_and_the_dashboard_links_to_its_traces(tmp_path: Path):
    ui = make_tracing_ui("phoenix", tmp_path, port=7006)
    shell = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}
    env = child_environment(tmp_path, "nats://x:1", service_ports(None), shell, ui)
    # The UI asked for on the command line wins over the shell's collector.
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:7006"
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in env
    assert env["FLYWHEEL_DASHBOARD_TRACE_URL"] == "http://127.0.0.1:7006/redirects/traces/{trace_id}"
    # Every service reads that environment, the dashboard its link template.
    assert load_all(env)["dashboard"].trace_url == "http://127.0.0.1:7006/redirects/traces/{trace_id}"
    # Without one, the shell's settings pass through untouched.
    assert child_environment(tmp_path, "nats://x:1", service_ports(None), shell) | shell == \
        child_environment(tmp_path, "nats://x:1", service_ports(None), shell)
    assert ui.working_dir == tmp_path / "phoenix" and ui.log_path == tmp_path / "logs" / "phoenix.log"


def _venv_python(base: Path) -> Path:
    """A stand-in for `make phoenix`'s `.venv-phoenix/bin/python` under `base` (executable, like a venv's)."""
    python = base / PHOENIX_VENV / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return python


def test_phoenix_runs_on_make_phoenixs_venv_in_the_checkout_else_the_working_directorys_else_this_python(
        tmp_path: Path, monkeypatch):
    checkout, cwd = tmp_path / "checkout", tmp_path / "cwd"
    checkout.mkdir()
    cwd.mkdir()
    # Neither has one: this interpreter (where `pip install -e '.[tracing-ui]'` would have put it).
    assert default_python(checkout, cwd) == sys.executable
    # An installed Flywheel (its package in site-packages, no checkout): the one where `up` is started.
    in_cwd = _venv_python(cwd)
    assert default_python(checkout, cwd) == str(in_cwd)
    # Run from a checkout (`.venv/bin/flywheel`): that checkout's, from whichever directory.
    in_checkout = _venv_python(checkout)
    assert default_python(checkout, cwd) == str(in_checkout)
    # The venv's own path, not the interpreter its python links to: only that path sees its packages.
    assert default_python(checkout, cwd).startswith(str(checkout / PHOENIX_VENV))
    # Not executable: not a python.
    in_checkout.chmod(0o644)
    assert default_python(checkout, cwd) == str(in_cwd)
    # The checkout Flywheel really runs from is this repository, where `make phoenix` puts it.
    assert tracing_ui.CHECKOUT == ROOT
    # What `flywheel up` gets without --tracing-ui-python; a named one always wins.
    in_checkout.chmod(0o755)
    monkeypatch.setattr(tracing_ui, "CHECKOUT", checkout)
    monkeypatch.chdir(cwd)
    assert make_tracing_ui("phoenix", tmp_path / "data").python == str(in_checkout)
    assert Supervisor(tmp_path / "data", tracing_ui="phoenix").ui.python == str(in_checkout)
    assert make_tracing_ui("phoenix", tmp_path / "data", python="/opt/p/bin/python").python == "/opt/p/bin/python"


def test_an_unknown_tracing_ui_is_refused(tmp_path: Path):
    with pytest.raises(TracingUiError, match="unknown tracing UI 'zipkin'; known: phoenix"):
        Supervisor(tmp_path, tracing_ui="zipkin")


@pytest.mark.skipif(PHOENIX_INSTALLED, reason="arize-phoenix is installed here")
def test_without_phoenix_up_stops_at_once_saying_how_to_install_it(tmp_path: Path, monkeypatch, capsys):
    # No `make phoenix` venv either, whether this checkout has one or not.
    monkeypatch.setattr(tracing_ui, "CHECKOUT", tmp_path)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    sup = Supervisor(data, port_base=free_port_base(), environ=dict(os.environ), tracing_ui="phoenix")
    with pytest.raises(TracingUiError, match=r"Phoenix is not installed\. Install it with `make phoenix` .*"
                                             r"--tracing-ui-python PATH"):
        sup.start()
    assert sup.nats is None and not sup.children and not data.exists()  # nothing started, nothing written

    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(data))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # `up` takes them over
    try:
        assert main(["up", "--tracing-ui", "phoenix"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flywheel up: --tracing-ui phoenix: Arize Phoenix is not installed") and INSTALL_HINT in err
        assert main(["up", "--tracing-ui", "phoenix", "--tracing-ui-python", str(tmp_path / "no-python")]) == 2
        assert f"not installed for {tmp_path / 'no-python'}" in capsys.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_phoenix_on_a_taken_port_or_dying_at_start_is_a_clear_error(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": _standin(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        ui = Phoenix(tmp_path / "phoenix", port=taken.getsockname()[1], python=sys.executable)
        with pytest.raises(TracingUiError, match="is taken .*--tracing-ui-port"):
            ui.check(env)
    ui = Phoenix(tmp_path / "phoenix", port=_free_port(), python=sys.executable)
    ui.check(env)  # the stand-in counts as installed
    ui.start({**env, "STANDIN_CRASH": "1"})
    try:
        with pytest.raises(TracingUiError, match="(?s)Phoenix exited with 3 while starting.*cannot open the database"):
            ui.wait_ready()
    finally:
        ui.stop()


# ---------------------------------------------------------------------- real processes


@pytest.mark.integration
@pytest.mark.slow
def test_phoenix_runs_beside_the_stack_gets_the_services_spans_and_stops_after_them(tmp_path: Path,
                                                                                  tiny_model_dir: Path):
    data = tmp_path / "data"
    port = _free_port()
    environ = {**os.environ, "PYTHONPATH": _standin(tmp_path), "FLYWHEEL_BASE_MODEL": str(tiny_model_dir),
               "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9/nowhere"}
    # The stand-in runs on this interpreter, whether or not `make phoenix` made a .venv-phoenix here.
    sup = Supervisor(data, port_base=free_port_base(), services=("deployer",), environ=environ,
                     tracing_ui="phoenix", tracing_ui_port=port, tracing_ui_python=sys.executable, grace_s=30)
    trace_id = uuid.uuid4().hex
    log = data / "logs" / "deployer.log"
    try:
        sup.start()
        # Phoenix answered /readyz before any service started, and was started as Phoenix is.
        started = json.loads((data / "phoenix" / "started.json").read_text())
        argv = started["argv"]
        assert argv[0] == "serve" and argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--port") + 1] == str(port) and argv[argv.index("--grpc-port") + 1] != "4317"
        assert started["env"]["PHOENIX_WORKING_DIR"] == str(data / "phoenix")
        assert not [k for k in started["env"] if k.startswith("OTEL_")]  # Phoenix exports nothing itself
        child = _environ_of(sup.children["deployer"].process.pid)
        assert child["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{port}"
        assert child["FLYWHEEL_DASHBOARD_TRACE_URL"] == f"http://127.0.0.1:{port}/redirects/traces/{{trace_id}}"

        wait_for_sync(lambda: _ready(sup.ports["deployer"]), "the deployer to start")
        asyncio.run(_publish_undecodable(sup.nats_url, [topology.EVAL_SCORED], trace_id))
        wait_for_sync(lambda: '"dead-lettered"' in log.read_text(), "the deployer to dead-letter the event")
    finally:
        sup.stop()
    # Stopped on SIGTERM, after the deployer: whatever the deployer still had, it received.
    assert sup.ui.process.returncode == 0 and (data / "phoenix" / "stopped").exists()
    spans = [json.loads(line) for line in (data / "phoenix" / "spans.jsonl").read_text().splitlines()]
    assert {(s["service"], s["name"]) for s in spans if s["trace_id"] == trace_id} >= {
        ("flywheel-deployer", "eval.scored process")}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_service_process_exports_its_spans_over_otlp_http(tmp_path: Path, tiny_model_dir: Path):
    data = tmp_path / "data"
    trace_id = uuid.uuid4().hex
    with OtlpReceiver() as receiver:
        environ = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "FLYWHEEL_BASE_MODEL": str(tiny_model_dir),
                   # Nothing but the test's own events: no base-model scoring, no synthesized datasets.
                   "FLYWHEEL_EVALUATOR_SCORE_BASE_MODEL": "false", "FLYWHEEL_CURRICULUM_ENABLED": "false"}
        sup = Supervisor(data, port_base=free_port_base(), environ=environ, grace_s=30)
        try:
            sup.start()
            wait_for_sync(lambda: all(_ready(sup.ports[s]) for s in SERVICES), "every service to start", timeout=240)
            # One event each service consumes (the curriculum and inference share model.deployed).
            subjects = [topology.DATASET_SUBMITTED, topology.dataset_accepted("normal"), topology.CHECKPOINT_SAVED,
                        topology.EVAL_SCORED, topology.MODEL_DEPLOYED]
            asyncio.run(_publish_undecodable(sup.nats_url, subjects, trace_id))
            consumers = {"gatekeeper", "trainer", "evaluator", "deployer", "curriculum", "inference"}

            def exported() -> set[str]:
                return {s["service"].removeprefix("flywheel-") for s in receiver.received() if s["trace_id"] == trace_id}

            wait_for_sync(lambda: consumers <= exported(), lambda: f"spans from {sorted(consumers)}; got {exported()}")
            # The dashboard consumes no events (it reads the streams' history): it is set up the same way.
            assert _environ_of(sup.children["dashboard"].process.pid)["OTEL_EXPORTER_OTLP_ENDPOINT"] == receiver.url
            assert set(SERVICES) - consumers <= {"dashboard"}
        finally:
            sup.stop()
        # Inference's own start (its champion sync and model load) went out as well.
        assert {"champion sync", "model load"} <= {s["name"] for s in receiver.received()
                                                   if s["service"] == "flywheel-inference"}
