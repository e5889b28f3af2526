"""`flywheel lineage` against a real nats-server: a loop's history published on the bus (three runs,
their datasets, scores and deployments, with trace ids), read back as a lineage by the command,
as text and as JSON, and the same after the server restarts on its store."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from opentelemetry import context

from flywheel.lineage import format_lineage
from libs.common.bus import Bus
from libs.common.events import DatasetSubmitted
from libs.common.lineage import build_lineage, read_lineage
from libs.common.nats_server import NatsServer
from libs.common.records import CHAMPION, DEPLOY_DECISIONS, DeployDecisions
from libs.common.tracing import extract_context
from tests.flywheel.test_cli import cli_env, run_cli_async
from tests.libs.common.test_lineage import BASE_URI, LoopHistory, three_runs


async def publish(bus: Bus, history: LoopHistory) -> None:
    """Every event on its subject within its trace, then the deployer's KV records."""
    for i, (subject, event, trace_id) in enumerate(history.published):
        token = context.attach(extract_context({"traceparent": f"00-{trace_id}-{i + 1:016x}-01"}))
        try:
            await bus.publish(subject, event)
        finally:
            context.detach(token)
    await (await bus.record(CHAMPION)).write(history.champion, 0)
    await (await bus.record(DEPLOY_DECISIONS)).write(DeployDecisions(decisions=history.decisions), 0)


@pytest.mark.integration
async def test_lineage_of_the_served_model_from_the_bus_and_after_a_restart(tmp_path: Path):
    loop = three_runs()
    server = NatsServer(tmp_path / "nats")
    url = server.start()
    try:
        bus = await Bus.connect([url], "test")
        await bus.ensure_topology()
        try:
            await publish(bus, loop.history)
            direct = await read_lineage(bus)
        finally:
            await bus.close()
        env = cli_env(tmp_path / "data", url)
        code, text, err = await run_cli_async("lineage", env=env)
        assert code == 0, err
        code, out, err = await run_cli_async("lineage", "--json", env=env)
        assert code == 0, err
        before = json.loads(out)
    finally:
        server.stop()

    # What the library reads is what the command prints.
    assert before == json.loads(json.dumps(msgspec.to_builtins(direct)))
    assert before["served"] and before["model"]["sha256"] == loop.c3.sha256
    assert [hop["checkpoint"]["run_id"] for hop in before["hops"]] == [loop.c3.run_id, loop.c2.run_id, loop.c1.run_id]
    assert before["origin"]["kind"] == "base" and before["origin"]["uri"] == BASE_URI
    top, middle, bottom = before["hops"]
    assert top["dataset"]["name"] == "curriculum-binary-L2-2" and top["dataset"]["submission"]["inline"]
    assert top["dataset"]["submission"]["channel"] == "curriculum"
    assert [s["suite_version"] for s in top["scores"]] == ["v1", "v2"]
    assert [t["suite_version"] for t in top["tests"]] == ["t1"] and middle["tests"] == bottom["tests"] == []
    assert top["deployments"][0]["previous"]["sha256"] == loop.c1.sha256
    assert top["deployments"][0]["decision"]["outcome"] == "promoted"
    assert [a["start_step"] for a in middle["run"]["attempts"]] == [0, 4] and middle["run"]["failures"]
    assert middle["deployments"] == [] and middle["decisions"][0]["outcome"] == "kept"
    assert bottom["deployments"][0]["previous"]["run_id"] == "base"
    # The trace ids come from the messages' traceparent headers.
    published_traces = {trace_id for _, _, trace_id in loop.history.published}
    assert before["trace_ids"] and set(before["trace_ids"]) <= published_traces
    assert top["dataset"]["trace_id"] in published_traces and top["deployments"][0]["trace_id"] in published_traces

    # The text: newest hop first, one block each, down to the base.
    assert text.index("#1  checkpoint " + loop.c3.sha256[:12]) < text.index("#2  checkpoint " + loop.c2.sha256[:12])
    assert text.index("#3  checkpoint " + loop.c1.sha256[:12]) < text.index(f"base  {BASE_URI}")
    assert "is served; 3 hops back to the base model" in text
    assert "started 2 times" in text and "RuntimeError('worker lost')" in text
    assert "why: better beyond the noise" in text and "kept: not better beyond the noise" in text
    # The served model's accuracy is its sealed test's; the selection scores are labelled as such.
    assert "    tested    skills-test t1: exact_match 0.625 [95% 0.375, 0.825] on 16, val_loss 0.6000" in text
    assert "    selection binary v1: exact_match 0.750" in text
    assert text.count("tested    none stored") == 1  # run 1: replaced before it was tested; run 2: never champion
    assert top["dataset"]["trace_id"] in text

    # Restarted on the same store: the same lineage, byte for byte.
    restarted = NatsServer(tmp_path / "nats")
    url = restarted.start()
    try:
        env = cli_env(tmp_path / "data", url)
        code, out, err = await run_cli_async("lineage", "--json", env=env)
        assert code == 0, err
        assert json.loads(out) == before
        code, again, err = await run_cli_async("lineage", env=env)
        assert code == 0 and again == text, err

        # Any checkpoint by a prefix of its sha256; an unknown one is a one-line error listing what exists.
        code, out, err = await run_cli_async("lineage", loop.c2.sha256[:10], "--json", env=env)
        assert code == 0, err
        named = json.loads(out)
        assert named["model"]["sha256"] == loop.c2.sha256 and not named["deployed"] and not named["served"]
        code, out, err = await run_cli_async("lineage", "no-such-run", env=env)
        assert code == 1 and out == ""
        assert err.startswith("flywheel lineage: no checkpoint or run matches 'no-such-run'")
        assert loop.c3.sha256[:12] in err and len(err.strip().splitlines()) == 1
    finally:
        restarted.stop()


@pytest.mark.integration
async def test_lineage_with_nothing_deployed_says_the_base_model_is_served(bus: Bus, nats_server: str, tmp_path: Path):
    code, out, err = await run_cli_async("lineage", env=cli_env(tmp_path / "data", nats_server))
    assert code == 0, err
    assert "nothing was ever deployed: inference serves the base model" in out


def test_the_text_says_where_the_history_ends_and_what_was_never_deployed():
    loop = three_runs()
    h = loop.history
    cut = next(i for i, (_, e, _) in enumerate(h.published)
               if isinstance(e, DatasetSubmitted) and e.name == "alice-questions")
    text = format_lineage(build_lineage(h.records()[cut:], loop.c2.sha256[:8], champion=h.champion,
                                        decisions=h.decisions))
    assert text.startswith(f"lineage of {loop.c2.sha256[:8]}: checkpoint {loop.c2.sha256[:12]}")
    assert "was never deployed" in text and "deployed  never" in text
    assert text.rstrip().splitlines()[-1].startswith("end  checkpoint " + loop.c1.uri)
    assert "the lineage before it is unknown" in text
