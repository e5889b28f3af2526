"""The CLI against a real nats-server: submit, verdict wait, status, control, --json, one-line errors.

Commands whose output is the point (errors on stderr, `--json` on stdout) run as the user runs
them, in a subprocess, so what they print is exactly what a terminal or a script would see.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
import pytest

from flywheel.cli import CONNECT_DEADLINE_S, NatsUnreachable, _explain_nats_failure, build_parser, cmd_demo, main
from flywheel.status import format_status, read_status
from flywheel.submit import describe_verdict, submit_file
from libs.common import topology
from libs.common.artifacts import ArtifactStore
from libs.common.bus import Bus
from libs.common.events import ChampionTested, ControlReply, DatasetAccepted, DatasetSubmitted, LevelScore
from libs.common.records import CHAMPION, Champion
from libs.common.tracing import setup_tracing

REPO = Path(__file__).resolve().parents[2]
ONE_ROW = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'


def cli_env(data_dir: Path, nats_url: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "NATS_URL"}
    return {**env, "FLYWHEEL_DATA_DIR": str(data_dir), "FLYWHEEL_NATS_URL": nats_url}


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


async def run_cli_async(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`run_cli` for async tests: the event loop keeps serving the test's fake peers meanwhile."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "flywheel.cli", *args, cwd=REPO, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def answer_like_the_gatekeeper(bus: Bus, seen: list[DatasetSubmitted]) -> None:
    """A peer on the real bus that accepts every submission, as the gatekeeper would."""

    async def on_submitted(msg) -> None:
        event = msgspec.json.decode(msg.data, type=DatasetSubmitted)
        seen.append(event)
        await bus.publish(topology.dataset_accepted("high"), DatasetAccepted(
            dataset_id="d" * 64, name=event.name, uri=event.uri, sha256=event.sha256, schema=event.schema,
            priority="high", num_rows=1, num_rows_dropped=0, report_uri="file:///r", submission_id=event.id))

    await bus.nc.subscribe(topology.DATASET_SUBMITTED, cb=on_submitted)


@pytest.mark.integration
async def test_submit_uploads_into_the_store_and_waits_for_the_verdict(bus, tmp_path: Path):
    setup_tracing("test", None)
    store = ArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "mine.jsonl"
    source.write_text(ONE_ROW)
    seen: list[DatasetSubmitted] = []
    await answer_like_the_gatekeeper(bus, seen)
    result = await submit_file(bus, store, source, priority="high", wait_s=10)
    assert result.outcome == "accepted" and len(result.trace_id) == 32
    [event] = seen
    assert event.uri == result.uri and store.verify(event.uri, event.sha256).read_bytes() == source.read_bytes()
    assert event.priority == "high" and event.channel == "cli" and event.id == result.submission_id
    assert "accepted" in describe_verdict(result)


@pytest.mark.integration
async def test_submit_names_the_data_profile(bus, tmp_path: Path):
    assert build_parser().parse_args(["submit", "x.jsonl", "--profile", "emoji_think"]).profile == "emoji_think"
    assert build_parser().parse_args(["submit", "x.jsonl"]).profile == "none"
    source = tmp_path / "mine.jsonl"
    source.write_text(ONE_ROW)
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_submitted(msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    await bus.nc.subscribe(topology.DATASET_SUBMITTED, cb=on_submitted)
    result = await submit_file(bus, ArtifactStore(tmp_path / "artifacts"), source, profile="regime3")
    event = msgspec.json.decode(await asyncio.wait_for(got, 10), type=DatasetSubmitted)
    assert event.id == result.submission_id and event.profile == "regime3" and event.channel == "cli"
    accepted = DatasetAccepted(dataset_id="d" * 64, name="n", uri="file:///d", sha256="d" * 64, schema="chat_sft_v1",
                               priority="low", num_rows=1, num_rows_dropped=0, report_uri="file:///r",
                               submission_id=event.id, profile="regime3")
    result.outcome, result.verdict = "accepted", msgspec.to_builtins(accepted)
    assert "profile regime3" in describe_verdict(result)


def champion_tested(sha256: str, version: str, correct: tuple[int, ...]) -> ChampionTested:
    """A champion's sealed test score: `correct[i]` of 4 items right at binary/i+1."""
    from services.evaluator.scoring import wilson_interval

    levels = {f"binary/{i}": LevelScore(correct=c, total=4, accuracy=c / 4, low=wilson_interval(c, 4)[0],
                                        high=wilson_interval(c, 4)[1])
              for i, c in enumerate(correct, 1)}
    total, right = 4 * len(correct), sum(correct)
    low, high = wilson_interval(right, total)
    return ChampionTested(
        run_id="run-1", step=8, checkpoint_uri=f"file:///data/artifacts/checkpoints/run-1/step-{version}",
        checkpoint_sha256=sha256, suite="skills-test", suite_version=version, exact_match=right / total,
        exact_match_low=low, exact_match_high=high, num_examples=total, val_loss=0.75, levels=levels,
        outcomes="", eval_id="e" * 32, selection_suite_version="skills-v2-0123456789ab",
    )


