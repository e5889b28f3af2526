"""`python -m bench.load` at a small scale, and the audit it ends with.

The run: 60 datasets from 6 clients over NATS, HTTP and the inbox (2 each), on a real
nats-server and the real gatekeeper process: every submission exactly one verdict, the expected
one, none lost, none duplicated (the benchmark's targets on speed and memory are its business).
The audit's own tests feed it verdicts that are lost, doubled, wrong or contradicting a reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import channel_split, plan
from bench.load_audit import Expected, Verdict, audit

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"datasets", "clients", "lost", "duplicated", "verdicts", "datasets_per_s", "p95_verdict_s",
        "gatekeeper_peak_rss_mb", "rss_growth_mb", "vs_one_client", "targets", "met"}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sixty_datasets_from_six_clients_over_three_channels_get_one_verdict_each(tiny_model_dir: Path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", "--datasets", "60", "--clients", "6", "--split", "2,2,2",
         "--baseline", "6", "--data-dir", str(tiny_model_dir.parent.parent)],
        cwd=ROOT, capture_output=True, text=True, timeout=220, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary) == KEYS
    assert summary["datasets"] == 60 and summary["clients"] == 6
    assert summary["lost"] == 0 and summary["duplicated"] == 0, done.stdout[-3000:]
    verdicts = summary["verdicts"]
    assert verdicts["exactly_one"] == 66 and verdicts["wrong"] == 0, done.stdout[-3000:]
    assert verdicts["accepted"] + verdicts["rejected"] + verdicts["duplicate"] == 66
    # The plan for seed 0 holds invalid datasets and resubmissions: both kinds of answer were given.
    assert verdicts["rejected"] > 0 and verdicts["duplicate"] > 0
    assert all(summary["met"][key] for key in ("lost", "duplicated", "wrong_verdicts", "gatekeeper_restarts"))
    assert set(summary["p95_verdict_s"]) == {"nats", "http", "inbox", "all"}
    assert all(isinstance(v, float) and v > 0 for v in summary["p95_verdict_s"].values())
    assert summary["gatekeeper_peak_rss_mb"] > 50 and summary["datasets_per_s"] > 0


def test_the_plan_mixes_every_channel_and_resubmits_through_another():
    channels = channel_split(6, None)
    assert channels == ["nats", "nats", "http", "http", "inbox", "inbox"]
    items = plan("t", 200, lambda i: channels[i % 6], seed=0)
    assert len({item.name for item in items}) == 200
    by_name = {item.name: item for item in items}
    resubmitted = [item for item in items if item.kind == "resubmission"]
    assert resubmitted and {item.kind for item in items} >= {"valid", "flawed", "resubmission"}
    for item in resubmitted:
        original = by_name[item.group]
        assert original.rows == item.rows and original.channel != item.channel and original.group == item.group
    assert all(item.expect == "rejected" for item in items if item.kind not in ("valid", "flawed", "resubmission"))
    with pytest.raises(SystemExit):
        channel_split(6, "3,3,1")


def _accepted(name: str, sid: str, dataset: str) -> Verdict:
    return Verdict(name, sid, "accepted", "accepted", dataset_id=dataset)


def test_the_audit_passes_one_right_verdict_each():
    expected = [Expected("a", "accepted"), Expected("b", "rejected"), Expected("c", "accepted", group="c"),
                Expected("d", "accepted", group="c")]
    verdicts = [_accepted("a", "s-a", "1" * 64), Verdict("b", "s-b", "rejected", "rejected"),
                Verdict("c", "s-c", "rejected", "duplicate", duplicate_of="s-d"), _accepted("d", "s-d", "2" * 64)]
    result = audit(expected, verdicts, replies={"a": ("s-a", "accepted")})
    assert not result.lost and result.duplicated == 0 and not result.wrong
    assert result.figures() == {"accepted": 2, "rejected": 1, "duplicate": 1, "exactly_one": 4, "wrong": 0}


def test_the_audit_finds_lost_doubled_and_wrong_verdicts():
    expected = [Expected("a", "accepted"), Expected("b", "rejected"), Expected("c", "accepted", group="c"),
                Expected("d", "accepted", group="c"), Expected("e", "accepted"), Expected("f", "accepted")]
    verdicts = [
        _accepted("a", "s-a", "1" * 64), _accepted("a", "s-a", "1" * 64),  # announced twice
        Verdict("b", "s-b", "rejected", "rejected"),
        _accepted("c", "s-c", "2" * 64), _accepted("d", "s-d", "2" * 64),  # one content accepted twice
        Verdict("f", "s-f", "accepted", "rejected", dataset_id="3" * 64),  # event and report disagree
        Verdict("zz", "s-z", "rejected", "rejected"),  # nobody submitted it
    ]
    result = audit(expected, verdicts, replies={"b": ("s-b", "accepted")})
    assert result.lost == ["e"]
    assert result.duplicated == 3  # a announced twice, the group's content accepted twice, zz
    wrong = "\n".join(result.wrong)
    assert "zz" in wrong and "f:" in wrong and "group c" in wrong and "HTTP reply" in wrong
    assert result.exactly_one == 6 - 1 - 1
