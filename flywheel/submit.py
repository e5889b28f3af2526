"""`flywheel submit FILE`: put a dataset file into the artifact store and announce it.

The file is streamed into `<data_dir>/artifacts/uploads/` (a progress bar for large files),
then a `dataset.submitted` event carries its URI and sha256, and the data profile the trainer is
to apply (`--profile`, libs/common/profiles.py; the gatekeeper checks the name); the submission
opens the trace that follows the dataset through every service. With `wait`, the gatekeeper's
verdict (`dataset.accepted.*` or `dataset.rejected`) is awaited and returned, with the validation
report it points to (`describe_report` prints it: counts, the findings of each check with
their line numbers, the token length histogram).
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from opentelemetry.trace import SpanKind
from tqdm import tqdm

from libs.common import topology
from libs.common.artifacts import Artifact, ArtifactError, ArtifactStore
from libs.common.bus import Bus
from libs.common.events import DatasetAccepted, DatasetRejected, DatasetSubmitted, Priority, ValidationLevel
from libs.common.tracing import current_trace_id, tracer

if TYPE_CHECKING:
    from services.gatekeeper.verdict import Report

_CHUNK = 1 << 20
PROGRESS_ABOVE_BYTES = 32 << 20


class SubmitResult(msgspec.Struct):
    submission_id: str
    trace_id: str
    uri: str
    sha256: str
    outcome: str = "submitted"  # accepted | rejected | submitted (not waited for)
    verdict: dict | None = None
    report: dict | None = None  # the gatekeeper's validation report, when readable from here


def upload(store: ArtifactStore, source: Path) -> Artifact:
    """Stream `source` into the store's uploads area with a progress bar when it is large."""
    size = source.stat().st_size

    def chunks() -> Iterator[bytes]:
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {source.name}",
                  disable=size < PROGRESS_ABOVE_BYTES) as bar, open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                bar.update(len(chunk))
                yield chunk

    return store.write_lines(chunks(), "uploads", uuid.uuid4().hex, source.name)


async def submit_file(
    bus: Bus,
    store: ArtifactStore,
    path: Path,
    *,
    name: str | None = None,
    schema: str = "chat_sft_v1",
    profile: str = "none",
    priority: Priority = "normal",
    level: ValidationLevel = "standard",
    wait_s: float = 0.0,
) -> SubmitResult:
    artifact = upload(store, path)
    event = DatasetSubmitted(
        name=name or path.stem, schema=schema, profile=profile, priority=priority, level=level,
        uri=artifact.uri, sha256=artifact.sha256, submitted_by=getpass.getuser(), channel="cli",
    )
    verdict: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_verdict(msg) -> None:
        body = msgspec.json.decode(msg.data)
        if body.get("submission_id") == event.id and not verdict.done():
            verdict.set_result((msg.subject, body))

    subs = []
    if wait_s:
        # Subscribe before publishing so the verdict cannot slip past.
        subs = [await bus.nc.subscribe("dataset.accepted.*", cb=on_verdict),
                await bus.nc.subscribe(topology.DATASET_REJECTED, cb=on_verdict)]
    with tracer().start_as_current_span("flywheel submit", kind=SpanKind.CLIENT) as span:
        span.set_attribute("flywheel.dataset.name", event.name)
        span.set_attribute("flywheel.submission_id", event.id)
        trace_id = current_trace_id()
        await bus.publish(topology.DATASET_SUBMITTED, event)
    result = SubmitResult(submission_id=event.id, trace_id=trace_id, uri=artifact.uri, sha256=artifact.sha256)
    if wait_s:
        try:
            subject, body = await asyncio.wait_for(verdict, wait_s)
            result.outcome = "rejected" if subject == topology.DATASET_REJECTED else "accepted"
            result.verdict = body
            result.report = read_report(store, body.get("report_uri", ""))
        finally:
            for sub in subs:
                await sub.unsubscribe()
    return result


