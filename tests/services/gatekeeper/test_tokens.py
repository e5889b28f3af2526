"""The standard level: exact token counts (fast layout vs the trainer's encode_chat), and its checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from libs.common.chat import ChatMessage, TemplateError, encode_chat, encode_text
from libs.common.models import load_tokenizer
from services.gatekeeper.checks import Tally
from services.gatekeeper.checks.standard import LengthStats, TokenCounter
from services.gatekeeper.pipeline import Tools, Validation, ValidationConfig
from services.gatekeeper.schemas import Message, lookup
from tests.services.gatekeeper.samples import chat, no_tokens

pytestmark = pytest.mark.slow  # loads the tiny tokenizer

# Qwen3's chat template (tools left out): content-dependent (`</think>`), position-dependent
# (an empty think block on the final answer after the last user turn) and strips newlines.
QWEN3 = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}{%- set content = message.content %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{%- set reasoning_content = '' %}
{%- if '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}
{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""
# Opens earlier answers differently from the generation prompt: they cannot be located.
LAST_TURN_DIFFERS = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                     "assistant> {{ m['content'] }}\n{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
# Strips every content: the layout holds for contents without whitespace at their edges.
STRIPPING = "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}{%- endfor %}"
# Rewrites every content: no layout can predict it; every row is encoded in full.
SHOUTING = "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}{%- endfor %}"
# Refuses conversations whose roles do not alternate user/assistant (as Llama 2's did).
STRICT = ("{%- for m in messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('roles must alternate user/assistant') }}{%- endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}")

PIECES = ["hello", " ", "\n", "\n\n", "</think>", "<think>", "<|im_start|>", "<|im_end|>", "①⓪", "{{ x }}", "  lead",
          "trail  ", "<tool_response>", "</tool_response>", "\t", "漢字", "word " * 30, "user", "assistant"]
SHAPES = [("user", "assistant"), ("system", "user", "assistant"), ("user", "assistant", "user", "assistant"),
          ("assistant",), ("user", "user", "assistant"), ("system", "assistant", "user", "assistant"),
          ("user", "assistant", "assistant"), ("user",)]


def varied_conversations(n: int, seed: int = 0) -> list[list[Message]]:
    rng = random.Random(seed)

    def content() -> str:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))

    return [[Message(role, content()) for role in rng.choice(SHAPES)] for _ in range(n)]


def trainer_length(tokenizer, messages) -> int | str:
    try:
        return len(encode_chat(tokenizer, [ChatMessage(m.role, m.content) for m in messages], 1 << 30).input_ids)
    except TemplateError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - the template refused: the counter must say so too
        return f"refused: {exc}"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


def with_template(tiny_model_dir: Path, template: str):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template", ["tiny", "qwen3", "stripping", "shouting", "strict"])
def test_counts_equal_the_trainers_encoding_on_varied_rows(tiny_model_dir: Path, template: str):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = {"tiny": tokenizer.chat_template, "qwen3": QWEN3, "stripping": STRIPPING,
                               "shouting": SHOUTING, "strict": STRICT}[template]
    counter = TokenCounter(tokenizer)
    assert (counter.layout is not None) == (template != "shouting")
    assert counter.layout is None or counter.layout.edge_whitespace == (template in ("qwen3", "stripping"))
    conversations = varied_conversations(1500)
    measured = counter.measure_chats(conversations)
    for messages, length in zip(conversations, measured, strict=True):
        expected = trainer_length(tokenizer, messages)
        if isinstance(expected, str):
            assert isinstance(length, str), (messages, length, expected)
        else:
            assert length == expected, messages
    assert (counter.layout is None) == (template == "shouting")  # the layout was never found wrong


def test_qwen3_layout_knows_which_contents_it_cannot_predict(tiny_model_dir: Path):
    counter = TokenCounter(with_template(tiny_model_dir, QWEN3))
    assert counter.layout.edge_whitespace
    assert {"</think>", "<tool_response>", "</tool_response>"} <= set(counter.layout.triggers)
    assert "user" not in counter.layout.triggers and "<|im_start|>" not in counter.layout.triggers


def test_a_layout_that_disagrees_with_the_template_is_dropped_and_the_batch_recounted(tokenizer):
    counter = TokenCounter(tokenizer)
    key = next(iter(counter.layout.glue))
    counter.layout.glue = {k: glue + "!" for k, glue in counter.layout.glue.items()}  # a corrupted layout
    conversations = varied_conversations(50, seed=3)
    measured = counter.measure_chats(conversations)
    assert counter.layout is None and key
    assert measured == [trainer_length(tokenizer, m) for m in conversations]


def test_completion_texts_are_counted_without_template(tokenizer):
    counter = TokenCounter(tokenizer)
    texts = ["Once upon a time", "①⓪① + ①", "x" * 300]
    assert counter.count_texts(texts) == [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]


# ---------------------------------------------------------------------------- the standard checks


@pytest.fixture(scope="module")
def counter(tokenizer) -> TokenCounter:
    return TokenCounter(tokenizer)


def standard(tmp_path: Path, counter: TokenCounter, rows: list[dict], *, max_length: int = 48,
             overlength: str = "truncate", schema: str = "chat_sft_v1"):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    tally = Tally(100)
    config = ValidationConfig(max_length=max_length, overlength=overlength)
    validation = Validation(lookup(schema), "standard", config, tally, Tools(tokens=lambda: counter))
    kept = b"".join(validation.run(path)).splitlines()
    return tally, kept, validation.lengths


SHORT = chat(("user", "hi"), ("assistant", "hello"))
LONG_PROMPT = chat(("user", "add these two binary numbers " * 20), ("assistant", "42"))
LONG_ANSWER = chat(("user", "hi"), ("assistant", "the answer is " * 40))


def test_token_length_truncate_policy_drops_rows_with_no_answer_left(tmp_path: Path, counter):
    tally, kept, _ = standard(tmp_path, counter, [LONG_PROMPT])
    assert tally.counts == {"token_length": 1} and not kept
    assert "no answer token within the first 48 tokens" in tally.checks["token_length"].findings[0].reason
    tally, kept, _ = standard(tmp_path, counter, [SHORT])
    assert not tally.checks and kept


def test_token_truncation_warns_but_keeps_the_row(tmp_path: Path, counter):
    tally, kept, _ = standard(tmp_path, counter, [LONG_ANSWER])
    assert tally.counts == {"token_truncation": 1} and tally.num_errors == 0 and kept
    assert "the trainer cuts it to 48" in tally.checks["token_truncation"].findings[0].reason
    tally, kept, _ = standard(tmp_path, counter, [LONG_ANSWER], max_length=1000)
    assert not tally.checks and kept


def test_token_length_reject_policy_drops_every_long_row(tmp_path: Path, counter):
    tally, kept, _ = standard(tmp_path, counter, [LONG_ANSWER, SHORT], overlength="reject")
    assert tally.counts == {"token_length": 1} and len(kept) == 1
    assert tally.checks["token_length"].findings[0].line == 1
    assert "over max_length 48" in tally.checks["token_length"].findings[0].reason


def test_template_refusal_is_a_row_error(tmp_path: Path, tiny_model_dir: Path):
    strict = TokenCounter(with_template(tiny_model_dir, STRICT))
    rows = [chat(("assistant", "x"), ("user", "q"), ("assistant", "a")), SHORT]
    tally, kept, _ = standard(tmp_path, strict, rows)
    assert tally.counts == {"template": 1} and len(kept) == 1
    assert "roles must alternate" in tally.checks["template"].findings[0].reason
    tally, _, _ = standard(tmp_path, strict, [SHORT])
    assert not tally.checks


def test_prefix_unstable_conversations_are_template_errors(tmp_path: Path, tiny_model_dir: Path):
    unstable = TokenCounter(with_template(tiny_model_dir, LAST_TURN_DIFFERS))
    multi_turn = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    tally, _, _ = standard(tmp_path, unstable, [multi_turn, SHORT], max_length=512)
    assert tally.counts == {"template": 1} and "not prefix-stable" in tally.checks["template"].findings[0].reason


def test_qwen3_multi_turn_conversations_are_measured_not_refused(tmp_path: Path, tiny_model_dir: Path):
    # Qwen3 renders earlier answers without the think block the last one gets; the trainer
    # masks them by their verbatim content, so they are trainable rows.
    qwen3 = TokenCounter(with_template(tiny_model_dir, QWEN3))
    multi_turn = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    tally, kept, _ = standard(tmp_path, qwen3, [multi_turn, SHORT], max_length=512)
    assert not tally.checks and len(kept) == 2


def test_completion_rows_are_measured_and_truncated(tmp_path: Path, counter):
    tally, kept, lengths = standard(tmp_path, counter, [{"text": "word " * 100}, {"text": "short"}],
                                    schema="completion_v1")
    assert tally.counts == {"token_truncation": 1} and len(kept) == 2 and lengths.count == 2


def test_completion_rows_are_measured_as_the_trainer_encodes_them(tmp_path: Path, counter, tokenizer):
    texts = ["Once upon a time", "①⓪① + ① = ①⓪⓪ and so on"]
    _, _, lengths = standard(tmp_path, counter, [{"text": t} for t in texts], max_length=1000, schema="completion_v1")
    expected = [len(encode_text(tokenizer, t, 1 << 30).input_ids) for t in texts]  # the text and its EOS
    assert (lengths.min, lengths.max) == (min(expected), max(expected)) and min(expected) != max(expected)


def test_length_distribution_is_in_tokens_with_an_overflow_bin(tmp_path: Path, counter):
    rows = [chat(("user", "q" * n), ("assistant", "a")) for n in (1, 5, 20, 60, 400)]
    _, _, lengths = standard(tmp_path, counter, rows, max_length=64)
    expected = [counter.measure_chats([[Message(m["role"], m["content"]) for m in row["messages"]]])[0]
                for row in rows]
    assert lengths.count == 5 and lengths.min == min(expected) and lengths.max == max(expected)
    assert lengths.over_max_length == sum(n > 64 for n in expected)
    assert sum(b.count for b in lengths.histogram) == 5 and lengths.histogram[-1].hi is None
    assert [b.lo for b in lengths.histogram] == [0, 8, 16, 24, 32, 40, 48, 56, 65]


def test_length_stats_quantiles():
    stats = LengthStats(512)
    stats.add([10] * 50 + [100] * 40 + [600] * 10)
    summary = stats.summary()
    assert (summary.p50, summary.p90, summary.p99, summary.over_max_length) == (10, 100, 600, 10)
    assert summary.histogram[0].count == 50 and summary.histogram[-1].count == 10


def test_quick_level_never_loads_the_tokenizer(tmp_path: Path):
    Validation(lookup("chat_sft_v1"), "quick", ValidationConfig(), Tally(10), Tools(tokens=no_tokens))
    with pytest.raises(AssertionError):
        Validation(lookup("chat_sft_v1"), "standard", ValidationConfig(), Tally(10), Tools(tokens=no_tokens))


def test_counts_are_not_capped_by_truncation_set_on_the_shared_tokenizer(counter, tokenizer):
    messages = [Message("user", "hi"), Message("assistant", "the answer is " * 40)]
    [full] = counter.measure_chats([messages])
    counter.trained_within(messages, 8)  # encode_chat truncates through the wrapper...
    tokenizer("x " * 100, truncation=True, max_length=5)  # ...and so may anyone else
    assert counter.measure_chats([messages]) == [full] and full > 100
