"""The server's OpenAI request rules, without a server: what is accepted, what is a 400 naming the field."""

from __future__ import annotations

import socket

import pytest

from litllm.errors import LitLLMError
from litllm.serve.protocol import (
    CHAT, COMPLETION, MAX_STOP_CHARS, MAX_STOP_STRINGS, APIError, chunk_body, parse_json, parse_messages,
    parse_params, parse_prompts, sse,
)
from litllm.serve.server import bind_socket


def _param_of(kind, body) -> str:
    with pytest.raises(APIError) as e:
        parse_params(kind, body)
    assert e.value.status == 400 and f"'{e.value.param}'" in e.value.message
    return e.value.param


def test_defaults_and_accepted_fields():
    p = parse_params(CHAT, {"messages": [], "model": "m", "stop": "###", "top_k": -1, "seed": 3, "user": "u"})
    assert (p.model, p.stop, p.top_k, p.seed, p.temperature, p.top_p, p.max_tokens) == ("m", ["###"], None, 3, 1.0, 1.0, None)
    # fields we don't implement pass at their no-op value (what SDKs send by default), null too
    p = parse_params(COMPLETION, {"prompt": "x", "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0,
                                  "logprobs": None, "echo": False, "best_of": None, "max_tokens": 5})
    assert p.max_tokens == 5 and p.n == 1 and p.logprobs is None and not p.echo
    p = parse_params(COMPLETION, {"logprobs": 3, "echo": True, "max_tokens": 0, "n": 2})
    assert (p.logprobs, p.echo, p.max_tokens, p.n) == (3, True, 0, 2)
    assert parse_params(CHAT, {"logprobs": True}).logprobs == 0
    assert parse_params(CHAT, {"logprobs": True, "top_logprobs": 4}).logprobs == 4
    assert parse_params(CHAT, {"max_completion_tokens": 7}).max_tokens == 7
    p = parse_params(CHAT, {"stream": True, "stream_options": {"include_usage": True}})
    assert p.stream and p.include_usage


