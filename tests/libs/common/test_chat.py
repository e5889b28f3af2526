import pytest

from libs.common.chat import IGNORE_INDEX, ChatMessage, TemplateError, encode_chat, encode_text, prompt_messages

pytestmark = pytest.mark.slow  # loads the tiny tokenizer


def _trained_text(tok, enc):
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels, strict=True) if l != IGNORE_INDEX])


def test_only_assistant_tokens_are_trained(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    msgs = [ChatMessage("system", "Be exact."), ChatMessage("user", "Convert ①⓪① to decimal"),
            ChatMessage("assistant", "todecimal ①⓪① = 5")]
    enc = encode_chat(tok, msgs, 256)
    assert len(enc.input_ids) == len(enc.labels)
    assert _trained_text(tok, enc) == "todecimal ①⓪① = 5<|im_end|>\n"


def test_multi_turn_trains_every_assistant_turn(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    msgs = [ChatMessage("user", "hi"), ChatMessage("assistant", "hello"),
            ChatMessage("user", "add ① ①"), ChatMessage("assistant", "add ① ① = ①⓪")]
    trained = _trained_text(tok, encode_chat(tok, msgs, 256))
    assert trained == "hello<|im_end|>\nadd ① ① = ①⓪<|im_end|>\n"
    assert [m["content"] for m in prompt_messages(msgs)] == ["hi", "hello", "add ① ①"]


def test_truncation_keeps_labels_aligned(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    msgs = [ChatMessage("user", "word " * 200), ChatMessage("assistant", "answer")]
    enc = encode_chat(tok, msgs, 32)
    assert len(enc.input_ids) == 32 and enc.num_trained_tokens == 0


def test_template_that_is_not_prefix_stable_fails_loudly(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    # A template that renders earlier assistant turns differently once a later turn exists.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% else %}{{ m['role'] }}> {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c"), ChatMessage("assistant", "d")]
    with pytest.raises(TemplateError):
        encode_chat(tok, msgs, 64)


def test_qwen3_style_template_masks_every_turn_of_a_multi_turn_chat(tiny_model_dir):
    """Qwen3 gives only the final answer an empty think block: earlier turns render differently."""
    from libs.common.models import load_tokenizer
    from tests.services.gatekeeper.test_tokens import QWEN3

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = QWEN3
    msgs = [ChatMessage("user", "a"), ChatMessage("assistant", "first answer"),
            ChatMessage("user", "c"), ChatMessage("assistant", "second answer")]
    trained = _trained_text(tok, encode_chat(tok, msgs, 256))
    # The earlier answer by its content and end of turn; the last one as the prefix renders it,
    # with the empty think block Qwen3 expects before a final answer.
    assert trained == "first answer<|im_end|><think>\n\n</think>\n\nsecond answer<|im_end|>\n"


def test_a_text_row_trains_on_the_whole_text_and_its_eos_without_bos(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    text = "Once upon a time, ①⓪① was 5."
    enc = encode_text(tok, text, 256)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # No BOS (the tiny Qwen tokenizer has none, and chat rows get none either); EOS appended.
    assert enc.input_ids == [*ids, tok.eos_token_id] and tok.decode(enc.input_ids) == text + "<|im_end|>"
    # Every token is a label but the first, which nothing before it predicts.
    assert enc.labels == [IGNORE_INDEX, *enc.input_ids[1:]] and enc.num_trained_tokens == len(ids)


def test_a_truncated_text_loses_its_eos_and_one_token_leaves_nothing_to_learn(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    enc = encode_text(tok, "word " * 100, 16)
    assert len(enc.input_ids) == 16 and tok.eos_token_id not in enc.input_ids and enc.num_trained_tokens == 15
    assert encode_text(tok, "word " * 100, 1).num_trained_tokens == 0


def test_the_first_token_of_a_chat_is_never_a_label(tiny_model_dir):
    from libs.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}{% endif %}"
    enc = encode_chat(tok, [ChatMessage("assistant", "hello there")], 64)
    assert enc.labels[0] == IGNORE_INDEX and enc.num_trained_tokens == len(enc.input_ids) - 1
