"""OpenAI request validation and response shapes, and the token budget: pure, no model."""

from __future__ import annotations

import msgspec
import pytest

from services.inference.generation import Completion, GenerationParams, PromptTooLong, new_token_budget
from services.inference.protocol import (
    SSE_DONE,
    RequestError,
    TokenText,
    chat_logprobs,
    chunk,
    completion_response,
    model_list,
    parse_chat_request,
    parse_completion_request,
    sse,
    text_chunk,
    text_completion_response,
    text_logprobs,
    usage_chunk,
)
from services.inference.sampling import TokenLogprob


def body(**fields) -> bytes:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return msgspec.json.encode(fields)


def refused(raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_chat_request(raw)
    assert caught.value.status == 400
    return caught.value


def test_minimal_request_gets_openai_defaults():
    chat = parse_chat_request(body(model="flywheel"))
    assert chat.model == "flywheel"
    assert [(m.role, m.content) for m in chat.messages] == [("user", "hi")]
    assert chat.params == GenerationParams(max_tokens=None, temperature=1.0, top_p=1.0, stop=(), seed=None)
    assert not chat.stream and not chat.include_usage


def test_all_supported_fields_are_read():
    chat = parse_chat_request(body(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
            {"role": "assistant", "content": "c"},
        ],
        max_tokens=5, max_completion_tokens=7, temperature=0, top_p=0.5, n=1, stop="END", stream=True,
        stream_options={"include_usage": True}, seed=3, presence_penalty=0.0, user="someone",
    ))
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"), ("user", "ab"), ("assistant", "c")]
    # The newer max_completion_tokens wins over the deprecated max_tokens.
    assert chat.params == GenerationParams(max_tokens=7, temperature=0.0, top_p=0.5, stop=("END",), seed=3)
    assert chat.params.greedy
    assert chat.stream and chat.include_usage


def test_nulls_mean_defaults():
    chat = parse_chat_request(body(temperature=None, top_p=None, stop=None, n=None, stream=None, max_tokens=None))
    assert chat.params == GenerationParams()


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": "ten"}, "max_completion_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
])
def test_invalid_fields_are_refused_naming_the_param(fields, param):
    error = refused(body(**fields))
    assert error.param == param
    shaped = error.body()["error"]
    assert set(shaped) == {"message", "type", "param", "code"}
    assert shaped["type"] == "invalid_request_error" and shaped["param"] == param


def test_messages_are_required_and_body_must_be_json():
    assert refused(b'{"model": "flywheel"}').param is None
    assert "not valid JSON" in refused(b"{nope").message
    refused(b"[]")


def test_completion_response_has_the_openai_shape():
    done = Completion(text="hello", finish_reason="length", prompt_tokens=7, completion_tokens=3)
    other = Completion(text="hi", finish_reason="stop", prompt_tokens=7, completion_tokens=2, index=1)
    assert completion_response("chatcmpl-1", 100, "flywheel:base", [other, done]) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 100,
        "model": "flywheel:base",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": None}, "logprobs": None,
             "finish_reason": "length"},
            {"index": 1, "message": {"role": "assistant", "content": "hi", "refusal": None}, "logprobs": None,
             "finish_reason": "stop"},
        ],
        # The prompt once, every choice's tokens.
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
    }
    text = text_completion_response("cmpl-1", 100, "m", [done])
    assert text["object"] == "text_completion"
    assert text["choices"] == [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}]


class _Tokenizer:
    def decode(self, tokens: list[int]) -> str:
        return {1: "he", 2: "llo", 3: " wo"}[tokens[0]]


def test_log_probabilities_in_both_apis_shapes():
    entries = [TokenLogprob(1, -0.5, ((1, -0.5), (3, -1.5))), TokenLogprob(2, -0.25, ((2, -0.25), (3, -2.0)))]
    text = TokenText(_Tokenizer())
    chat = chat_logprobs(entries, text)
    assert chat["content"][0] == {"token": "he", "logprob": -0.5, "bytes": [104, 101], "top_logprobs": [
        {"token": "he", "logprob": -0.5, "bytes": [104, 101]}, {"token": " wo", "logprob": -1.5, "bytes": [32, 119, 111]}]}
    assert [e["token"] for e in chat["content"]] == ["he", "llo"]
    assert text_logprobs(entries, text, offset=4) == {
        "tokens": ["he", "llo"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"he": -0.5, " wo": -1.5}, {"llo": -0.25, " wo": -2.0}], "text_offset": [4, 6],
    }
    assert chat_logprobs(None, text) is None and text_logprobs(None, text) is None


def test_completions_requests_read_and_refused():
    raw = msgspec.json.encode({"prompt": ["say"], "max_tokens": 3, "logprobs": 2, "n": 2, "seed": 1, "stop": ["\n"]})
    request = parse_completion_request(raw)
    assert request.prompt == "say" and request.params == GenerationParams(
        max_tokens=3, stop=("\n",), seed=1, n=2, top_logprobs=2)
    # OpenAI's completions default: 16 tokens.
    assert parse_completion_request(b'{"prompt": "x"}').params.max_tokens == 16
    for body, param in [({"prompt": []}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
                        ({"prompt": "a", "logprobs": 6}, "logprobs"), ({"prompt": "a", "best_of": 3}, "best_of")]:
        with pytest.raises(RequestError) as caught:
            parse_completion_request(msgspec.json.encode(body))
        assert caught.value.param == param, body


def test_stream_chunks_and_sse_framing():
    piece = chunk("c", 1, "m", {"content": "x"})
    assert piece["object"] == "chat.completion.chunk"
    assert piece["choices"] == [{"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}]
    assert chunk("c", 1, "m", {}, "stop")["choices"][0]["finish_reason"] == "stop"
    assert text_chunk("c", 1, "m", "x", index=2)["choices"] == [
        {"index": 2, "text": "x", "logprobs": None, "finish_reason": None}]
    final = usage_chunk("c", 1, "m", [Completion("x", "stop", 2, 1)])
    assert final["choices"] == [] and final["usage"]["total_tokens"] == 3
    framed = sse(piece)
    assert framed.startswith(b"data: {") and framed.endswith(b"\n\n")
    assert msgspec.json.decode(framed[len(b"data: "):]) == piece
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_model_list_shape():
    assert model_list("flywheel:base", 5, "flywheel") == {
        "object": "list", "data": [{"id": "flywheel:base", "object": "model", "created": 5, "owned_by": "flywheel"}],
    }


def test_token_budget_is_capped_by_request_limit_and_context():
    assert new_token_budget(None, 256, 1024, 10) == 256
    assert new_token_budget(5, 256, 1024, 10) == 5
    assert new_token_budget(10_000, 256, 1024, 10) == 256
    assert new_token_budget(None, 256, 1024, 1000) == 24
    with pytest.raises(PromptTooLong):
        new_token_budget(None, 256, 1024, 1024)
