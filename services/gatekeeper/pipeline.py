"""The pipeline: one file through the checks of its level, and one submission from its bytes to its report.

Validating one file (`Validation`), streamed; which checks run at each level, in which order:

quick     file   file_size, file_empty, gzip, binary, encoding, bom          (reading.py)
          line   line_size, blank_line, utf8, json, nesting, json_object     (reading.py)
          row    the schema's own checks: chat_sft_v1 messages_field, message_shape, role,
                 profile, extra_fields, content_nonempty, has_assistant, last_turn_assistant;
                 syllo_v1 the same but profile, plus puzzle; completion_v1 text_field,
                 extra_fields, content_nonempty                                (schemas.py)
          end    no_rows
standard  held_out (chat schemas: no held-out problem of a skill)             (checks/held_out.py)
          template, token_length, token_truncation                           (checks/standard.py)
          the length distribution in tokens, as the trainer encodes each row
deep      answer_format (rows with a profile)                                 (checks/deep.py)
          answer_leakage (chat schemas)                                        (checks/deep.py)
          exact_duplicate, accepted_duplicate, near_duplicate,
          accepted_near_duplicate, dedup_capacity                              (duplicates.py)

Every check of the level runs on every row that is still in (a row stops at its first
error); the report's `checks_run` lists them. Rows flow in blocks of about 64 KiB: read,
decoded, checked level by level, and written out normalised (`run`) or not at all (`check`:
a dry run, what `flywheel check` and `POST /datasets/check` answer), so memory does not grow
with the file (bar deep's duplicate index, which is capped). A `stop` event (the service is
shutting down) interrupts the run at the next block, deciding nothing.

A submission (`Gatekeeper`): keep the original, validate, store, index, report. Every way in
(intake.py) ends here, so all of them run the same pipeline and the same checks. Nothing here
touches the bus: the result is a `Report`, from which `verdict.announcement` derives the event.

Its schema and data profile (libs/common/profiles.py) are settled before a byte is read: an
unknown name, or a data profile other than none on a text schema (a profile rewrites
conversations), rejects it with the known names. The profile is not applied here, so the
accepted rows are stored as submitted: the trainer applies it, and the report and
`dataset.accepted` carry its name. The token lengths the standard level measures are those of
the rows without the profile (its system prompt and emoji add a few dozen tokens).

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

At least once: the index entry is claimed unannounced, and the caller reports back whether
publishing its `dataset.accepted` worked (`announced`, `not_announced`). A dataset accepted but
never announced (the publish failed, the process died first) is no duplicate: the next
submission of the same content (at deep, one whose rows all come from that one dataset) gets
the stored report of the acceptance, to announce again: the same event, whose id JetStream
drops if the earlier attempt landed after all, and a copy of that report under its own id.
Only while this process is announcing it is the same content a duplicate. `take_unannounced`
hands out every acceptance still to announce (the service sweeps them at start and after a
failure). An entry whose submission died before writing its report is taken over by the next.

Idempotent per submission id: when its report exists, that report is returned unchanged
(a redelivered `dataset.submitted` is announced again, not validated again; the service skips
an acceptance the index already records as announced, `was_announced`).

A Gatekeeper is put together from its settings (`build_gatekeeper`): the service and
`flywheel check` build it alike. Both read the same data directory, so a check on the command
line runs the same schemas, limits and policy, the same tokenizer (the base model the trainer
trains) and, at the deep level, the same recently accepted datasets as the running service would.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from libs.common.artifacts import Artifact, ArtifactError, ArtifactStore, is_sha256, sha256_file
from libs.common.events import DatasetSubmitted, ValidationLevel, utcnow
from libs.common.log import get_logger
from libs.common.models import ensure_base_model, load_tokenizer
from libs.common.profiles import DEFAULT_PROFILE, UnknownProfile, get_profile
from services.gatekeeper.checks import (
    DATA_PROFILE,
    FILE_CHECKS,
    LINE_CHECKS,
    NO_ROWS,
    SCHEMA,
    SHA256,
    SUBMISSION,
    URI,
    Batch,
    Check,
    LevelCheck,
    Tally,
    runs_at,
)
from services.gatekeeper.checks.deep import ANSWER_FORMAT, ANSWER_LEAKAGE, AnswerFormat, AnswerLeakage
from services.gatekeeper.checks.held_out import HELD_OUT, HeldOut
from services.gatekeeper.checks.standard import (
    STANDARD_CHECKS,
    LengthSummary,
    Overlength,
    TokenCounter,
    TokenLengths,
)
from services.gatekeeper.duplicates import (
    ACCEPTED_DUPLICATE,
    DUPLICATE_CHECKS,
    AcceptedIndex,
    Duplicates,
    Fingerprints,
    IndexEntry,
    RecentDatasets,
    RecentIndex,
)
from services.gatekeeper.intake import Submission, is_submission_id, submission_id_for
from services.gatekeeper.reading import Limits, decode_block, read_blocks
from services.gatekeeper.schemas import DEFAULT_SCHEMA, SCHEMAS, RowSchema, UnknownSchema, lookup
from services.gatekeeper.verdict import Report, check_reasons, decide, decode_report, encode_report

if TYPE_CHECKING:  # the settings import ValidationConfig from here
    from services.gatekeeper.settings import GatekeeperSettings

NAME = "gatekeeper"
log = get_logger(NAME)

# ---------------------------------------------------------------------------- one file through its level


class ValidationInterrupted(Exception):
    """Validation was asked to stop before the end of the file; nothing was decided."""


@dataclass(frozen=True)
class ValidationConfig:
    limits: Limits = field(default_factory=Limits)
    max_length: int = 512
    overlength: Overlength = "truncate"
    near_duplicate_similarity: float = 0.8
    max_dedup_rows: int = 1_000_000
    leakage_min_chars: int = 16
    leakage_fraction: float = 0.5


@dataclass(frozen=True)
class Tools:
    """What the higher levels need, loaded only when a level asks for it."""

    tokens: Callable[[], TokenCounter]
    recent: Callable[[], RecentIndex] = lambda: RecentIndex([])


def checks_for(schema: RowSchema, level: ValidationLevel) -> list[Check]:
    """Every check that runs for `schema` at `level`, in order (submission checks excluded)."""
    checks = [*FILE_CHECKS, *LINE_CHECKS, *schema.checks]
    if runs_at("standard", level):
        if schema.kind == "chat":
            checks.append(HELD_OUT)
        checks += STANDARD_CHECKS
    if runs_at("deep", level):
        if schema.profiles:
            checks.append(ANSWER_FORMAT)
        if schema.kind == "chat":
            checks.append(ANSWER_LEAKAGE)
        checks += DUPLICATE_CHECKS
    return checks


def describe_schemas() -> list[dict]:
    """Every schema with the checks each level adds, for `GET /specs`."""
    out = []
    for schema in SCHEMAS.values():
        by_level, seen = {}, set()
        for level in ("quick", "standard", "deep"):
            added = [c for c in checks_for(schema, level) if c.name not in seen]  # type: ignore[arg-type]
            seen.update(c.name for c in added)
            by_level[level] = [c.describe() for c in added]
        out.append({"name": schema.name, "description": schema.description, "kind": schema.kind,
                    "default": schema.name == DEFAULT_SCHEMA, "checks": by_level})
    return out


class Validation:
    """One file through one schema at one level."""

    def __init__(self, schema: RowSchema, level: ValidationLevel, config: ValidationConfig, tally: Tally,
                 tools: Tools) -> None:
        self.schema = schema
        self.level = level
        self.config = config
        self.tally = tally
        self.checks_run = [c.name for c in checks_for(schema, level)]
        # The level beyond quick: its checks, in the order they see every batch.
        self._level_checks: list[LevelCheck] = []
        self._tokens: TokenLengths | None = None
        self.duplicates: Duplicates | None = None
        if HELD_OUT.name in self.checks_run:
            self._level_checks.append(HeldOut(schema))
        if runs_at("standard", level):
            self._tokens = TokenLengths(schema, tools.tokens(), config.max_length, config.overlength)
            self._level_checks.append(self._tokens)
        if runs_at("deep", level):
            if ANSWER_FORMAT.name in self.checks_run:
                self._level_checks.append(AnswerFormat(schema))
            if ANSWER_LEAKAGE.name in self.checks_run:
                self._level_checks.append(AnswerLeakage(
                    schema, min_chars=config.leakage_min_chars, min_fraction=config.leakage_fraction))
            # Last: only rows every other check kept are indexed as seen.
            self.duplicates = Duplicates(schema, tools.recent(), threshold=config.near_duplicate_similarity,
                                         max_rows=config.max_dedup_rows)
            self._level_checks.append(self.duplicates)

    def run(self, path: Path, stop: threading.Event | None = None) -> Iterator[bytes]:
        """Yield the normalised lines of the rows that pass, block by block; findings go to the tally."""
        schema = self.schema
        for rows, batch in self._checked(path, stop):
            if batch is None:
                yield schema.encode_lines(rows)
            elif batch.lines is not None:
                yield b"".join(batch.lines[i] + b"\n" for i in batch.live())
            else:
                yield schema.encode_lines([rows[i] for i in batch.live()] if batch.dropped else rows)

    def check(self, path: Path, stop: threading.Event | None = None,
              progress: Callable[[int], object] | None = None) -> None:
        """Every check of `run`, nothing written: the findings and counts alone (`flywheel check`).

        `progress` is called with each block's size in bytes (decompressed) as the block is taken up.
        """
        for _ in self._checked(path, stop, progress):
            pass

    def _checked(self, path: Path, stop: threading.Event | None,
                 progress: Callable[[int], object] | None = None) -> Iterator[tuple[list, Batch | None]]:
        """Each block's rows that passed the quick checks, and the batch the level checks marked (if any ran)."""
        schema, tally = self.schema, self.tally
        for block in read_blocks(path, self.config.limits, tally):
            if stop is not None and stop.is_set():
                raise ValidationInterrupted(f"stopped at line {block.first}")
            if progress is not None:
                progress(len(block.data))
            rows, numbers = decode_block(schema, block, tally)
            if not rows:
                continue
            if not self._level_checks:
                yield rows, None
                continue
            batch = Batch(rows, numbers, tally)
            for check in self._level_checks:
                check(batch)
            yield rows, batch
        for check in self._level_checks:
            check.finish(tally)
        if tally.num_rows == 0 and not tally.fatal:
            tally.add(0, NO_ROWS, "every line is blank")

    @property
    def lengths(self) -> LengthSummary | None:
        """The token length distribution (standard and deep; quick measures no tokens)."""
        return self._tokens.stats.summary() if self._tokens is not None else None

    def fingerprints(self) -> Fingerprints | None:
        """The kept rows' fingerprints (deep only), for the recent-datasets index."""
        return self.duplicates.fingerprints() if self.duplicates is not None else None


