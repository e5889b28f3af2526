"""Which generation engine serves the model: transformers' continuous batching, or vLLM where it can run.

The `backend` setting (services/inference/settings.py):
- "transformers": services/inference/transformers_backend.py, on any device;
- "vllm": services/inference/vllm_backend.py; needs vLLM installed and the device to be the
  first visible CUDA GPU ("cuda" or "cuda:0": vLLM picks its GPU through CUDA_VISIBLE_DEVICES,
  not a device name), else a SettingsError naming `backend`;
- "auto": "vllm" where the device resolves to that GPU (libs.common.models.pick_device) and vLLM
  is importable, else "transformers".

vLLM is never imported here (only looked up): this module imports where it is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from libs.common.models import pick_device
from libs.common.settings import SettingsError
from services.inference.generation import Backend

BACKENDS = ("auto", "transformers", "vllm")
# The devices vLLM can be told to use: it runs on the first visible CUDA device.
VLLM_DEVICES = ("cuda", "cuda:0")
# Limits only the vLLM backend takes (the transformers ones are EngineLimits' fields).
VLLM_ONLY_LIMITS = frozenset({"gpu_memory_utilization"})
# The EngineLimits fields the vLLM backend takes too (under the same names).
VLLM_SHARED_LIMITS = frozenset({"max_batch_requests", "max_batch_tokens"})


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(setting: str, device: str) -> str:
    """"transformers" or "vllm" for the `backend` setting on `device` ("auto" resolved); SettingsError if it cannot run."""
    if setting not in BACKENDS:
        raise SettingsError(f"backend: must be one of {', '.join(BACKENDS)}, got {setting!r}")
    if setting == "transformers":
        return "transformers"
    resolved = pick_device(device)
    on_gpu = resolved in VLLM_DEVICES
    if setting == "auto":
        return "vllm" if on_gpu and vllm_installed() else "transformers"
    if not on_gpu:
        raise SettingsError(
            f"backend: vllm runs on the first visible CUDA GPU (device cuda or cuda:0; choose the GPU with "
            f"CUDA_VISIBLE_DEVICES), but the device is {resolved!r}; use backend transformers or auto"
        )
    if not vllm_installed():
        raise SettingsError("backend: vllm is not installed in this environment (it needs a CUDA build of torch); "
                            "install it or use backend transformers or auto")
    return "vllm"


def make_backend(setting: str, device: str, **limits) -> Backend:
    """A new, unloaded backend of the kind `choose_backend` picks, with the engine limits it takes.

    `limits`: EngineLimits' fields (max_batch_requests, max_batch_tokens, kv_cache_tokens,
    page_size) and `gpu_memory_utilization` (vLLM only). Each backend takes what applies to it:
    vLLM sizes its KV cache from its share of GPU memory, so kv_cache_tokens and page_size apply
    to transformers only, and gpu_memory_utilization to vLLM only. A name neither knows is a TypeError.
    """
    from services.inference.transformers_backend import EngineLimits

    engine_fields = {f.name for f in dataclasses.fields(EngineLimits)}
    unknown = set(limits) - engine_fields - VLLM_ONLY_LIMITS
    if unknown:
        raise TypeError(f"make_backend: unknown engine limits {sorted(unknown)}")
    if choose_backend(setting, device) == "vllm":
        from services.inference.vllm_backend import VllmBackend

        return VllmBackend(pick_device(device),
                           **{k: v for k, v in limits.items() if k in VLLM_SHARED_LIMITS | VLLM_ONLY_LIMITS})
    from services.inference.transformers_backend import TransformersBackend

    return TransformersBackend(device, EngineLimits(**{k: v for k, v in limits.items() if k in engine_fields}))
