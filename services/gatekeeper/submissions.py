"""How one submission is taken in: keep the original, validate, store, index, report.

Every intake path (NATS `dataset.submitted` with inline rows or a uri, HTTP upload, inbox
file) ends here, so all of them run the same pipeline and the same checks. Nothing here
touches the bus: the result is a `Report`, from which `reports.announcement` derives the event.

Artifact store layout:
  submissions/<submission_id>/original<.ext>   the bytes as submitted, kept whatever the outcome
  datasets/<dataset_id>.jsonl                  accepted rows, normalised; dataset_id = their sha256
  reports/<submission_id>.json                 the report
  staging/<submission_id>.jsonl                normalised rows while validation runs (transient)
The original is a hard link where the filesystem allows (no copy), else a streamed copy. A
file over max_file_bytes is kept unhashed: it is rejected before a byte of it is read.

Duplicates: a dataset id already in the index under another submission is not announced as
accepted again. Its report has status "duplicate" and `duplicate_of` (the first submission),
and it is announced as a `DatasetRejected` with the reason "duplicate of <dataset_id> ...",
so every submission gets exactly one answer and no dataset is trained twice. At the deep
level, a file whose every row is already in recently accepted datasets is a duplicate too.

Idempotent per submission id: when its report exists, that report is returned unchanged
(a redelivered `dataset.submitted` is announced again, not validated again).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import msgspec

from libs.common.artifacts import Artifact, ArtifactError, ArtifactStore, sha256_file
from libs.common.events import DatasetSubmitted, Priority, ValidationLevel, utcnow
from services.gatekeeper.checks import SCHEMA, SHA256, SUBMISSION, URI, Check, Tally
from services.gatekeeper.duplicates import ACCEPTED_DUPLICATE
from services.gatekeeper.index import AcceptedIndex, IndexEntry, is_dataset_id
from services.gatekeeper.policy import decide
from services.gatekeeper.recent import RecentDatasets
from services.gatekeeper.reports import EVENT_NAMESPACE, Report, check_reasons, decode_report, encode_report
from services.gatekeeper.schemas import DEFAULT_SCHEMA, UnknownSchema, lookup
from services.gatekeeper.tokens import TokenCounter
from services.gatekeeper.validation import Tools, Validation, ValidationConfig

_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
_row_encoder = msgspec.json.Encoder()


class Submission(msgspec.Struct, frozen=True, kw_only=True):
    submission_id: str
    name: str
    channel: str
    # Where the bytes come from: "inline", a uri, an uploaded or inbox file name.
    source: str
    schema: str = DEFAULT_SCHEMA
    priority: Priority = "normal"
    level: ValidationLevel = "standard"
    submitted_by: str = "anonymous"


def submission_id_for(event_id: str) -> str:
    """A NATS submission's id is its event id (so redeliveries match), made path-safe."""
    return event_id if _SUBMISSION_ID.fullmatch(event_id) else uuid.uuid5(EVENT_NAMESPACE, event_id).hex


def is_submission_id(text: str) -> bool:
    return bool(_SUBMISSION_ID.fullmatch(text))


