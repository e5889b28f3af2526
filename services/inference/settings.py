"""The inference service's typed settings (env `FLYWHEEL_INFERENCE_<FIELD>`, TOML section `[inference]`)."""

from __future__ import annotations

from libs.common.settings import CommonSettings, Device, Positive, SettingsError


class InferenceSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # The main bearer key (role admin: /v1/*, /models/*): given inline, or as a file read at
    # start. With neither, one is generated once into data_dir/secrets/inference_api_key.
    api_key: str = ""
    api_key_file: str = ""
    # More keys, each named and with a role (read: /v1/* and GET /models/info; admin: also
    # POST /models/reload): a TOML file read at start, format in services/inference/auth.py.
    api_keys_file: str = ""
    # The most tokens one request may generate, whatever it asks for.
    max_tokens_limit: Positive = 256
    device: Device = "auto"
    # The served model id is "<model_name>:<checkpoint>".
    model_name: str = "flywheel"
    # How this replica names itself when it reports serving a staged deployment (model.serving);
    # empty: "<hostname>-<pid>".
    replica_id: str = ""

    def __post_init__(self) -> None:
        if self.api_key and self.api_key_file:
            raise SettingsError("api_key: set api_key or api_key_file, not both")
        if not self.model_name or ":" in self.model_name:
            raise SettingsError(f"model_name: must be non-empty without ':', got {self.model_name!r}")


SETTINGS = InferenceSettings
