"""The gatekeeper's typed settings (env `FLYWHEEL_GATEKEEPER_<FIELD>`, TOML section `[gatekeeper]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from libs.common.events import Priority
from libs.common.settings import CommonSettings, SettingsError
from services.gatekeeper.framing import Limits
from services.gatekeeper.validation import ValidationConfig


class GatekeeperSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    http_port: int = 0
    # Empty: <data_dir>/inbox.
    inbox_dir: str = ""
    max_line_bytes: int = 1 << 20
    # Also the cap on what a gzip file may decompress to, and on an HTTP upload.
    max_file_bytes: int = 1 << 30
    # A file whose share of rows with errors is above this is rejected as a whole.
    max_error_fraction: float = 0.1
    # An inbox file written in place is taken once unchanged for this long.
    settle_seconds: float = 1.0
    default_priority: Priority = "normal"
    # Standard level: rows are measured as the trainer encodes them. Keep max_length equal to
    # the trainer's (FLYWHEEL_TRAINER_MAX_LENGTH). Longer rows: "truncate" keeps them (a
    # warning; an error when no answer token survives the cut), "reject" drops them.
    max_length: int = 512
    overlength: Literal["truncate", "reject"] = "truncate"
    # Deep level: near duplicates at this estimated similarity or more are reported (warnings).
    near_duplicate_similarity: float = 0.8
    # Deep level: rows held in the within-file duplicate index (~140 bytes each).
    max_dedup_rows: int = 1_000_000
    # Deep level: rows are compared with the last N accepted datasets, up to this many rows.
    recent_datasets: int = 16
    recent_rows: int = 250_000
    # Deep level: answers this long or longer are checked for leakage into the prompt.
    leakage_min_chars: int = 16
    leakage_fraction: float = 0.5
    # Findings kept in a report per check; counts are always complete.
    max_findings: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_error_fraction", "near_duplicate_similarity", "leakage_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"gatekeeper {name} must be within [0, 1], got {getattr(self, name)}")
        for name in ("max_line_bytes", "max_file_bytes", "max_length", "max_findings", "max_dedup_rows"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"gatekeeper {name} must be positive, got {getattr(self, name)}")
        for name in ("recent_datasets", "recent_rows", "leakage_min_chars"):
            if getattr(self, name) < 0:
                raise SettingsError(f"gatekeeper {name} must not be negative, got {getattr(self, name)}")
        if self.settle_seconds <= 0:
            raise SettingsError(f"gatekeeper settle_seconds must be positive, got {self.settle_seconds}")

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox_dir) if self.inbox_dir else Path(self.data_dir) / "inbox"

    @property
    def validation(self) -> ValidationConfig:
        return ValidationConfig(
            limits=Limits(max_line_bytes=self.max_line_bytes, max_file_bytes=self.max_file_bytes),
            max_length=self.max_length, overlength=self.overlength,
            near_duplicate_similarity=self.near_duplicate_similarity, max_dedup_rows=self.max_dedup_rows,
            leakage_min_chars=self.leakage_min_chars, leakage_fraction=self.leakage_fraction,
        )