class Gatekeeper:
    def __init__(
        self,
        store: ArtifactStore,
        index: AcceptedIndex,
        recent: RecentDatasets,
        *,
        config: ValidationConfig,
        max_error_fraction: float,
        max_findings: int,
        tokens: Callable[[], TokenCounter],
    ) -> None:
        self.store = store
        self.index = index
        self.recent = recent
        self.config = config
        self.max_error_fraction = max_error_fraction
        self.max_findings = max_findings
        self.tools = Tools(tokens=tokens, recent=recent.load)
        # Set when the service stops: a validation in progress raises ValidationInterrupted
        # and leaves no report, so the submission is taken up again after the restart.
        self.stopping = threading.Event()

    # ------------------------------------------------------------------ intake

    def submit_event(self, event: DatasetSubmitted) -> Report:
        submission = Submission(
            submission_id=submission_id_for(event.id), name=event.name, channel=event.channel,
            source="inline" if event.rows is not None else (event.uri or ""),
            schema=event.schema, priority=event.priority, level=event.level, submitted_by=event.submitted_by,
        )
        if (event.rows is None) == (event.uri is None):
            return self._done_early(submission, SUBMISSION, "exactly one of `rows` and `uri` must be given")
        if event.rows is not None:
            return self.submit_rows(submission, event.rows)
        return self.submit_uri(submission, event.uri, event.sha256)

    def submit_rows(self, submission: Submission, rows: list[dict]) -> Report:
        if known := self.read_report(submission.submission_id):
            return known
        lines = (_row_encoder.encode(row) + b"\n" for row in rows)
        original = self.store.write_lines(lines, *self._original_parts(submission, ".jsonl"))
        return self._validate(submission, original)

    def submit_uri(self, submission: Submission, uri: str, sha256: str | None) -> Report:
        """A file already in the artifact store; anything that resolves outside it is refused."""
        if known := self.read_report(submission.submission_id):
            return known
        try:
            path = self.store.path_for(uri)
        except ArtifactError as exc:
            return self._done_early(submission, URI, str(exc))
        if not path.is_file():
            return self._done_early(submission, URI, f"{uri} is not a file in the artifact store")
        original = self._keep(path, self._original_parts(submission, path.suffix), move=False)
        if sha256 and original.sha256 and sha256 != original.sha256:
            return self._done_early(
                submission, SHA256, f"content sha256 {original.sha256} does not match the announced {sha256}", original
            )
        return self._validate(submission, original)

    def submit_file(self, submission: Submission, path: Path, *, move: bool) -> Report:
        """A local file (an upload or an inbox file); `move` hands it over to the store."""
        if known := self.read_report(submission.submission_id):
            return known
        original = self._keep(Path(path), self._original_parts(submission, Path(submission.source).suffix), move=move)
        return self._validate(submission, original)

    def check_file(self, submission: Submission, path: Path,
                   progress: Callable[[int], object] | None = None) -> Report:
        """The report `submit_file` would give, with nothing kept: no original, dataset, index entry or report file.

        A dry run for people checking a file before they submit it (`flywheel check`,
        `POST /datasets/check`): the same checks at the same level, the same verdict, but the
        rows are not written out, so whether the whole dataset was accepted before is not
        settled (its id is the hash of those rows; deep still finds rows already accepted).
        `progress` gets each block's size in bytes as validation takes it up.
        """
        started = time.perf_counter()
        tally = Tally(self.max_findings)
        validation = self._validation(submission, tally)
        if validation is not None:
            validation.check(Path(path), self.stopping, progress)
        return self._report(submission, tally, None, validation, started, report_uri="")

    def read_report(self, report_id: str) -> Report | None:
        """The report of a submission id, or of the submission that got a dataset id accepted."""
        if is_dataset_id(report_id) and (entry := self.index.get(report_id)):
            report_id = entry.submission_id
        if not is_submission_id(report_id):
            return None
        path = self.store.location("reports", f"{report_id}.json")
        return decode_report(path.read_bytes()) if path.is_file() else None

    # ------------------------------------------------------------------ pipeline

    def _original_parts(self, submission: Submission, suffix: str) -> tuple[str, ...]:
        suffix = suffix if _SUFFIX.fullmatch(suffix) else ".jsonl"
        return ("submissions", submission.submission_id, f"original{suffix}")

    def _keep(self, source: Path, parts: tuple[str, ...], *, move: bool) -> Artifact:
        """The submitted bytes as an artifact: moved or hard-linked in when possible, else copied."""
        target = self.store.location(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # left by an attempt that stopped before its report
        # A symlink is copied, never moved or linked: the store must not hold links to elsewhere.
        kept = False
        if not source.is_symlink():
            try:
                (os.replace if move else os.link)(source, target)
                kept = True
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        if not kept:
            shutil.copyfile(source, target)
            if move:
                source.unlink()
        size = target.stat().st_size
        # Over the limit: rejected unread, so not read to be hashed either (a 10 GB file).
        digest = sha256_file(target) if size <= self.config.limits.max_file_bytes else ""
        return Artifact(uri=target.as_uri(), sha256=digest, size=size)

    def _done_early(self, submission: Submission, check: Check, reason: str,
                    original: Artifact | None = None) -> Report:
        """A submission refused before validation: the report says why."""
        tally = Tally(self.max_findings)
        tally.add(0, check, reason)
        return self._finish(submission, tally, original, None, None, time.perf_counter())

    def _validate(self, submission: Submission, original: Artifact) -> Report:
        started = time.perf_counter()
        tally = Tally(self.max_findings)
        validation = self._validation(submission, tally)
        if validation is None:
            return self._finish(submission, tally, original, None, None, started)
        rows = validation.run(self.store.path_for(original.uri), self.stopping)
        try:
            staged = self.store.write_lines(rows, "staging", f"{submission.submission_id}.jsonl")
        finally:
            rows.close()
        return self._finish(submission, tally, original, staged, validation, started)

    def _validation(self, submission: Submission, tally: Tally) -> Validation | None:
        """The validation the submission asks for; None (and a schema finding) when its schema is unknown."""
        try:
            schema = lookup(submission.schema)
        except UnknownSchema as exc:
            tally.add(0, SCHEMA, str(exc))
            return None
        return Validation(schema, submission.level, self.config, tally, self.tools)

    def _finish(self, submission: Submission, tally: Tally, original: Artifact | None, staged: Artifact | None,
                validation: Validation | None, started: float) -> Report:
        report_uri = self.store.location("reports", f"{submission.submission_id}.json").as_uri()
        report = self._report(submission, tally, original, validation, started, report_uri)
        if staged is not None:
            staged_path = self.store.path_for(staged.uri)
            if report.status == "accepted":
                report = self._publishable(report, staged, staged_path, validation)
            else:
                staged_path.unlink()
                report = self._already_accepted(report, tally, validation)
        self.store.write_bytes(encode_report(report), "reports", f"{submission.submission_id}.json")
        return report

    def _report(self, submission: Submission, tally: Tally, original: Artifact | None,
                validation: Validation | None, started: float, report_uri: str) -> Report:
        """The report of a validation that has ended: the policy's verdict, counts, findings, lengths."""
        decision = decide(tally, self.max_error_fraction)
        duration = time.perf_counter() - started
        config = self.config
        return Report(
            submission_id=submission.submission_id, status="accepted" if decision.accepted else "rejected",
            name=submission.name, schema=submission.schema, level=submission.level, priority=submission.priority,
            channel=submission.channel, submitted_by=submission.submitted_by, source=submission.source,
            started_at=utcnow() - timedelta(seconds=duration),
            reasons=[] if decision.accepted else [*decision.reasons, *check_reasons(tally)],
            original_uri=original.uri if original else "", original_sha256=original.sha256 if original else "",
            original_bytes=original.size if original else 0,
            report_uri=report_uri,
            num_lines=tally.num_lines, num_rows=tally.num_rows, num_rows_valid=tally.num_rows_valid,
            num_rows_dropped=tally.num_rows_dropped, num_errors=tally.num_errors, num_warnings=tally.num_warnings,
            error_fraction=round(tally.error_fraction, 6),
            policy={
                "max_error_fraction": self.max_error_fraction, "max_line_bytes": config.limits.max_line_bytes,
                "max_file_bytes": config.limits.max_file_bytes, "max_length": config.max_length,
                "overlength": config.overlength, "near_duplicate_similarity": config.near_duplicate_similarity,
                "leakage_min_chars": config.leakage_min_chars, "leakage_fraction": config.leakage_fraction,
            },
            checks_run=validation.checks_run if validation else [], counts=tally.counts, findings=tally.checks,
            lengths=validation.lengths if validation else None,
            duration_s=round(duration, 4), rows_per_second=round(tally.num_rows / duration, 1) if duration else 0.0,
        )

    def _publishable(self, report: Report, staged: Artifact, staged_path: Path,
                     validation: Validation | None) -> Report:
        """Move the accepted rows to their content address and settle whether they are new."""
        dataset_id = staged.sha256
        target = self.store.location("datasets", f"{dataset_id}.jsonl")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            staged_path.unlink()  # same content, already in place
        else:
            os.replace(staged_path, target)
        first = self.index.claim(IndexEntry(
            dataset_id=dataset_id, submission_id=report.submission_id, name=report.name, uri=target.as_uri(),
            schema=report.schema, num_rows=report.num_rows_valid,
        ))
        report = msgspec.structs.replace(report, dataset_id=dataset_id, dataset_uri=target.as_uri())
        if first.submission_id == report.submission_id:
            if validation is not None and (prints := validation.fingerprints()) is not None:
                self.recent.remember(dataset_id, prints)
            return report
        return msgspec.structs.replace(
            report, status="duplicate", duplicate_of=first.submission_id,
            reasons=[f"duplicate of {dataset_id} (accepted as submission {first.submission_id})"],
        )

    def _already_accepted(self, report: Report, tally: Tally, validation: Validation | None) -> Report:
        """A deep validation that dropped every row as already accepted: a duplicate, not a bad file."""
        duplicates = validation.duplicates if validation is not None else None
        if duplicates is None or tally.fatal or tally.num_rows_valid or set(tally.error_counts) != {
            ACCEPTED_DUPLICATE.name
        }:
            return report
        originals = sorted(duplicates.matched_datasets)
        entry = self.index.get(originals[0])
        return msgspec.structs.replace(
            report, status="duplicate", duplicate_of=entry.submission_id if entry else "",
            reasons=[f"every row is already in accepted dataset {', '.join(originals)}", *report.reasons],
        )