def describe_verdict(result: SubmitResult) -> str:
    if result.outcome == "accepted":
        v = msgspec.convert(result.verdict, DatasetAccepted)
        profile = f"  profile {v.profile}" if v.profile != "none" else ""
        return (f"accepted  dataset {v.dataset_id[:16]}  {v.num_rows} rows"
                f" ({v.num_rows_dropped} dropped)  priority {v.priority}{profile}\n  report {v.report_uri}")
    if result.outcome == "rejected":
        v = msgspec.convert(result.verdict, DatasetRejected)
        reasons = "\n".join(f"  - {r}" for r in v.reasons[:20])
        return f"rejected  {v.num_errors} errors\n{reasons}\n  report {v.report_uri}"
    return "submitted (not waiting for the verdict)"


def read_report(store: ArtifactStore, uri: str) -> dict | None:
    """The report behind a verdict's report_uri, if this machine shares the data directory."""
    try:
        return msgspec.json.decode(store.path_for(uri).read_bytes())
    except (ArtifactError, OSError, msgspec.DecodeError):
        return None


def check_progress(path: Path) -> tqdm:
    """A bar over the bytes checked, shown on a terminal for files over a few MB (gzip: no total)."""
    from services.gatekeeper.reading import GZIP_MAGIC  # the gatekeeper's own test, so the two agree

    size = path.stat().st_size
    with open(path, "rb") as fh:
        gzipped = fh.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    return tqdm(total=None if gzipped else size, unit="B", unit_scale=True, desc=f"checking {path.name}",
                disable=True if size < PROGRESS_ABOVE_BYTES else None, leave=False)


def describe_check(report: Report) -> str:
    """A dry run's verdict and its report, for a terminal."""
    if report.status == "accepted":
        verdict = f"would be accepted: {report.num_rows_valid:,} of {report.num_rows:,} rows kept"
    else:
        verdict = "would be rejected:\n" + "\n".join(f"  - {reason}" for reason in report.reasons[:20])
    return f"{verdict}\n{describe_report(msgspec.to_builtins(report))}"


_BAR = "█"
_FINDINGS_SHOWN = 3


def describe_report(report: dict, width: int = 40) -> str:
    """A validation report for a terminal: counts, each check's findings with line numbers, lengths."""
    out = [f"report    {report['report_uri']}"] if report.get("report_uri") else []
    out += [
        f"rows      {report['num_rows']:,} read, {report['num_rows_valid']:,} kept, {report['num_rows_dropped']:,} "
        f"dropped ({report['error_fraction']:.1%}); {report['num_errors']:,} errors, {report['num_warnings']:,} "
        f"warnings; {len(report.get('checks_run', []))} checks at level {report['level']}, schema {report['schema']}"
        + (f", profile {report['profile']}" if report.get("profile", "none") != "none" else ""),
    ]
    findings = report.get("findings", {})
    for severity in ("error", "warning"):
        checks = sorted(((name, f) for name, f in findings.items() if f["severity"] == severity),
                        key=lambda item: -item[1]["count"])
        if checks:
            out.append(f"{severity}s")
        for name, found in checks:
            lines = ", ".join(str(f["line"]) for f in found["findings"][:8] if f["line"])
            more = ", ..." if found["count"] > 8 and lines else ""
            where = f"  line {lines}{more}" if lines else ""
            out.append(f"  {name:<24}{found['count']:>8,}{where}")
            for finding in found["findings"][:_FINDINGS_SHOWN]:
                at = f"line {finding['line']}: " if finding["line"] else ""
                out.append(f"      {at}{finding['reason'][:160]}")
    lengths = report.get("lengths")
    if lengths and lengths.get("count"):
        out.append(f"lengths   tokens per row (max_length {lengths['max_length']}): min {lengths['min']}, "
                   f"p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']}; "
                   f"{lengths['over_max_length']:,} over max_length")
        top = max(b["count"] for b in lengths["histogram"]) or 1
        for b in lengths["histogram"]:
            span = f"{b['lo']}-{b['hi'] - 1}" if b["hi"] is not None else f">{b['lo'] - 1}"
            bar = _BAR * round(width * b["count"] / top) or ("▏" if b["count"] else "")
            out.append(f"  {span:>11}  {bar:<{width}} {b['count']:,}")
    return "\n".join(out)