@pytest.mark.integration
async def test_status_reads_the_loop_from_the_bus(bus):
    status = await read_status(bus)
    assert set(status["queue"]) == {"gatekeeper", "trainer-high", "trainer-normal", "trainer-low"}
    assert status["champion"] is None and status["dead_letters"] == 0
    text = format_status(status)
    assert "none yet" in text and "trainer-high" in text

    # A champion: its numbers are its sealed test's, once it has one.
    await (await bus.record(CHAMPION)).put(Champion(
        checkpoint_uri="file:///c", checkpoint_sha256="a" * 64, run_id="run-1", step=8, exact_match=0.9,
        val_loss=0.5, suite_version="skills-v2-0123456789ab", deployed_at=datetime.now(UTC), event_id="e"))
    status = await read_status(bus)
    assert status["champion_test"] is None
    assert "sealed test     not yet tested" in format_status(status)
    assert "0.900" not in format_status(status)  # the selection score that promoted it is not its accuracy

    await bus.publish(topology.EVAL_TESTED, champion_tested("a" * 64, "skills-test-v2-000000000001", (1, 2)))
    await bus.publish(topology.EVAL_TESTED, champion_tested("b" * 64, "skills-test-v2-000000000001", (4, 4)))
    await bus.publish(topology.EVAL_TESTED, champion_tested("a" * 64, "skills-test-v2-000000000002", (3, 1)))
    status = await read_status(bus)
    assert status["champion_test"]["suite_version"] == "skills-test-v2-000000000002"  # the newest test version
    text = format_status(status)
    assert "sealed test     exact_match 0.500 [95% 0.215, 0.785] on 8" in text
    assert "    binary/1      0.750 [95% 0.301, 0.954]  3/4" in text