@pytest.mark.parametrize("kind, body, param", [
    (COMPLETION, {"max_tokens": True}, "max_tokens"),  # a JSON boolean is not an integer
    (COMPLETION, {"max_tokens": 0}, "max_tokens"),
    (COMPLETION, {"max_tokens": 2.5}, "max_tokens"),
    (CHAT, {"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    (COMPLETION, {"temperature": -1}, "temperature"),
    (COMPLETION, {"top_k": 0}, "top_k"),
    (COMPLETION, {"stop": ["a", ""]}, "stop"),
    (COMPLETION, {"stop": ["a", 1]}, "stop"),
    (COMPLETION, {"seed": "1"}, "seed"),
    (COMPLETION, {"n": 0}, "n"),
    (COMPLETION, {"n": 65}, "n"),
    (COMPLETION, {"logprobs": 21}, "logprobs"),
    (COMPLETION, {"logprobs": True}, "logprobs"),  # completions take an integer k
    (CHAT, {"logprobs": 3}, "logprobs"),  # chat takes a boolean (and top_logprobs k)
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (CHAT, {"echo": True}, "echo"),
    (CHAT, {"max_tokens": 0}, "max_tokens"),  # 0 only to score an echoed prompt
    (CHAT, {"functions": [{"name": "f"}]}, "functions"),  # the legacy field (tools replaced it)
    (COMPLETION, {"presence_penalty": 0.5}, "presence_penalty"),
    (COMPLETION, {"messages": []}, "messages"),  # a chat field on the completions route
    (CHAT, {"prompt": "x"}, "prompt"),
    (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    (CHAT, {"response_format": {"type": "yaml"}}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}}, "response_format"),
    # values that used to pass and then fail inside the engine (issue 20)
    (COMPLETION, {"temperature": float("nan")}, "temperature"),
    (COMPLETION, {"temperature": float("inf")}, "temperature"),
    (COMPLETION, {"temperature": 1e-320}, "temperature"),  # subnormal: 0 in float32
    (COMPLETION, {"temperature": 10**400}, "temperature"),  # no float holds it
    (COMPLETION, {"top_p": 1e-300}, "top_p"),
    (COMPLETION, {"top_p": float("nan")}, "top_p"),
    (COMPLETION, {"seed": 2**64}, "seed"),
    (COMPLETION, {"seed": -1}, "seed"),
    (COMPLETION, {"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    (COMPLETION, {"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
])
def test_bad_fields(kind, body, param):
    assert _param_of(kind, body) == param


def test_sampling_extremes_are_accepted():
    """The bounds themselves pass, and sample without NaN (the engine's sampler is the oracle)."""
    import torch

    from litllm.engine import SMALLEST_NORMAL, sample

    p = parse_params(COMPLETION, {"temperature": SMALLEST_NORMAL, "top_p": SMALLEST_NORMAL, "seed": 2**64 - 1,
                                  "stop": ["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS})
    assert (p.temperature, p.top_p, p.seed, len(p.stop)) == (SMALLEST_NORMAL, SMALLEST_NORMAL, 2**64 - 1, 16)
    logits = torch.randn(3, 50) * 30
    generator = torch.Generator().manual_seed(p.seed)
    for temperature, top_p in ((SMALLEST_NORMAL, 1.0), (1e-37, 1.0), (1.0, SMALLEST_NORMAL), (3e38, 1.0)):
        picked = sample(logits, temperature, None, top_p, generator)
        if temperature < 1 or top_p < 1:
            assert torch.equal(picked, logits.argmax(-1))


def test_prompts():
    assert parse_prompts({"prompt": "hi"}) == ["hi"]
    assert parse_prompts({"prompt": ["hi"]}) == ["hi"]  # a batch of one
    assert parse_prompts({"prompt": [1, 2, 3]}) == [[1, 2, 3]]
    assert parse_prompts({"prompt": ["a", [1, 2]]}) == ["a", [1, 2]]  # a batch
    for prompt in ([], [1, "a"], [True], 3, ["a", []], [[1, "x"]], ["a"] * 65):
        with pytest.raises(APIError) as e:
            parse_prompts({"prompt": prompt})
        assert e.value.param.startswith("prompt")


def test_messages():
    got = parse_messages({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
    ]})
    assert got == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one\ntwo"}]
    for message, param in [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content"),
        ({"role": "tool", "content": None}, "messages[0].content"),
        ({"role": "assistant", "content": None, "tool_calls": "x"}, "messages[0].tool_calls"),
        ({"role": "user", "content": "x", "tool_calls": []}, "messages[0]"),  # only an assistant calls tools
        ({"role": "user", "content": "x", "name": "bob"}, "messages[0]"),
        ({"role": "assistant", "content": None}, "messages[0].content"),
        ({"role": ["user"], "content": "x"}, "messages[0].role"),  # unhashable: no TypeError, a 400
        ({"role": {"user": 1}, "content": "x"}, "messages[0].role"),
    ]:
        with pytest.raises(APIError) as e:
            parse_messages({"messages": [message]})
        assert e.value.param == param


def test_json_body():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"[]", b"\xff\xfe", b""):
        with pytest.raises(APIError) as e:
            parse_json(raw)
        assert e.value.status == 400
    for raw, param in ((b'{"temperature": NaN}', None), (b'{"a": -Infinity}', None), (b"[" * 100_000, None),
                       (b'{"prompt": "a\\ud800"}', "prompt"), (b'{"x\\udc00y": 1}', "x\\udc00y"),
                       (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
                        "messages[0].content[0].text")):
        with pytest.raises(APIError) as e:
            parse_json(raw)
        assert e.value.status == 400 and e.value.param == param
        assert e.value.message.encode("ascii", "strict")  # quotes a lone surrogate escaped
    error = APIError(404, "no such model", param="model", code="model_not_found").body()["error"]
    assert error == {"message": "no such model", "type": "invalid_request_error", "param": "model",
                     "code": "model_not_found"}


def test_chunks():
    first = chunk_body(CHAT, "id", "m", 0, text="", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and "usage" not in first
    last = chunk_body(CHAT, "id", "m", 0, finish_reason="stop", include_usage=True)
    assert last["choices"][0]["delta"] == {} and last["usage"] is None
    usage = chunk_body(COMPLETION, "id", "m", 0, usage={"total_tokens": 3})
    assert usage["choices"] == [] and usage["usage"] == {"total_tokens": 3}
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()


def test_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LitLLMError, match=f"--port {port}: 127.0.0.1:{port} is already in use"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(LitLLMError, match="--port"):
        bind_socket("127.0.0.1", 70000)
    bind_socket("127.0.0.1", 0).close()
