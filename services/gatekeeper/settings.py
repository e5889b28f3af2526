"""The gatekeeper's typed settings (env `FLYWHEEL_GATEKEEPER_<FIELD>`, TOML section `[gatekeeper]`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from libs.common.events import Priority
from libs.common.settings import CommonSettings, Fraction, NonNegative, Positive, PositiveFloat

if TYPE_CHECKING:  # every service loads this module to know every setting's name: keep it light
    from services.gatekeeper.pipeline import ValidationConfig


class GatekeeperSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Empty: <data_dir>/inbox.
    inbox_dir: str = ""
    max_line_bytes: Positive = 1 << 20
    # Also the cap on what a gzip file may decompress to, and on an HTTP upload.
    max_file_bytes: Positive = 1 << 30
    # A file whose share of rows with errors is above this is rejected as a whole.
    max_error_fraction: Fraction = 0.1
    # An inbox file written in place is taken once unchanged for this long.
    settle_seconds: PositiveFloat = 1.0
    default_priority: Priority = "normal"
    # Standard level: rows are measured as the trainer encodes them, against the common
    # max_length (FLYWHEEL_MAX_LENGTH). Longer rows: "truncate" keeps them (a warning; an error
    # when no answer token survives the cut), "reject" drops them.
    overlength: Literal["truncate", "reject"] = "truncate"
    # Deep level: near duplicates at this estimated similarity or more are reported (warnings).
    near_duplicate_similarity: Fraction = 0.8
    # Deep level: rows held in the within-file duplicate index (~140 bytes each).
    max_dedup_rows: Positive = 1_000_000
    # Deep level: rows are compared with the last N accepted datasets, up to this many rows.
    recent_datasets: NonNegative = 16
    recent_rows: NonNegative = 250_000
    # Deep level: answers this long or longer are checked for leakage into the prompt.
    leakage_min_chars: NonNegative = 16
    leakage_fraction: Fraction = 0.5
    # Findings kept in a report per check; counts are always complete.
    max_findings: Positive = 100

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox_dir) if self.inbox_dir else Path(self.data_dir) / "inbox"

    @property
    def validation(self) -> ValidationConfig:
        from services.gatekeeper.pipeline import ValidationConfig
        from services.gatekeeper.reading import Limits

        return ValidationConfig(
            limits=Limits(max_line_bytes=self.max_line_bytes, max_file_bytes=self.max_file_bytes),
            max_length=self.max_length, overlength=self.overlength,
            near_duplicate_similarity=self.near_duplicate_similarity, max_dedup_rows=self.max_dedup_rows,
            leakage_min_chars=self.leakage_min_chars, leakage_fraction=self.leakage_fraction,
        )


SETTINGS = GatekeeperSettings
