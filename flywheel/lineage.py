"""`flywheel lineage [MODEL]`: a model's lineage as text, newest hop first, back to the base.

Formatting only: the lineage itself is built from the event history by `libs.common.lineage`
(`read_lineage`), the same the dashboard shows. A champion's accuracy is its sealed test's
("tested", with 95% intervals per level); "selection" lists the scores the deployer decided on.
"""

from __future__ import annotations

from datetime import datetime

from libs.common.lineage import (
    CheckpointRef,
    Dataset,
    Deployment,
    Hop,
    Lineage,
    Origin,
    Run,
    Score,
    SealedTest,
)

_LABEL = 10  # the width of a block's labels


def _when(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}" if t else "?"


def _ref(ref: CheckpointRef | None) -> str:
    if ref is None:
        return "?"
    where = f"run {ref.run_id}" + (f"@{ref.step}" if ref.step is not None else "") if ref.run_id else ref.uri
    return f"{ref.sha256[:12] or '?'} ({where})"


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "not finite"


def _line(label: str, text: str) -> str:
    return f"    {label:<{_LABEL}}{text}"


def _more(text: str) -> str:
    return f"    {'':<{_LABEL}}{text}"


def _run_lines(run: Run) -> list[str]:
    first = run.attempts[0] if run.attempts else None
    span = ""
    if first is not None and run.total_steps is not None:
        span = f"steps {first.start_step}→{run.total_steps}"
        if run.final_global_step is not None:
            span += f" (global {first.global_step - first.start_step}→{run.final_global_step})"
    done = (f"final loss {run.final_loss:.4f} in {run.duration_s:.1f} s" if run.finished is not None
            and run.final_loss is not None and run.duration_s is not None else "not finished")
    lines = [_line("run", f"{run.run_id}: {', '.join(p for p in (span, done) if p)}; "
                          f"{run.checkpoints_saved} checkpoint{'s' if run.checkpoints_saved != 1 else ''} saved")]
    if len(run.attempts) > 1:
        lines.append(_more(f"started {len(run.attempts)} times: " + ", ".join(
            f"{_when(a.started)} from step {a.start_step}" for a in run.attempts)))
    for f in run.failures:
        lines.append(_more(f"failed {_when(f.failed)}{' (retried)' if f.will_retry else ''}: {f.error}"))
    return lines


def _dataset_lines(d: Dataset) -> list[str]:
    lines = [
        _line("dataset", f"{d.name} ({d.dataset_id[:12]}), priority {d.priority}, {d.schema}: "
                         f"{d.num_rows} rows kept, {d.num_rows_dropped} dropped; accepted {_when(d.accepted)}"),
        _more(f"report {d.report_uri}"),
    ]
    if s := d.submission:
        how = "rows inline" if s.inline else s.uri
        lines.append(_more(f"submitted {_when(s.submitted)} by {s.submitted_by} via {s.channel} "
                           f"({how}; level {s.level}), submission {s.submission_id}"))
    elif d.channel:
        lines.append(_more(f"submitted by {d.submitted_by or '?'} via {d.channel}, submission {d.submission_id}"))
    else:
        lines.append(_more(f"submission {d.submission_id}"))
    if d.acceptances > 1:
        lines.append(_more(f"accepted {d.acceptances} times (submitted again)"))
    if len(d.trained_in) > 1:
        lines.append(_more(f"trained in {len(d.trained_in)} runs: {', '.join(d.trained_in)}"))
    return lines


def _levels_lines(levels: list[str]) -> list[str]:
    return [_more("  " + "   ".join(levels[start:start + 4])) for start in range(0, len(levels), 4)]


def _score_lines(scores: list[Score], label: str = "selection") -> list[str]:
    lines = []
    for i, s in enumerate(scores):
        head = (f"{s.suite} {s.suite_version}: exact_match {s.exact_match:.3f} "
                f"[95% {s.exact_match_low:.3f}, {s.exact_match_high:.3f}] on {s.num_examples}, "
                f"val_loss {_loss(s.val_loss)}, scored {_when(s.scored)}")
        lines.append(_line(label, head) if i == 0 else _more(head))
        levels = [f"{k} {v.accuracy:.3f} [{v.low:.2f}, {v.high:.2f}]" for k, v in sorted(s.levels.items())]
        lines += _levels_lines(levels or [f"{k} {v:.3f}" for k, v in sorted(s.by_level.items())])
        for r in s.regressions:
            lines.append(_more(f"  regression vs {s.compared_with[:12] or 'the champion'}: {r}"))
    return lines


