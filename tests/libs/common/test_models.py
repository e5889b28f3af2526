import json
from pathlib import Path

import pytest

from libs.common.models import ensure_base_model

pytestmark = pytest.mark.slow


def test_tiny_model_loads_through_the_auto_classes(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < params < 20_000_000
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "add ① ①"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3 or out[0, -1].item() == tok.eos_token_id


def test_created_once_and_reused(tmp_path: Path):
    first = ensure_base_model(tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_base_model(tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "models").glob(".staging-*"))


def test_configured_base_model_must_be_a_model_dir(tmp_path: Path, tiny_model_dir: Path):
    assert ensure_base_model(tmp_path, str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="config.json"):
        ensure_base_model(tmp_path, str(tmp_path / "nothing"))
