"""The acceptance policy: whether a validated file is accepted, and the reasons when it is not.

- Any submission- or file-level error (unknown schema, uri outside the store, empty, binary,
  too large, no rows, ...) rejects the submission.
- Rows with errors are dropped. The file is rejected when no valid row remains, or when the
  share of rows with errors is above `max_error_fraction` (a file that is mostly wrong is
  more likely the wrong file than a few bad rows).
- Warnings never reject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.gatekeeper.checks import Tally


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reasons: list[str] = field(default_factory=list)


def decide(tally: Tally, max_error_fraction: float) -> Decision:
    if tally.fatal:
        return Decision(False, [f"{f.check}: {f.reason}" for f in tally.fatal])
    if tally.num_rows_valid == 0:
        return Decision(False, [
            f"no valid rows: all {tally.num_rows} rows have errors; most common: {tally.most_common_errors()}"
        ])
    if tally.error_fraction > max_error_fraction:
        return Decision(False, [
            f"{tally.num_rows_dropped} of {tally.num_rows} rows ({tally.error_fraction:.1%}) have errors, "
            f"above the limit of {max_error_fraction:.1%}; most common: {tally.most_common_errors()}"
        ])
    return Decision(True)
