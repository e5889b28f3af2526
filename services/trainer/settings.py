"""The trainer's typed settings (env `FLYWHEEL_TRAINER_<FIELD>`, or `[trainer]` in the TOML file).

The defaults suit the embedded tiny model trained from scratch: it needs a learning rate of
1e-3 to move at all within a few hundred steps. A real pretrained base model (Qwen3-0.6B)
wants something like 1e-5 to 2e-5; set FLYWHEEL_TRAINER_LEARNING_RATE for it.
"""

from __future__ import annotations

from libs.common.settings import CommonSettings, SettingsError


class TrainerSettings(CommonSettings, kw_only=True, forbid_unknown_fields=True):
    http_port: int = 0
    batch_size: int = 8
    max_length: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    epochs: int = 2
    # 0 = no cap: train every epoch of every dataset.
    max_steps: int = 0
    save_every_steps: int = 50
    progress_every_steps: int = 5
    # A progress event also goes out when this much time passed since the last one.
    progress_every_s: float = 2.0
    seed: int = 0
    # auto: cuda when present (fp32 weights, bf16 autocast), else cpu.
    device: str = "auto"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("batch_size", "max_length", "epochs", "save_every_steps", "progress_every_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"trainer {name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_steps", "weight_decay", "grad_clip", "progress_every_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"trainer {name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise SettingsError(f"trainer learning_rate must be > 0, got {self.learning_rate}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise SettingsError(f"trainer device must be auto, cpu or cuda[:N], got {self.device!r}")