# ---------------------------------------------------------------------------- one submission

_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
_row_encoder = msgspec.json.Encoder()


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
        # Dataset ids whose acceptance this process has claimed or taken up and not yet seen
        # announced or failed (`announced`, `not_announced`): the same content submitted
        # meanwhile is a duplicate, as the announcement is under way.
        self._announcing: set[str] = set()
        self._claims = threading.Lock()

    # ------------------------------------------------------------------ intake

    def submit_event(self, event: DatasetSubmitted) -> Report:
        submission = Submission(
            submission_id=submission_id_for(event.id), name=event.name, channel=event.channel,
            source="inline" if event.rows is not None else (event.uri or ""),
            schema=event.schema, priority=event.priority, level=event.level, submitted_by=event.submitted_by,
            profile=event.profile,
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
        if is_sha256(report_id) and (entry := self.index.get(report_id)):
            report_id = entry.submission_id
        if not is_submission_id(report_id):
            return None
        path = self.store.location("reports", f"{report_id}.json")
        return decode_report(path.read_bytes()) if path.is_file() else None

    # ------------------------------------------------------------------ announcing (the caller publishes)

    def announced(self, report: Report) -> None:
        """`report`'s announcement was published: an acceptance is marked announced in the index."""
        if report.status != "accepted" or not report.dataset_id:
            return
        with self._claims:
            try:
                self.index.mark_announced(report.dataset_id)
            finally:
                self._announcing.discard(report.dataset_id)

    def was_announced(self, report: Report) -> bool:
        """Whether the index records `report`'s acceptance as announced (JetStream holds its event)."""
        if report.status != "accepted" or not report.dataset_id:
            return False
        entry = self.index.get(report.dataset_id)
        return entry is not None and entry.announced and entry.submission_id == report.submission_id

    def not_announced(self, report: Report) -> None:
        """Publishing `report`'s announcement failed: the next submission of its content, or
        `take_unannounced`, announces it."""
        if report.status != "accepted":
            return
        with self._claims:
            self._announcing.discard(report.dataset_id)

    def take_unannounced(self) -> list[Report]:
        """The reports of accepted datasets never announced and not under way here, oldest first, now
        the caller's to announce (then `announced` or `not_announced`, each)."""
        taken = []
        for entry in self.index.unannounced():
            with self._claims:
                current = self.index.get(entry.dataset_id)
                if current is None or current.announced or current.dataset_id in self._announcing:
                    continue
                if (report := self._take_up(current)) is not None:
                    taken.append(report)
                else:
                    log.warning("an accepted dataset was never announced and its report is missing; the next "
                                "submission of the same content announces it", dataset_id=current.dataset_id,
                                submission_id=current.submission_id)
        return taken

    def _take_up(self, entry: IndexEntry) -> Report | None:
        """The stored report of `entry`'s acceptance when it is still to be announced and nobody here is
        announcing it; it is then the caller's to announce. Call with `_claims` held."""
        if entry.announced or entry.dataset_id in self._announcing:
            return None
        report = self.read_report(entry.submission_id)
        if report is None or report.status != "accepted" or report.dataset_id != entry.dataset_id:
            return None
        self._announcing.add(entry.dataset_id)
        return report

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
        return Artifact(uri=self.store.uri_for(target), sha256=digest, size=size)

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
        """The validation the submission asks for; None (and a finding) when its schema or data profile is refused."""
        try:
            schema = lookup(submission.schema)
        except UnknownSchema as exc:
            tally.add(0, SCHEMA, str(exc))
            return None
        try:
            get_profile(submission.profile)
        except UnknownProfile as exc:
            tally.add(0, DATA_PROFILE, str(exc))
            return None
        if schema.kind != "chat" and submission.profile != DEFAULT_PROFILE:
            # A profile rewrites conversations (system prompt, turns): a text row has none.
            tally.add(0, DATA_PROFILE, f"profile {submission.profile!r} applies to chat schemas only; "
                                       f"{schema.name} is {schema.kind}")
            return None
        return Validation(schema, submission.level, self.config, tally, self.tools)

    def _finish(self, submission: Submission, tally: Tally, original: Artifact | None, staged: Artifact | None,
                validation: Validation | None, started: float) -> Report:
        report_uri = self.store.uri_for(self.store.location("reports", f"{submission.submission_id}.json"))
        report = self._report(submission, tally, original, validation, started, report_uri)
        if staged is not None:
            staged_path = self.store.path_for(staged.uri)
            if report.status == "accepted":
                report = self._publishable(report, staged, staged_path, validation)
            else:
                staged_path.unlink()
                report = self._already_accepted(report, tally, validation)
        try:
            self.store.write_bytes(encode_report(report), "reports", f"{submission.submission_id}.json")
        except BaseException:
            self.not_announced(report)  # no report, no announcement: a retry takes the claim over
            raise
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
            profile=submission.profile, channel=submission.channel, submitted_by=submission.submitted_by,
            source=submission.source,
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
        claim = IndexEntry(
            dataset_id=dataset_id, submission_id=report.submission_id, name=report.name, uri=self.store.uri_for(target),
            schema=report.schema, num_rows=report.num_rows_valid, announced=False,
        )
        report = msgspec.structs.replace(report, dataset_id=dataset_id, dataset_uri=self.store.uri_for(target))
        with self._claims:
            first = self.index.claim(claim)
            if first.submission_id != report.submission_id:
                if (standing := self._take_up(first)) is not None:
                    return standing  # accepted before, never announced: announced now, not a duplicate
                if not first.announced and dataset_id not in self._announcing:
                    # Claimed by a submission that stopped before its report (a crash): nothing was
                    # announced and there is nothing to announce it from. This one takes it over.
                    self.index.replace(claim)
                    first = claim
            if first.submission_id == report.submission_id:
                self._announcing.add(dataset_id)
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
        with self._claims:
            entry = self.index.get(originals[0])
            if len(originals) == 1 and entry is not None and (standing := self._take_up(entry)) is not None:
                return standing  # the resubmission of an acceptance never announced: announced now
        return msgspec.structs.replace(
            report, status="duplicate", duplicate_of=entry.submission_id if entry else "",
            reasons=[f"every row is already in accepted dataset {', '.join(originals)}", *report.reasons],
        )


# ---------------------------------------------------------------------------- put together from the settings


def token_counter_loader(settings: GatekeeperSettings) -> Callable[[], TokenCounter]:
    """The base model's tokenizer and chat template, loaded on first use, once (callable from any thread)."""
    lock = threading.Lock()
    loaded: list[TokenCounter] = []

    def load() -> TokenCounter:
        with lock:
            if not loaded:
                model = ensure_base_model(settings.data_dir, settings.base_model)
                loaded.append(TokenCounter(load_tokenizer(model)))
            return loaded[0]

    return load


def build_gatekeeper(settings: GatekeeperSettings, store: ArtifactStore) -> Gatekeeper:
    own = settings.service_dir(NAME)
    index = AcceptedIndex(own / "accepted")
    recent = RecentDatasets(index, store, own / "fingerprints", max_datasets=settings.recent_datasets,
                            max_rows=settings.recent_rows)
    return Gatekeeper(
        store, index, recent, config=settings.validation, max_error_fraction=settings.max_error_fraction,
        max_findings=settings.max_findings, tokens=token_counter_loader(settings),
    )
