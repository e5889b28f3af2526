"""Typed settings: one struct per service, loaded from an optional TOML file and FLYWHEEL_* env.

Precedence (later wins): field defaults < TOML file (`FLYWHEEL_CONFIG`, sections `[common]` and
`[<service>]`) < environment < explicit overrides.

Names:
- a common field is set for every service at once: `FLYWHEEL_<FIELD>` / `[common]`. Values
  services must agree on (`max_length`, `base_model`, ...) live here, so they have one owner;
- a service's own field: `FLYWHEEL_<SERVICE>_<FIELD>` / `[<service>]`;
- `http_port` is common to all but set per service (`FLYWHEEL_TRAINER_HTTP_PORT`), since no two
  services may share a port.
A field whose type is itself a struct (the trainer's `Hyperparameters`) is read flat, by its
fields' names.

Nothing is ignored: every `FLYWHEEL_*` variable and every TOML section and key must name a
setting of some service, or loading stops with a `SettingsError` naming it and the nearest
valid name. A typo must never silently fall back to a default. Values are checked by their
types (`msgspec.Meta` bounds, `Literal`s) and each service's `__post_init__`.

Every service declares its settings class as `SETTINGS` in `services/<name>/settings.py`;
that is how the loader knows every valid name.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import tomllib
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from libs.common.log import mask_secrets_in

if typing.TYPE_CHECKING:
    from libs.common.nats_auth import NatsAuth

ENV_PREFIX = "FLYWHEEL_"
CONFIG_ENV = "FLYWHEEL_CONFIG"
# Variables with the prefix that are not settings: the config file, `flywheel up`'s own (where its
# nats-server listens: flywheel/supervisor.py), and the browser test's knobs
# (tests/services/dashboard/test_browser.py; CI exports FLYWHEEL_REQUIRE_BROWSER and
# FLYWHEEL_REQUIRE_PHOENIX for the whole suite).
NOT_SETTINGS = frozenset({CONFIG_ENV, "FLYWHEEL_NATS_LISTEN", "FLYWHEEL_REQUIRE_BROWSER", "FLYWHEEL_SCREENSHOT_DIR",
                          "FLYWHEEL_CHROMIUM", "FLYWHEEL_CHROMEDRIVER", "FLYWHEEL_REQUIRE_PHOENIX"})

# Variables of other tools read as settings (of the services that have the field).
FOREIGN_ENV = {"NATS_URL": "nats_url", "RAY_ADDRESS": "ray_address"}

# Where each service listens by default; tests and `flywheel up --port-base` override them.
DEFAULT_PORTS = {
    "inference": 8100,
    "gatekeeper": 8101,
    "trainer": 8102,
    "evaluator": 8103,
    "deployer": 8104,
    "curriculum": 8105,
    "dashboard": 8106,
}
SERVICES = tuple(DEFAULT_PORTS)
# Command-line tools read the common settings under this name; they have no own fields.
CLI = "cli"
# Common fields that are set per service only.
PER_SERVICE = frozenset({"http_port"})
# Common fields that a service may also set under its own prefix, which then wins:
# FLYWHEEL_TORCH_THREADS=1 with FLYWHEEL_TRAINER_TORCH_THREADS=2 gives the trainer two.
OVERRIDABLE = frozenset({"torch_threads"})

# Reusable constrained types: a bad value fails with the field's name.
Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# auto: cuda when present, else cpu.
Device = Annotated[str, msgspec.Meta(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]


class SettingsError(ValueError):
    """A setting is missing, unknown or malformed. The message names the culprit."""


class CommonSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings every service shares."""

    data_dir: Path = Path("data")
    # How artifacts (datasets, checkpoints) reach other hosts. "local": every service sees the
    # same data directory (one machine, or a shared disk). "nats": each host has its own and
    # they travel through the JetStream object store (set it on every host of the deployment).
    artifact_transport: Literal["local", "nats"] = "local"
    # Empty means "not set": `flywheel up` then starts an embedded nats-server.
    nats_url: str = ""
    # JetStream replicas of the streams and KV buckets Flywheel creates: 1 on one server, 3 on a
    # NATS cluster (an existing stream keeps a higher count an operator gave it).
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    # How long a service keeps trying to reach NATS at start before it exits (0: forever).
    nats_connect_deadline_s: NonNegativeFloat = 300.0
    # Credentials on a NATS server with authentication (README "Security"); all unset: none.
    # One of: a user and password; a .creds file (JWT and NKey seed); an NKey seed file (these two
    # need the `nkeys` package). The password is never logged (libs.common.log masks it).
    nats_user: str = ""
    nats_password: str = ""
    nats_creds_file: str = ""
    nats_nkey_seed_file: str = ""
    # TLS, when any is set: the CA the server's certificate must come from, and this client's own
    # certificate and key when the server verifies clients. A file that does not exist stops the
    # program, naming its setting.
    nats_tls_ca_file: str = ""
    nats_tls_cert_file: str = ""
    nats_tls_key_file: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http_host: str = "127.0.0.1"
    # Per service (FLYWHEEL_<SERVICE>_HTTP_PORT); defaults from DEFAULT_PORTS, 0 = any free port.
    http_port: Port = 0
    # A local HF model directory. Empty: the tiny Qwen3 model created under data_dir.
    base_model: str = ""
    # The longest token sequence the model is trained and scored on: the trainer cuts rows to
    # it, the gatekeeper measures rows against it, the evaluator scores within it. 256 suits the
    # embedded tiny model: every Binary row of levels 1-5 fits (the longest, level 5, is 227 of
    # its tokens; 6 and 7 need 269 and 301), and a SYLLO item, far beyond that model, is counted
    # wrong unasked instead of costing its evaluation a 192-token generation (2.8x the time of a
    # whole evaluation at 512). A real base model wants its own: 2,048 for SYLLO's answers.
    max_length: Annotated[int, msgspec.Meta(ge=16)] = 256
    # Threads for torch's CPU work in this process. 0: half the cores, at least one, because the
    # trainer and the evaluator (and inference) share a box: measured on 2 cores, scoring 16
    # items took 286 s with torch's default of one thread per core while the trainer ran, and
    # 21 s with one thread. A service may have its own (FLYWHEEL_TRAINER_TORCH_THREADS).
    torch_threads: NonNegative = 0

    @property
    def nats_servers(self) -> list[str]:
        if not self.nats_url:
            raise SettingsError("FLYWHEEL_NATS_URL (or NATS_URL) is not set and no embedded server runs")
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]

    @property
    def nats_auth(self) -> NatsAuth:
        """The NATS credentials and TLS files, checked (libs.common.nats_auth)."""
        from libs.common.nats_auth import NatsAuth

        return NatsAuth.from_settings(self)

    def service_dir(self, service: str) -> Path:
        """The folder a service owns under the data directory (created on demand)."""
        path = Path(self.data_dir) / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def artifacts_dir(self) -> Path:
        """The local artifact store every service shares (datasets, reports, checkpoints)."""
        return Path(self.data_dir) / "artifacts"


