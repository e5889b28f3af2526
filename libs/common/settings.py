"""Typed settings: one struct per service, loaded from an optional TOML file and FLYWHEEL_* env.

Precedence (later wins): field defaults < TOML file (`FLYWHEEL_CONFIG`, sections `[common]` and
`[<service>]`) < environment. Common fields read `FLYWHEEL_<FIELD>`; a service's own fields
read `FLYWHEEL_<SERVICE>_<FIELD>`. Anything unknown or of the wrong type stops the service
with a message naming the variable: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

ENV_PREFIX = "FLYWHEEL_"
CONFIG_ENV = "FLYWHEEL_CONFIG"

# Where each service listens by default; tests and `flywheel up --port-base` override them.
DEFAULT_PORTS = {
    "inference": 8100,
    "gatekeeper": 8101,
    "trainer": 8102,
    "evaluator": 8103,
    "deployer": 8104,
    "curriculum": 8105,
}
SERVICES = tuple(DEFAULT_PORTS)


class SettingsError(ValueError):
    """A setting is missing, unknown or malformed. The message names the culprit."""


class CommonSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings every service shares."""

    data_dir: Path = Path("data")
    # Empty means "not set": `flywheel up` then starts an embedded nats-server.
    nats_url: str = ""
    log_level: str = "info"
    http_host: str = "127.0.0.1"
    # A local HF model directory. Empty: the tiny Qwen3 model created under data_dir.
    base_model: str = ""

    def __post_init__(self) -> None:
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise SettingsError(f"log_level must be debug/info/warning/error, got {self.log_level!r}")

    @property
    def nats_servers(self) -> list[str]:
        if not self.nats_url:
            raise SettingsError("FLYWHEEL_NATS_URL (or NATS_URL) is not set and no embedded server runs")
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]

    def service_dir(self, service: str) -> Path:
        """The folder a service owns under the data directory (created on demand)."""
        path = Path(self.data_dir) / service
        path.mkdir(parents=True, exist_ok=True)
        return path


S = TypeVar("S", bound=CommonSettings)


def _common_fields() -> set[str]:
    return set(CommonSettings.__struct_fields__)


def _read_toml(path: Path, service: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SettingsError(f"{CONFIG_ENV} points at {path}, which does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from exc
    merged: dict[str, Any] = {}
    merged.update(data.get("common", {}))
    merged.update(data.get(service, {}))
    return merged


def _read_env(cls: type[S], service: str, environ: dict[str, str]) -> dict[str, Any]:
    fields = set(cls.__struct_fields__)
    common = _common_fields()
    own_prefix = f"{ENV_PREFIX}{service.upper()}_"
    values: dict[str, Any] = {}
    if environ.get("NATS_URL") and not environ.get(f"{ENV_PREFIX}NATS_URL"):
        values["nats_url"] = environ["NATS_URL"]
    for key, raw in environ.items():
        if key.startswith(own_prefix):
            name = key[len(own_prefix):].lower()
            if name not in fields or name in common:
                raise SettingsError(
                    f"{key}: {service} has no setting {name!r}; known: {sorted(fields - common)}"
                )
            values[name] = raw
        elif key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            if name in common:
                values[name] = raw
    return values


def load_settings(cls: type[S], service: str, environ: dict[str, str] | None = None, **overrides: Any) -> S:
    """Build `cls` for `service` from defaults, TOML, env and explicit overrides (in that order)."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    if config := environ.get(CONFIG_ENV):
        values.update(_read_toml(Path(config), service))
    values.update(_read_env(cls, service, environ))
    values.update(overrides)
    if "http_port" in cls.__struct_fields__ and "http_port" not in values:
        values["http_port"] = DEFAULT_PORTS.get(service, 0)
    try:
        return msgspec.convert(values, cls, strict=False, dec_hook=_decode_extra)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{service} settings: {exc}") from exc


def _decode_extra(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    raise NotImplementedError(f"cannot read {kind} from settings")


def describe(settings: msgspec.Struct) -> dict[str, Any]:
    """Settings as a loggable dict, with anything secret-looking masked."""
    shown = msgspec.to_builtins(settings, enc_hook=str)
    for key in list(shown):
        if key.endswith(("key", "secret", "password", "token")):
            shown[key] = "***" if shown[key] else ""
    return shown