def _test_lines(tests: list[SealedTest], deployed: bool) -> list[str]:
    """A champion's sealed test scores; a champion not yet tested says so, any other checkpoint nothing."""
    if not tests:
        return [_line("tested", "none stored (every champion is scored on the sealed test suite)")] if deployed else []
    lines = []
    for i, t in enumerate(tests):
        head = (f"{t.suite} {t.suite_version}: exact_match {t.exact_match:.3f} "
                f"[95% {t.exact_match_low:.3f}, {t.exact_match_high:.3f}] on {t.num_examples}, "
                f"val_loss {_loss(t.val_loss)}, tested {_when(t.tested)}")
        lines.append(_line("tested", head) if i == 0 else _more(head))
        lines += _levels_lines([f"{k} {v.accuracy:.3f} [{v.low:.2f}, {v.high:.2f}]" for k, v in sorted(t.levels.items())])
    return lines


def _deployment_lines(deployments: list[Deployment], label: str = "deployed") -> list[str]:
    lines = []
    for i, d in enumerate(deployments):
        over = f"over {_ref(d.previous)}" if d.previous else "as the first champion"
        head = f"{_when(d.deployed)} {d.kind} {over}"
        lines.append(_line(label, head) if i == 0 else _more(head))
        lines.append(_more(f"  why: {d.reason}"))
        if d.decision is not None:
            lines.append(_more(f"  decision: {d.decision.outcome} {_when(d.decision.time)}"
                               f" (requested by {d.decision.requested_by})"))
        if d.rolled_back:
            lines.append(_more(f"  rolled back {_when(d.replaced)}: {d.rollback_reason}"))
        elif d.replaced_by is not None:
            lines.append(_more(f"  replaced {_when(d.replaced)} by {_ref(d.replaced_by)}"))
        else:
            lines.append(_more("  still served"))
    return lines


def _traces(hop: Hop) -> list[str]:
    roles: dict[str, list[str]] = {}

    def add(trace_id: str, role: str) -> None:
        if trace_id and role not in roles.setdefault(trace_id, []):
            roles[trace_id].append(role)

    if hop.dataset:
        if hop.dataset.submission:
            add(hop.dataset.submission.trace_id, "submission")
        add(hop.dataset.trace_id, "dataset")
    if hop.run:
        for a in hop.run.attempts:
            add(a.trace_id, "run")
    add(hop.checkpoint.trace_id, "checkpoint")
    for s in hop.scores:
        add(s.trace_id, "score")
    for t in hop.tests:
        add(t.trace_id, "test")
    for d in hop.deployments:
        add(d.trace_id, "deployment")
    return [f"{trace_id} ({', '.join(r)})" for trace_id, r in roles.items()]


def _hop_lines(n: int, hop: Hop) -> list[str]:
    c = hop.checkpoint
    where = f"run {c.run_id or '?'}" + (f"@{c.step}" if c.step is not None else "")
    if c.global_step is not None:
        where += f" (global step {c.global_step})"
    final = ", final" if c.final else ", intermediate" if c.final is False else ""
    lines = [f"#{n}  checkpoint {c.sha256[:12] or '?'}  {where}{final}, saved {_when(c.saved)}",
             _line("uri", c.uri)]
    if hop.run:
        lines += _run_lines(hop.run)
    if hop.dataset:
        lines += _dataset_lines(hop.dataset)
    lines += _test_lines(hop.tests, bool(hop.deployments))
    lines += _score_lines(hop.scores) if hop.scores else [_line("selection", "none stored")]
    lines += _deployment_lines(hop.deployments) if hop.deployments else [_line("deployed", "never")]
    for i, d in enumerate(hop.decisions):
        text = f"{_when(d.time)} {d.outcome}: {d.reason}"
        lines.append(_line("decisions", text) if i == 0 else _more(text))
    traces = _traces(hop)
    for i, t in enumerate(traces):
        lines.append(_line("traces", t) if i == 0 else _more(t))
    if hop.parent:
        lines.append(_line("from", hop.parent))
    for note in hop.notes:
        lines.append(_line("note", note))
    return lines


def _origin_lines(origin: Origin) -> list[str]:
    if origin.kind == "aged_out":
        return [f"end  {origin.note}"]
    lines = [f"base  {origin.uri} (the base model)" if origin.uri else "base  the base model"]
    lines += _test_lines(origin.tests, bool(origin.deployments))
    if origin.scores:
        lines += _score_lines(origin.scores)
    if origin.deployments:
        lines += _deployment_lines(origin.deployments)
    return lines


def format_lineage(lineage: Lineage) -> str:
    asked = f"lineage of {lineage.query}" if lineage.query else "lineage of the served model"
    lines = [f"{asked}: {lineage.summary}"]
    if lineage.model is not None:
        lines.append(f"model     {lineage.model.uri}  sha256 {lineage.model.sha256 or '?'}")
    if lineage.champion is not None and not lineage.served:
        lines.append(f"champion  {_ref(lineage.champion)}")
    for n, hop in enumerate(lineage.hops, 1):
        lines += ["", *_hop_lines(n, hop)]
    if lineage.origin is not None:
        lines += ["", *_origin_lines(lineage.origin)]
    return "\n".join(lines)
