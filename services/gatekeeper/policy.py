"""The acceptance policy: whether a validated file is accepted, and the verdict's reasons.

- Any submission- or file-level error (unknown schema, uri outside the store, empty, binary,
  too large, a gzip bomb, no rows, ...) rejects the submission.
- Rows with errors are dropped (which row checks are errors is fixed per check: see
  checks.py and the modules it names). The file is rejected when no valid row remains, or
  when the share of rows with errors is above `max_error_fraction`: a file that is mostly
  wrong is more likely the wrong file than a few bad rows.
- Rows longer than max_length: the overlength setting, applied by the standard level
  (standard.py), makes them errors ("reject") or warnings that the trainer truncates
  ("truncate", unless no answer token would survive).
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
        return Decision(False, list(tally.fatal))
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