def test_commands_without_a_bus_explain_what_to_set(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FLYWHEEL_NATS_URL", raising=False)
    monkeypatch.delenv("NATS_URL", raising=False)
    assert main(["status"]) == 2
    assert "FLYWHEEL_NATS_URL" in capsys.readouterr().err


def test_submit_of_a_missing_file_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["submit", str(tmp_path / "nope.jsonl")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_asyncapi_check_passes_on_the_committed_document(capsys):
    assert main(["asyncapi", "--check"]) == 0
    capsys.readouterr()
    assert main(["asyncapi", "--check", "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["up_to_date"] is True and checked["path"].endswith("docs/asyncapi.yaml")
    assert main(["asyncapi", "--json"]) == 2  # writing the document has nothing to report
    assert "--json goes with --check" in capsys.readouterr().err


def test_upload_streams_into_the_store(tmp_path: Path):
    from flywheel.submit import upload

    store = ArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "d.jsonl"
    source.write_bytes(b'{"a": 1}\n' * 1000)
    art = upload(store, source)
    assert store.verify(art.uri, art.sha256).read_bytes() == source.read_bytes() and art.size == source.stat().st_size
    assert "/uploads/" in art.uri
    assert not list((tmp_path / "artifacts" / "uploads").rglob(".part-*"))


@pytest.mark.slow  # loads the tiny tokenizer
def test_check_gives_the_gatekeepers_verdict_here_and_keeps_nothing(tmp_path: Path, monkeypatch, capsys,
                                                                     tiny_model_dir: Path):
    data = tmp_path / "data"
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(data))
    monkeypatch.setenv("FLYWHEEL_BASE_MODEL", str(tiny_model_dir))
    good = '{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}\n'
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(good % (i, i) for i in range(30)) + '{"messages": [{"role": "user", "content": "q"}]}\n')

    assert main(["check", str(source)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would be accepted: 30 of 31 rows kept")
    assert "has_assistant" in out and "line 31" in out and "tokens per row" in out  # standard: lengths

    assert main(["check", str(source), "--level", "quick", "--json"]) == 0
    report = msgspec.json.decode(capsys.readouterr().out)
    assert report["level"] == "quick" and report["counts"] == {"has_assistant": 1} and report["lengths"] is None

    source.write_text('{"messages": [{"role": "user", "content": "q"}]}\n' * 3)
    assert main(["check", str(source), "--level", "quick"]) == 1
    assert capsys.readouterr().out.startswith("would be rejected:\n  - ")
    assert not (data / "artifacts").exists() or not any(p.is_file() for p in (data / "artifacts").rglob("*"))
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2


# ---------------------------------------------------------------------------- flywheel demo


def test_demo_is_a_flywheel_subcommand_with_the_demos_options(monkeypatch, capsys):
    args = build_parser().parse_args(["demo", "--data-dir", "elsewhere", "--keep"])
    assert args.fn is cmd_demo and args.data_dir == Path("elsewhere") and args.keep
    assert build_parser().parse_args(["demo"]).data_dir is None  # the demo's own default
    with pytest.raises(SystemExit) as help_exit:
        main(["demo", "--help"])
    assert help_exit.value.code == 0 and "--keep" in capsys.readouterr().out

    ran: list[tuple[Path | None, bool]] = []  # the whole demo takes minutes: stand in for it
    monkeypatch.setattr("flywheel.demo.run_and_report", lambda data_dir, *, keep: ran.append((data_dir, keep)) or 0)
    assert main(["demo", "--data-dir", "elsewhere"]) == 0 and ran == [(Path("elsewhere"), False)]


def test_python_m_flywheel_demo_is_the_same_command():
    shown = subprocess.run([sys.executable, "-m", "flywheel.demo", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=60, check=False)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: flywheel demo") and "--data-dir" in shown.stdout


# ---------------------------------------------------------------------------- NATS failures: one line


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_pause_with_no_trainer_says_who_is_missing_in_one_line(nats_server: str, tmp_path: Path):
    done = run_cli("pause", env=cli_env(tmp_path, nats_server))
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line == "flywheel pause: no trainer is answering on control.trainer.pause (is `flywheel up` running?)"


def test_status_without_a_server_gives_up_quickly_in_one_line(tmp_path: Path):
    url = f"nats://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    done = run_cli("status", "--json", env=cli_env(tmp_path, url))
    took = time.monotonic() - started
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()  # no log lines about retries either
    assert line.startswith(f"flywheel status: cannot reach NATS at {url} within") and "FLYWHEEL_NATS_URL" in line
    assert took < CONNECT_DEADLINE_S + 10  # the deadline plus the interpreter's start, not minutes of retries


@pytest.mark.parametrize("failure, says", [
    (NatsUnreachable(["nats://a:4222", "nats://b:4222"]), "cannot reach NATS at nats://a:4222, nats://b:4222"),
    (nats.errors.NoRespondersError(), "no trainer is answering on control.trainer.stop"),
    (nats.errors.TimeoutError(), "the trainer did not answer on control.trainer.stop in time"),
    (nats.js.errors.ServiceUnavailableError(), "JetStream is not available"),
    (nats.js.errors.APIError(code=500, description="insufficient resources\nmore"), "JetStream refused a request"),
    (nats.errors.ConnectionClosedError(), "connection to NATS closed"),
    (TimeoutError("services not ready in time: ['trainer']"), "services not ready in time: ['trainer']"),
])
def test_every_nats_failure_reads_as_one_line(failure: Exception, says: str):
    message = _explain_nats_failure(failure, "trainer", "control.trainer.stop")
    assert says in message and "\n" not in message


# ---------------------------------------------------------------------------- --json: one document on stdout


@pytest.mark.integration
async def test_read_commands_print_one_json_document_with_json(bus, nats_server: str, tmp_path: Path):
    env = cli_env(tmp_path, nats_server)

    code, out, _ = await run_cli_async("status", "--json", env=env)
    assert code == 0 and set(json.loads(out)["queue"]) == {"gatekeeper", "trainer-high", "trainer-normal", "trainer-low"}

    async def answer_like_the_trainer(msg) -> None:
        await msg.respond(msgspec.json.encode(ControlReply(ok=True, state="paused", message="by the test")))

    await bus.nc.subscribe(f"{topology.CONTROL_TRAINER}.pause", cb=answer_like_the_trainer)
    code, out, _ = await run_cli_async("pause", "--json", env=env)
    assert code == 0 and json.loads(out) == {"ok": True, "state": "paused", "message": "by the test"}

    seen: list[DatasetSubmitted] = []
    await answer_like_the_gatekeeper(bus, seen)
    source = tmp_path / "mine.jsonl"
    source.write_text(ONE_ROW)
    code, out, _ = await run_cli_async("submit", str(source), "--json", "--wait", "30", env=env)
    submitted = json.loads(out)
    assert code == 0 and submitted["outcome"] == "accepted" and submitted["verdict"]["submission_id"] == seen[0].id

    # The submit process wrote its spans to the data directory as it exited.
    code, out, _ = await run_cli_async("trace", submitted["trace_id"], "--json", env=env)
    traced = json.loads(out)
    assert code == 0 and traced["trace_id"] == submitted["trace_id"]
    assert "flywheel submit" in {span["name"] for span in traced["spans"]}


# ---------------------------------------------------------------------------- flywheel deploy / history


@pytest.mark.integration
async def test_deploy_rollback_and_history_through_the_running_deployer(bus, nats_server: str, tmp_path: Path):
    from libs.common.settings import load_settings
    from services.deployer.service import SERVICE
    from services.deployer.settings import DeployerSettings
    from tests.conftest import wait_for
    from tests.services.conftest import running
    from tests.services.deployer.candidates import base, better, scored
    from tests.services.deployer.replica import replica, settled

    env = cli_env(tmp_path, nats_server)
    settings = load_settings(DeployerSettings, "deployer", environ={}, nats_url=nats_server)
    # A stand-in inference replica reports serving whatever is staged: only then is a deployment final.
    async with running(SERVICE, settings) as deployer, replica(bus):
        await bus.publish(topology.EVAL_SCORED, scored("a", base()))  # first champion
        await settled(bus)
        await bus.publish(topology.EVAL_SCORED, scored("b", better(base(), 2)))  # kept: within the noise

        async def both_decided() -> bool:
            kept, _ = await deployer.decisions.read()
            return kept is not None and len(kept.decisions) == 2

        await wait_for(both_decided, "the deployer to decide on both scores")

        code, out, err = await run_cli_async("deploy", "b" * 64, "--json", env=env)
        reply = json.loads(out)
        assert code == 0 and reply["ok"] and reply["state"] == "staged", err
        assert reply["checkpoint_uri"] == "file:///ckpt/b" and "manual deploy" in reply["message"]
        await settled(bus, reply["deployment_id"])

        code, out, _ = await run_cli_async("deploy", "c" * 64, env=env)
        assert code == 1 and out.startswith("deployer: refused (checkpoint cccc")
        assert "has not been scored on the current suite" in out

        code, out, _ = await run_cli_async("deploy", "--rollback", env=env)
        assert code == 0 and out.startswith("deployer: staged (rollback requested by cli")
        assert "staging   file:///ckpt/a" in out
        await settled(bus)

    code, out, _ = await run_cli_async("history", "--json", env=env)
    decisions = json.loads(out)
    assert code == 0 and [d["outcome"] for d in decisions] == ["rolled_back", "refused", "promoted", "kept", "promoted"]
    assert decisions[2]["requested_by"] == "cli" and "not past the screen" in decisions[3]["reason"]
    code, out, _ = await run_cli_async("history", "--limit", "2", env=env)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and "rolled_back" in lines[0] and "(requested by cli)" in lines[0]
    assert lines[1].startswith("    rollback requested by cli") and "refused" in lines[2]


@pytest.mark.integration
def test_deploy_with_no_deployer_says_who_is_missing_in_one_line(nats_server: str, tmp_path: Path):
    done = run_cli("deploy", "--rollback", env=cli_env(tmp_path, nats_server))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "flywheel deploy: no deployer is answering on control.deployer.rollback (is `flywheel up` running?)"]


def test_deploy_needs_a_checkpoint_or_rollback_not_both(capsys):
    assert main(["deploy"]) == 2
    assert main(["deploy", "a" * 64, "--rollback"]) == 2
    assert "name a CHECKPOINT (sha256 or URI) or give --rollback" in capsys.readouterr().err


def test_status_shows_the_champions_sealed_test_per_level_with_intervals():
    status = {
        "queue": {"gatekeeper": {"waiting": 0, "in_progress": 0}}, "trainer_control": None,
        "training": {"started": None, "progress": None, "finished": None},
        "champion": {"run_id": "run-1", "step": 8, "exact_match": 0.9, "val_loss": 0.5,
                     "checkpoint_uri": "file:///data/artifacts/checkpoints/run-1/step-00000024",
                     "checkpoint_sha256": "a" * 64},
        "champion_test": msgspec.to_builtins(champion_tested("a" * 64, "skills-test-v2-5c1f0e9a7b3d", (4, 3, 1))),
        "last_decision": {"outcome": "promoted", "reason": "better beyond the noise"},
        "last_scores": {"run_id": "run-2", "step": 8, "exact_match": 0.25, "exact_match_low": 0.1,
                        "exact_match_high": 0.5, "val_loss": 0.8, "ece": 0.1, "suite_version": "skills-v2-0123456789ab"},
        "curriculum": None, "dead_letters": 0,
    }
    text = format_status(status)
    champion = text[text.index("champion"):text.index("last scores")]
    assert champion.splitlines()[2:6] == [
        "  sealed test     exact_match 0.667 [95% 0.391, 0.862] on 12  val_loss 0.7500  suite skills-test-v2-5c1f0e9a7b3d",
        "    binary/1      1.000 [95% 0.510, 1.000]  4/4",
        "    binary/2      0.750 [95% 0.301, 0.954]  3/4",
        "    binary/3      0.250 [95% 0.046, 0.699]  1/4",
    ]
    assert "0.900" not in champion  # its selection score is no figure of its accuracy
    assert "last scores (selection suite" in text


def test_status_shows_scores_that_were_not_finite_and_the_last_decision():
    status = {
        "queue": {}, "training": {"started": None, "progress": None, "finished": None}, "trainer_control": None,
        "champion": {"run_id": "r", "step": 3, "exact_match": 0.5, "val_loss": 1.25, "checkpoint_uri": "file:///c"},
        "last_decision": {"outcome": "refused", "reason": "val loss is not finite"},
        "last_scores": {"run_id": "r", "step": 4, "exact_match": 0.25, "exact_match_low": 0.1,
                        "exact_match_high": 0.5, "val_loss": None, "ece": None, "suite_version": "v",
                        "regressions": ["val loss is not finite"]},
        "curriculum": None, "dead_letters": 0,
    }
    text = format_status(status)
    assert "last decision   refused: val loss is not finite" in text
    assert "exact_match 0.250 [95% 0.100, 0.500]  val_loss n/a  ece n/a" in text
    assert "regression      val loss is not finite" in text


def test_up_runs_the_services_named_for_this_host_and_refuses_unknown_ones(capsys):
    from flywheel.cli import build_parser

    args = build_parser().parse_args(["up", "--services", "trainer, gatekeeper,curriculum"])
    assert args.services == ("gatekeeper", "trainer", "curriculum")
    assert len(build_parser().parse_args(["up"]).services) == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--services", "trainer,evaluatr"])
    assert "unknown service(s) evaluatr" in capsys.readouterr().err
