"""The inference service's typed settings (env `FLYWHEEL_INFERENCE_<FIELD>`, TOML section `[inference]`)."""

from __future__ import annotations

from typing import Literal

from libs.common.settings import CommonSettings, Device, Positive, PositiveFloat, SettingsError


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
    # Requests admitted at once (generating or waiting for a place in the batch); one more gets 429.
    max_pending: Positive = 256
    # A request still generating after this many seconds is stopped (504, or an error event in its stream).
    request_timeout_s: PositiveFloat = 600.0
    # The continuous-batching engine: requests and tokens in one forward pass, and the KV cache's
    # capacity in tokens over all requests in flight (fp32 on CPU: Qwen3-0.6B takes 112 KiB a token).
    max_batch_requests: Positive = 64
    max_batch_tokens: Positive = 2048
    kv_cache_tokens: Positive = 16384
    device: Device = "auto"
    # The generation engine: "transformers" (continuous batching, paged attention; CPU or GPU),
    # "vllm" (CUDA only), or "auto": vllm where a CUDA device is used and vllm is installed.
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    # The served model id is "<model_name>:<checkpoint>".
    model_name: str = "flywheel"
    # How this replica names itself when it reports serving a staged deployment (model.serving);
    # empty: "<hostname>-<pid>".
    replica_id: str = ""

    def __post_init__(self) -> None:
        if self.api_key and self.api_key_file:
            raise SettingsError("api_key: set api_key or api_key_file, not both")
        if self.kv_cache_tokens < self.max_tokens_limit:
            raise SettingsError(f"kv_cache_tokens: must hold at least one request's max_tokens_limit "
                                f"({self.max_tokens_limit}), got {self.kv_cache_tokens}")
        if not self.model_name or ":" in self.model_name:
            raise SettingsError(f"model_name: must be non-empty without ':', got {self.model_name!r}")


SETTINGS = InferenceSettings
