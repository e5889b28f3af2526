"""The audit of a load run: did every submission get exactly one verdict, and the one it should?

What "one verdict" means, from how the gatekeeper answers (services/gatekeeper/pipeline.py):
- every submission, whatever its channel, ends in exactly one message in the DATASETS stream:
  `dataset.accepted.<priority>` or `dataset.rejected`, carrying its name and submission id;
- a valid dataset is accepted, an invalid one rejected;
- the same content submitted more than once (a group: an original and its resubmissions, through
  other channels, possibly racing each other) is accepted once, for whichever submission claimed
  it first; each other member is answered with one `dataset.rejected` whose report has status
  "duplicate" and `duplicate_of` the accepted member's submission id;
- a dataset id is announced as accepted at most once in the stream.
An HTTP submission's reply is a verdict too: it must agree with its stream message.

The counts: `lost` submissions with no verdict; `duplicated` verdict messages beyond the one each
submission gets, plus acceptances of one dataset id for more than one submission; `wrong` submissions whose one
verdict is not the one expected (or whose report, or HTTP reply, says otherwise), and verdicts
for names nobody submitted. Pure logic: the benchmark reads the stream and the reports.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["accepted", "rejected", "duplicate"]


@dataclass(frozen=True)
class Expected:
    """What one submission should get: `accepted` or `rejected`; in a group, one of them accepted."""

    name: str
    expect: Literal["accepted", "rejected"]
    # The name of the group's first member when the same content is submitted more than once.
    group: str = ""


@dataclass(frozen=True)
class Verdict:
    """One verdict message in the stream, with the report it points to."""

    name: str
    submission_id: str
    event: Literal["accepted", "rejected"]  # the subject it was published on
    report_status: str  # the report's status ("" when the report could not be read)
    dataset_id: str = ""  # accepted: the dataset announced
    duplicate_of: str = ""  # the report's, for a duplicate


@dataclass
class Audit:
    submissions: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0
    wrong: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    multiple: int = 0  # submissions with more than one verdict

    @property
    def exactly_one(self) -> int:
        return self.submissions - len(self.lost) - self.multiple

    def figures(self) -> dict:
        return {"accepted": self.kinds["accepted"], "rejected": self.kinds["rejected"],
                "duplicate": self.kinds["duplicate"], "exactly_one": self.exactly_one, "wrong": len(self.wrong)}


def kind_of(verdict: Verdict) -> Kind | None:
    """The verdict's kind when its event and its report agree, else None."""
    if verdict.event == "accepted":
        return "accepted" if verdict.report_status == "accepted" and verdict.dataset_id else None
    return verdict.report_status if verdict.report_status in ("rejected", "duplicate") else None  # type: ignore[return-value]


def audit(expected: Iterable[Expected], verdicts: Iterable[Verdict],
          replies: dict[str, tuple[str, str]] | None = None) -> Audit:
    """Check `verdicts` (every verdict message in the stream) against `expected`.

    `replies`: name -> (submission id, status) of each HTTP reply, to agree with the stream.
    """
    expected = list(expected)
    by_name: dict[str, list[Verdict]] = defaultdict(list)
    for verdict in verdicts:
        by_name[verdict.name].append(verdict)
    result = Audit(submissions=len(expected))
    planned = {e.name for e in expected}
    for name in by_name.keys() - planned:
        result.wrong.append(f"{name}: a verdict for a submission nobody made")
        result.duplicated += len(by_name[name])

    one: dict[str, Verdict] = {}
    for e in expected:
        found = by_name.get(e.name, [])
        if not found:
            result.lost.append(e.name)
            continue
        if len(found) > 1:
            result.multiple += 1
            result.duplicated += len(found) - 1
        verdict = found[0]
        kind = kind_of(verdict)
        result.kinds[kind or "unreadable"] += 1
        if kind is None:
            result.wrong.append(f"{e.name}: its event ({verdict.event}) and its report ({verdict.report_status!r}) disagree")
        elif len(found) == 1:
            one[e.name] = verdict
        if replies and e.name in replies and kind is not None:
            sid, status = replies[e.name]
            if (sid, status) != (verdict.submission_id, kind):
                result.wrong.append(f"{e.name}: the HTTP reply said {status} ({sid}), the stream {kind} "
                                    f"({verdict.submission_id})")

    groups: dict[str, list[Expected]] = defaultdict(list)
    for e in expected:
        if e.group:
            groups[e.group].append(e)
        elif (verdict := one.get(e.name)) is not None and kind_of(verdict) != e.expect:
            result.wrong.append(f"{e.name}: {kind_of(verdict)}, expected {e.expect}")
    for group, members in groups.items():
        seen = [one[m.name] for m in members if m.name in one]
        accepted = [v for v in seen if kind_of(v) == "accepted"]
        if len(seen) == len(members) and len(accepted) != 1:
            result.wrong.append(f"group {group}: {len(accepted)} of {len(members)} accepted, expected exactly 1")
        if len(accepted) == 1:
            first = accepted[0].submission_id
            for v in seen:
                if v is not accepted[0] and (kind_of(v) != "duplicate" or v.duplicate_of != first):
                    result.wrong.append(f"{v.name}: {kind_of(v)} (duplicate_of {v.duplicate_of!r}), expected a "
                                        f"duplicate of {first}")

    # A dataset accepted for two submissions (two names) is trained twice; one name's repeats are counted above.
    announced: dict[str, set[str]] = defaultdict(set)
    for found in by_name.values():
        for v in found:
            if v.event == "accepted":
                announced[v.dataset_id].add(v.name)
    result.duplicated += sum(len(names) - 1 for names in announced.values())
    return result
