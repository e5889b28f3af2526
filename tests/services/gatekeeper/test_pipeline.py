"""The pipeline end to end without a bus: originals kept, datasets by content, duplicates, uris, idempotency."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec
import pytest

from flywheel.submit import describe_report
from libs.common import topology
from libs.common.chat import ChatRow
from libs.common.events import DatasetAccepted, DatasetRejected, DatasetSubmitted
from services.gatekeeper.intake import is_submission_id, submission_id_for
from services.gatekeeper.pipeline import ValidationInterrupted
from services.gatekeeper.verdict import accepted_event_id, announcement
from tests.services.gatekeeper.samples import chat, good_rows, jsonl, make_gatekeeper, submission


def test_accepted_rows_are_stored_normalised_under_their_hash(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    rows = good_rows(9) + [chat(("user", "hi"), ("user", "again"))]
    report = gk.submit_rows(submission("s1", priority="high"), rows)
    assert report.status == "accepted" and report.num_rows_valid == 9 and report.num_rows_dropped == 1

    dataset = gk.store.verify(report.dataset_uri, report.dataset_id)
    assert dataset.name == f"{report.dataset_id}.jsonl" and dataset.read_bytes() == jsonl(good_rows(9))
    assert hashlib.sha256(dataset.read_bytes()).hexdigest() == report.dataset_id
    stored = [msgspec.json.decode(line, type=ChatRow) for line in dataset.read_bytes().splitlines()]
    assert [len(row.messages) for row in stored] == [2] * 9

    assert gk.store.path_for(report.original_uri).read_bytes() == jsonl(rows)
    assert gk.read_report("s1") == report
    assert not list((gk.store.root / "staging").iterdir())

    subject, event = announcement(report)
    assert subject == topology.dataset_accepted("high") and isinstance(event, DatasetAccepted)
    assert event.id == accepted_event_id(report.dataset_id)
    assert (event.sha256, event.num_rows, event.num_rows_dropped) == (report.dataset_id, 9, 1)


def test_rejected_submission_keeps_its_original_and_report(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    rows = [chat(("user", "hi"))] * 3
    report = gk.submit_rows(submission("bad"), rows)
    assert report.status == "rejected" and report.counts == {"has_assistant": 3}
    assert [f.line for f in report.findings["has_assistant"].findings] == [1, 2, 3] and report.dataset_uri == ""
    assert report.reasons == ["no valid rows: all 3 rows have errors; most common: has_assistant (3)",
                              "has_assistant: 3 rows (line 1, 2, 3): no assistant turn: nothing to train on"]
    assert gk.store.path_for(report.original_uri).read_bytes() == jsonl(rows)
    assert gk.store.path_for(report.report_uri).is_file()
    subject, event = announcement(report)
    assert subject == topology.DATASET_REJECTED and isinstance(event, DatasetRejected)
    assert event.reasons == report.reasons and event.num_errors == 3
    assert not (gk.store.root / "datasets").exists() or not list((gk.store.root / "datasets").iterdir())


def test_the_same_content_twice_is_a_duplicate_and_not_announced_as_accepted(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    first = gk.submit_rows(submission("first"), good_rows(4))
    # Different formatting and an extra field: the same normalised dataset.
    second = gk.submit_rows(submission("second"), [dict(row, source="x") for row in good_rows(4)])
    assert first.status == "accepted" and second.status == "duplicate"
    assert second.dataset_id == first.dataset_id and second.duplicate_of == "first"
    subject, event = announcement(second)
    assert subject == topology.DATASET_REJECTED
    assert event.reasons == [f"duplicate of {first.dataset_id} (accepted as submission first)"]
    assert gk.index.get(first.dataset_id).submission_id == "first"
    assert len(list((gk.store.root / "datasets").iterdir())) == 1


def test_a_submission_seen_again_returns_its_stored_report(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    event = DatasetSubmitted(name="d", rows=good_rows(2), level="quick")
    first = gk.submit_event(event)
    again = gk.submit_event(event)
    assert first.status == again.status == "accepted" and again == first
    assert announcement(first)[1].id == announcement(again)[1].id


def test_unknown_schema_is_rejected_with_the_known_ones(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    report = gk.submit_rows(submission("s", schema="preference_v9"), good_rows(1))
    assert report.status == "rejected" and report.counts == {"schema": 1}
    assert report.reasons == ["schema: unknown schema 'preference_v9'; known: chat_sft_v1, syllo_v1, completion_v1"]
    assert gk.store.path_for(report.original_uri).read_bytes() == jsonl(good_rows(1))


def test_a_data_profile_rides_onto_the_acceptance_and_the_rows_are_stored_as_submitted(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    report = gk.submit_event(DatasetSubmitted(name="d", rows=good_rows(3), level="quick", profile="emoji_think"))
    assert report.status == "accepted" and report.profile == "emoji_think"
    _, event = announcement(report)
    assert isinstance(event, DatasetAccepted) and event.profile == "emoji_think"
    # The trainer applies the profile; the dataset (and so its id) is the rows as submitted.
    assert gk.store.path_for(report.dataset_uri).read_bytes() == jsonl(good_rows(3))
    assert "schema chat_sft_v1, profile emoji_think" in describe_report(msgspec.to_builtins(report))
    plain = gk.submit_rows(submission("plain"), good_rows(2, tag="p"))
    assert announcement(plain)[1].profile == "none" and ", profile" not in describe_report(msgspec.to_builtins(plain))


def test_an_unknown_data_profile_is_rejected_with_the_known_ones(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    report = gk.submit_rows(submission("s", profile="emoji"), good_rows(1))
    assert report.status == "rejected" and report.counts == {"data_profile": 1} and report.profile == "emoji"
    assert report.reasons == ["data_profile: unknown profile 'emoji'; known: none, emoji_think, regime3"]
    assert report.findings["data_profile"].scope == "submission"
    assert gk.store.path_for(report.original_uri).read_bytes() == jsonl(good_rows(1))
    _, event = announcement(report)
    assert isinstance(event, DatasetRejected) and event.reasons == report.reasons


def test_a_text_dataset_takes_no_data_profile_but_none(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    rows = [{"text": "plain text to continue"}]
    report = gk.submit_rows(submission("t", schema="completion_v1", profile="regime3"), rows)
    assert report.status == "rejected" and report.reasons == [
        "data_profile: profile 'regime3' applies to chat schemas only; completion_v1 is text"]
    assert gk.submit_rows(submission("u", schema="completion_v1", profile="none"), rows).status == "accepted"
    # syllo_v1 is a chat schema: a profile applies.
    assert gk.submit_rows(submission("v", schema="syllo_v1", profile="regime3"), [chat(
        ("user", "q"), ("assistant", "a"), puzzle={"syllables": ["a"], "answers": ["a"]})]).status == "accepted"


def test_rows_and_uri_exactly_one(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    both = gk.submit_event(DatasetSubmitted(name="d", rows=good_rows(1), uri="file:///x"))
    neither = gk.submit_event(DatasetSubmitted(name="d"))
    for report in (both, neither):
        assert report.status == "rejected" and report.counts == {"submission": 1}


def test_uri_inside_the_store_is_validated_and_its_hash_checked(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    artifact = gk.store.write_bytes(jsonl(good_rows(3)), "uploads", "d.jsonl")
    ok = gk.submit_event(DatasetSubmitted(name="d", uri=artifact.uri, sha256=artifact.sha256, level="quick"))
    assert ok.status == "accepted" and ok.num_rows_valid == 3 and ok.source == artifact.uri

    wrong = gk.submit_event(DatasetSubmitted(name="d", uri=artifact.uri, sha256="0" * 64, level="quick"))
    assert wrong.status == "rejected" and wrong.counts == {"sha256": 1}
    assert gk.store.path_for(wrong.original_uri).read_bytes() == jsonl(good_rows(3))  # the copy is kept


def test_uri_outside_the_store_is_refused(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(jsonl(good_rows(1)))
    root = gk.store.root.as_uri()
    for uri in (secret.as_uri(), f"{root}/../secret.jsonl", "https://example.com/d.jsonl", "s3://b/d.jsonl",
                f"{root}/nothing-here.jsonl", f"{root}/uploads"):
        report = gk.submit_event(DatasetSubmitted(name="d", uri=uri))
        assert report.status == "rejected" and report.counts == {"uri": 1}, uri
        assert report.original_uri == "" and gk.store.path_for(report.report_uri).is_file()
    (gk.store.root / "link.jsonl").symlink_to(secret)
    report = gk.submit_event(DatasetSubmitted(name="d", uri=f"{root}/link.jsonl"))
    assert report.counts == {"uri": 1} and "outside" in report.reasons[0]


def test_a_moved_file_becomes_the_original_and_a_symlink_is_copied(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(jsonl(good_rows(2)))
    report = gk.submit_file(submission("p", source="plain.jsonl"), plain, move=True)
    assert report.status == "accepted" and not plain.exists()
    assert report.original_uri.endswith("submissions/p/original.jsonl")

    target = tmp_path / "target.txt"
    target.write_bytes(jsonl(good_rows(2, tag="!")))
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    report = gk.submit_file(submission("l", source="link.txt"), link, move=True)
    original = gk.store.path_for(report.original_uri)
    assert report.status == "accepted" and original.name == "original.txt" and not original.is_symlink()
    assert not link.exists() and target.exists()


def test_submission_ids_from_events_are_path_safe_and_stable():
    assert submission_id_for("abc123") == "abc123"
    odd = submission_id_for("../../etc/passwd")
    assert is_submission_id(odd) and odd == submission_id_for("../../etc/passwd") and "/" not in odd
    assert not is_submission_id("../x")


def test_concurrent_claims_of_one_dataset_agree(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    gk = make_gatekeeper(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda i: gk.submit_rows(submission(f"s{i}"), good_rows(50)), range(8)))
    assert sorted(r.status for r in reports).count("accepted") == 1
    winner = next(r for r in reports if r.status == "accepted")
    assert all(r.duplicate_of == winner.submission_id for r in reports if r is not winner)
    assert os.listdir(gk.index.folder) == [f"{winner.dataset_id}.json"]


def test_a_stop_interrupts_validation_without_deciding_anything(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    source = tmp_path / "big.jsonl"
    source.write_bytes(jsonl(good_rows(5000)))
    gk.stopping.set()
    with pytest.raises(ValidationInterrupted):
        gk.submit_file(submission("big", source="big.jsonl"), source, move=False)
    assert gk.read_report("big") is None and not list((gk.store.root / "staging").iterdir())
    assert source.exists()
    assert source.stat().st_nlink == 2  # the original was linked in, not copied

    gk.stopping.clear()  # after the restart the same submission goes through
    report = gk.submit_file(submission("big", source="big.jsonl"), source, move=False)
    assert report.status == "accepted" and report.num_rows_valid == 5000


def test_a_10_gb_file_is_kept_unhashed_and_rejected_unread(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as fh:
        fh.truncate(10 * 1024**3)  # sparse: no disk, and reading it would take minutes
    report = gk.submit_file(submission("huge", source="huge.jsonl"), huge, move=True)
    assert report.status == "rejected" and report.counts == {"file_size": 1}
    assert report.original_bytes == 10 * 1024**3 and report.original_sha256 == ""
    assert gk.store.path_for(report.original_uri).stat().st_size == 10 * 1024**3  # kept, never deleted


def test_reports_are_found_by_submission_or_dataset_id(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    report = gk.submit_rows(submission("sub-1"), good_rows(3))
    assert gk.read_report("sub-1") == gk.read_report(report.dataset_id) == report
    assert gk.read_report("0" * 64) is None and gk.read_report("../reports/sub-1") is None


def test_hostile_source_names_never_choose_a_path(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    source = tmp_path / "x"
    source.write_bytes(jsonl(good_rows(2, tag="!")))
    report = gk.submit_file(submission("h", source="../../../etc/cron.d/evil.sh;rm -rf"), source, move=True)
    original = gk.store.path_for(report.original_uri)
    assert original == gk.store.root / "submissions" / "h" / "original.jsonl" and report.status == "accepted"


# ---------------------------------------------------------------------------- at least once: announced or not


def test_an_acceptance_whose_announcement_failed_is_announced_by_the_next_submission_not_a_duplicate(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    first = gk.submit_rows(submission("first"), good_rows(4))
    assert first.status == "accepted" and not gk.index.get(first.dataset_id).announced
    # Announced by the caller meanwhile: the same content is a duplicate, as it always was.
    assert gk.submit_rows(submission("racing"), good_rows(4)).status == "duplicate"
    gk.not_announced(first)  # the publish failed

    retry = gk.submit_rows(submission("retry"), [dict(row, source="x") for row in good_rows(4)])
    assert retry == first  # the stored report of the acceptance: the same announcement
    (subject, event), (first_subject, first_event) = announcement(retry), announcement(first)
    assert (subject, event.id, event.submission_id) == (first_subject, first_event.id, "first")
    assert gk.read_report("retry") == first  # a redelivery of the retry is answered alike
    assert gk.submit_rows(submission("third"), good_rows(4)).status == "duplicate"  # the retry announces it

    gk.announced(retry)
    assert gk.index.get(first.dataset_id).announced and gk.was_announced(first)
    again = gk.submit_rows(submission("again"), good_rows(4))
    assert again.status == "duplicate" and again.duplicate_of == "first"


def test_a_restart_hands_out_every_acceptance_never_announced_once(tmp_path: Path):
    before = make_gatekeeper(tmp_path)
    lost = before.submit_rows(submission("lost"), good_rows(3, tag=" lost"))
    done = before.submit_rows(submission("done"), good_rows(3, tag=" done"))
    before.announced(done)
    # Written before the `announced` field existed: announced then.
    old = before.submit_rows(submission("old"), good_rows(3, tag=" old"))
    path = before.index.folder / f"{old.dataset_id}.json"
    entry = msgspec.json.decode(path.read_bytes())
    del entry["announced"]
    path.write_bytes(msgspec.json.encode(entry))

    after = make_gatekeeper(tmp_path)  # a fresh process: nothing under way
    assert after.take_unannounced() == [lost]
    assert after.take_unannounced() == []  # handed out, not yet reported back
    after.not_announced(lost)
    [again] = after.take_unannounced()
    after.announced(again)
    assert after.take_unannounced() == [] and after.index.get(lost.dataset_id).announced
    assert after.submit_rows(submission("late"), good_rows(3, tag=" lost")).status == "duplicate"
    assert after.submit_rows(submission("old2"), good_rows(3, tag=" old")).status == "duplicate"


def test_marking_announced_keeps_the_order_of_acceptance(tmp_path: Path):
    gk = make_gatekeeper(tmp_path)
    older = gk.submit_rows(submission("older"), good_rows(2, tag=" a"))
    newer = gk.submit_rows(submission("newer"), good_rows(2, tag=" b"))
    os.utime(gk.index.folder / f"{older.dataset_id}.json", ns=(1, 1))
    gk.announced(older)
    assert [e.submission_id for e in gk.index.recent(2)] == ["newer", "older"]
    assert [e.submission_id for e in gk.index.unannounced()] == ["newer"] and newer.status == "accepted"


def test_a_claim_whose_submission_died_before_its_report_is_taken_over(tmp_path: Path):
    dead = make_gatekeeper(tmp_path)
    first = dead.submit_rows(submission("died"), good_rows(3))
    dead.store.location("reports", "died.json").unlink()  # as if it stopped between the claim and the report

    alive = make_gatekeeper(tmp_path)
    assert alive.take_unannounced() == []  # nothing to announce it from
    report = alive.submit_rows(submission("next"), good_rows(3))
    assert report.status == "accepted" and report.submission_id == "next" and report.dataset_id == first.dataset_id
    assert alive.index.get(first.dataset_id).submission_id == "next"
