"""Base models: the embedded tiny Qwen3 and the one loading path every model takes.

With no base model configured, Flywheel creates (once, under a file lock, so concurrent
services agree) a tiny Qwen3-architecture model of a few million parameters and a byte-level
BPE tokenizer trained locally with the `tokenizers` library, with a ChatML chat template, all
saved in Hugging Face format. It is then loaded through AutoModelForCausalLM / AutoTokenizer,
exactly like a real local base model directory (e.g. a Qwen3-0.6B download).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny-qwen3"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2/Qwen3's pre-tokenizer split: every digit (\p{N}: 0-9 and the circled ⓪ ①) is a piece of its
# own, so BPE never merges runs of digits into tokens like "①⓪①①" or " 18" and the model can
# line up the digits of operands and results (with merged digits it answered held-out Binary
# problems by memory). The cost, measured with bench.gatekeeper (100k rows, one run): the
# standard level tokenizes 12.2k rows/s instead of 16.1k, as a row takes 91 tokens instead of 78
# (11.3k and 99 tokens since Binary's decimal step goes column by column).
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen uses, with {% generation %} markers so HF's assistant masks work too.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ENGLISH = """
You are a helpful assistant. Answer the question briefly and exactly.
Convert this binary number to decimal. Add these two binary numbers. Subtract, multiply and
shift the numbers. Show your work in prefix notation. Verification: the result is correct.
What is the answer? The answer is. Please explain the steps. First, then, finally.
The quick brown fox jumps over the lazy dog. Hello, how can I help you today?
Solve the puzzle: find the word made of these syllables. Thank you for the data.
"""


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Text to train the tiny tokenizer on: English, and rows of every level of every skill.

    The skills' own problems, so their words ("Step", "todecimal", SYLLO's rules) are single
    tokens; digits are split off before BPE runs (QWEN_PRETOKENIZE), so numbers never merge.
    """
    from libs.common.skills import SKILLS  # noqa: PLC0415 - the skills need nothing from here

    lines = [line.strip() for line in _ENGLISH.strip().splitlines()]
    for skill in SKILLS.values():
        for level in range(1, skill.max_level + 1):
            for row in skill.generate(level, 60, seed=seed):
                lines.extend(message["content"] for message in row["messages"])
    return lines


def create_tiny_model(target: Path, *, hidden_size: int = 128, layers: int = 4, vocab_size: int = 4096, seed: int = 0) -> Path:
    """Build the tiny model and tokenizer into `target` (which must not exist).

    128 wide rather than 256: measured on Binary level 1 (batch 32, one CPU thread, held-out
    items), 1.3M parameters got 41 of 82 held-out sums right after 1,000 steps at 0.52 s a step,
    where 4.2M parameters got 14 of 82 at 1.17 s a step: the narrow model learns faster per
    step and takes half the time a step.
    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def ensure_base_model(data_dir: Path, configured: str = "") -> Path:
    """The base model directory: `configured` if given (must exist), else the tiny default."""
    if configured:
        path = Path(configured).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"base model {path} is not a Hugging Face model directory (no config.json); "
                "set FLYWHEEL_BASE_MODEL to a local model folder or leave it empty for the tiny default"
            )
        return path
    models_dir = Path(data_dir) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / TINY_MODEL_NAME
    with open(models_dir / ".create.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            # Build aside and rename: a crash never leaves a half-written model behind.
            staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=".staging-"))
            try:
                create_tiny_model(staging / "model")
                if target.exists():
                    shutil.rmtree(target)
                (staging / "model").rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def eos_ids(configured, tokenizer) -> list[int]:
    """The ids that end a generation: `configured` (a generation config's eos_token_id: one id, a
    list, or None), else the tokenizer's EOS; sorted, [] when neither names one."""
    eos = configured if configured is not None else tokenizer.eos_token_id
    if eos is None:
        return []
    return sorted({int(e) for e in eos}) if isinstance(eos, (list, tuple)) else [int(eos)]


def spawn_engine_children() -> None:
    """Make vLLM start its engine core process by spawn, never fork (unless the operator chose).

    The serving process has threads (the event loop, other engines) and, after a weights check,
    CUDA initialised, which a forked child cannot use. Process setup, like OMP_NUM_THREADS in
    libs.common.runtime: services never touch the environment themselves.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, device: str = "cpu", *, for_training: bool = False, attn_implementation: str | None = None):
    """AutoModelForCausalLM from a local directory; bf16 on GPU, fp32 on CPU.

    `attn_implementation`: transformers' name ("sdpa", "flash_attention_2", ...); None: its default.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **extra)
    model.to(device)
    model.train(for_training)
    return model
