"""The gatekeeper's typed settings (env `FLYWHEEL_GATEKEEPER_<FIELD>`, TOML section `[gatekeeper]`)."""

from __future__ import annotations

from pathlib import Path

from libs.common.events import Priority
from libs.common.settings import CommonSettings, SettingsError


class GatekeeperSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    http_port: int = 0
    # Empty: <data_dir>/inbox.
    inbox_dir: str = ""
    max_line_bytes: int = 1 << 20
    max_file_bytes: int = 1 << 30
    # A file whose share of rows with errors is above this is rejected as a whole.
    max_error_fraction: float = 0.1
    # An inbox file written in place is taken once unchanged for this long.
    settle_seconds: float = 1.0
    default_priority: Priority = "normal"
    # Standard-level token check: rows are measured as the trainer encodes them, cut at this
    # length. Keep it equal to the trainer's max_length (FLYWHEEL_TRAINER_MAX_LENGTH).
    max_tokens: int = 512
    # Findings kept in a report; counts per check are always complete.
    max_findings: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise SettingsError(f"gatekeeper max_error_fraction must be within [0, 1], got {self.max_error_fraction}")
        for name in ("max_line_bytes", "max_file_bytes", "max_tokens", "max_findings"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"gatekeeper {name} must be positive, got {getattr(self, name)}")
        if self.settle_seconds <= 0:
            raise SettingsError(f"gatekeeper settle_seconds must be positive, got {self.settle_seconds}")

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox_dir) if self.inbox_dir else Path(self.data_dir) / "inbox"