S = TypeVar("S", bound=CommonSettings)


# ---------------------------------------------------------------------------- names


def settings_class(service: str) -> type[CommonSettings]:
    """The settings class a service declares (`SETTINGS` in services/<service>/settings.py)."""
    if service == CLI:
        return CommonSettings
    if service not in SERVICES:
        raise SettingsError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
    return importlib.import_module(f"services.{service}.settings").SETTINGS


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _fields(cls: type[msgspec.Struct]) -> dict[str, tuple[str, ...]]:
    """Flat field name -> path into the struct (nested struct fields are read flat)."""
    flat: dict[str, tuple[str, ...]] = {}
    for field in msgspec.structs.fields(cls):
        if _is_struct(field.type):
            for name, path in _fields(field.type).items():
                flat[name] = (field.name, *path)
        else:
            flat[field.name] = (field.name,)
    return flat


def _list_fields(cls: type[msgspec.Struct]) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {name for name in cls.__struct_fields__ if typing.get_origin(hints.get(name)) is list}


def _dict_fields(cls: type[msgspec.Struct]) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {name for name in cls.__struct_fields__ if typing.get_origin(hints.get(name)) is dict}


def _json_object(key: str, raw: str) -> dict[str, Any]:
    """A dict setting is a JSON object in the environment: FLYWHEEL_DASHBOARD_SERVICE_URLS={"trainer": "http://t:8"}"""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{key}: must be a JSON object ({exc}), got {raw!r}") from exc
    if not isinstance(value, dict):
        raise SettingsError(f"{key}: must be a JSON object, got {raw!r}")
    return value


def _own_fields(cls: type[CommonSettings]) -> dict[str, tuple[str, ...]]:
    """What a service may set under its own prefix or section."""
    common = _fields(CommonSettings)
    own = {name: path for name, path in _fields(cls).items() if name not in common}
    own.update({name: common[name] for name in PER_SERVICE | OVERRIDABLE})
    return own


def _global_fields() -> dict[str, tuple[str, ...]]:
    return {name: path for name, path in _fields(CommonSettings).items() if name not in PER_SERVICE}


@cache
def _known_names(extra: tuple[tuple[str, type[CommonSettings]], ...] = ()) -> dict[str, tuple[str, str]]:
    """Every valid env variable -> (service or "common", field)."""
    names = {f"{ENV_PREFIX}{f.upper()}": ("common", f) for f in _global_fields()}
    classes = {service: settings_class(service) for service in SERVICES}
    classes.update(dict(extra))
    for service, cls in classes.items():
        for field in _own_fields(cls):
            names[f"{ENV_PREFIX}{service.upper()}_{field.upper()}"] = (service, field)
    return names


def _nearest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def env_name(service: str, field: str) -> str:
    """The variable that sets `field` for `service`."""
    if service == CLI or (field in _global_fields()):
        return f"{ENV_PREFIX}{field.upper()}"
    return f"{ENV_PREFIX}{service.upper()}_{field.upper()}"


# ---------------------------------------------------------------------------- sources


def _read_toml(path: Path, known: dict[str, dict[str, tuple[str, ...]]]) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SettingsError(f"{CONFIG_ENV} points at {path}, which does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from exc
    for section, values in data.items():
        if section not in known:
            raise SettingsError(f"{path}: unknown section [{section}]{_nearest(section, list(known))}"
                                f" (sections: {', '.join(known)})")
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: [{section}] must be a table of settings")
        for key in values:
            if key not in known[section]:
                raise SettingsError(f"{path}: [{section}] has no setting {key!r}{_nearest(key, list(known[section]))}")
    return data


def _check_environment(environ: dict[str, str], known: dict[str, tuple[str, str]]) -> None:
    for key in environ:
        if key.startswith(ENV_PREFIX) and key not in known and key not in NOT_SETTINGS:
            if key == f"{ENV_PREFIX}HTTP_PORT":
                raise SettingsError(f"{key}: http_port is set per service, e.g. {ENV_PREFIX}TRAINER_HTTP_PORT")
            raise SettingsError(f"{key} is not a Flywheel setting{_nearest(key, list(known))}")


def _nest(flat: dict[str, Any], paths: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = paths[name]
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def load_settings(cls: type[S], service: str, environ: dict[str, str] | None = None, **overrides: Any) -> S:
    """Build `cls` for `service` from defaults, TOML, env and explicit overrides (in that order)."""
    environ = dict(os.environ if environ is None else environ)
    extra = () if service == CLI else ((service, cls),)
    known_env = _known_names(extra)
    _check_environment(environ, known_env)

    own = {} if service == CLI else _own_fields(cls)
    flat: dict[str, Any] = {}
    if config := environ.get(CONFIG_ENV):
        sections = {"common": _global_fields(), **{s: _own_fields(settings_class(s)) for s in SERVICES}}
        if service != CLI:
            sections[service] = own
        data = _read_toml(Path(config), sections)
        flat.update(data.get("common", {}))
        flat.update(data.get(service, {}))
    # The tools' own variables, where a setting means the same: NATS_URL, and Ray's RAY_ADDRESS
    # (the trainer's cluster). A FLYWHEEL_* variable of the setting wins over them.
    fields = set(cls.__struct_fields__)
    for variable, name in FOREIGN_ENV.items():
        if name in fields and environ.get(variable) and not any(
                environ.get(f"{ENV_PREFIX}{owner}{name.upper()}") for owner in ("", f"{service.upper()}_")):
            flat[name] = environ[variable]
    lists, dicts = _list_fields(cls), _dict_fields(cls)
    # Common variables first, so the service's own (FLYWHEEL_TRAINER_TORCH_THREADS) win.
    for key, raw in sorted(environ.items(), key=lambda item: known_env.get(item[0], ("",))[0] == service):
        owner = known_env.get(key)
        if owner and owner[0] in ("common", service):
            # A list setting is comma-separated in the environment: FLYWHEEL_CURRICULUM_SKILLS=binary,syllo
            flat[owner[1]] = [item.strip() for item in raw.split(",") if item.strip()] if owner[1] in lists else raw
            if owner[1] in dicts:  # a JSON object (_json_object)
                flat[owner[1]] = _json_object(key, raw)
    flat.update(overrides)
    if service in DEFAULT_PORTS and "http_port" not in flat:
        flat["http_port"] = DEFAULT_PORTS[service]
    paths = {**_fields(cls)}
    if unknown := set(flat) - set(paths):
        raise SettingsError(f"{service} has no setting(s) {sorted(unknown)}")
    try:
        settings = msgspec.convert(_nest(flat, paths), cls, strict=False, dec_hook=_decode_extra)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc, service, flat)) from exc
    settings.nats_auth  # noqa: B018 - a missing credentials or TLS file stops loading, naming its setting
    return settings


# `$.limits[...]`: an item of a dict or list setting is named by the setting.
_AT = re.compile(r"at `\$\.(?:[A-Za-z_]+\.)*([A-Za-z_]+)(?:\[[^\]]*\])*`")
# A service's own cross-field check raises SettingsError("<field>: why").
_NAMED = re.compile(r"^([a-z_]+): ")


def _explain(exc: msgspec.ValidationError, service: str, given: dict[str, Any]) -> str:
    """msgspec says `... - at $.batch_size`; say which variable to fix and what it was."""
    text = str(exc)
    if match := _AT.search(text):
        field = match.group(1)
        got = f" (it is {given[field]!r})" if field in given else ""
        return f"{env_name(service, field)}: {text[:match.start()].rstrip(' -')}{got}"
    if match := _NAMED.match(text):
        return f"{env_name(service, match.group(1))}: {text[match.end():]}"
    return f"{service} settings: {text}"


def _decode_extra(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    raise NotImplementedError(f"cannot read {kind} from settings")


def load_all(environ: dict[str, str] | None = None, **overrides: Any) -> dict[str, CommonSettings]:
    """Every service's settings, checked at once (`flywheel up` does this before starting any)."""
    return {s: load_settings(settings_class(s), s, environ, **overrides) for s in SERVICES}


def describe(settings: msgspec.Struct) -> dict[str, Any]:
    """Settings as a loggable dict, with anything secret masked (the log's one rule)."""
    return mask_secrets_in(msgspec.to_builtins(settings, enc_hook=str))
