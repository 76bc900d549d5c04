"""Structured output: `response_format` json_object / json_schema by xgrammar-constrained decoding, on the engine
(rows with and without a grammar in one batch) and through `litllm serve` with the official `openai` client. The
oracle is `jsonschema`: a random-weight model's answer must parse and validate, every time."""

from __future__ import annotations

import json

import pytest

from test_serve import checkpoint, server  # noqa: F401 (fixtures: litllm serve on the tiny checkpoint)

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine_parts(tiny_checkpoint):
    from litllm.constrain import Grammars
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_checkpoint)
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    return model, tokenizer, Grammars(tokenizer, model.config.vocab_size)


def _run(engine, requests) -> list[list[int]]:
    ids = engine.add_many(requests)
    tokens = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def test_engine_grammar_rows_validate_and_leave_other_rows_unchanged(engine_parts):
    from litllm.engine import Engine, Request, Sampling, default_stops

    model, tokenizer, grammars = engine_parts
    prompt = tokenizer.encode(PROMPT).tolist()
    stops = default_stops(tokenizer)
    free = [Request(prompt, 12), Request(prompt, 12, Sampling(temperature=1.0, seed=3))]
    with Engine(model, tokenizer, max_batch_size=4, max_seq_length=128) as engine:
        alone = _run(engine, free)
        constrained = [Request(prompt, 100, Sampling(temperature=t, seed=seed), grammar=grammars.json_schema(SCHEMA),
                               **stops) for t, seed in ((0.0, None), (1.0, 1))]
        mixed = _run(engine, [free[0], constrained[0], free[1], constrained[1]])
    assert [mixed[0], mixed[2]] == alone  # the rows without a grammar are untouched by the masked ones
    for tokens in (mixed[1], mixed[3]):
        assert tokens[-1] in stops["stop_token_ids"]  # the grammar completed and ended the row
        jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), SCHEMA)


def _chat(client, stream: bool, **kw) -> tuple[str, str]:
    args = dict(model=client.models.list().data[0].id, messages=[{"role": "user", "content": PROMPT}],
**kw)
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        return choice.message.content, choice.finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_schema_answers_validate(server, stream):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        text, reason = _chat(client, stream, response_format=fmt, temperature=1.0, seed=seed)
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_openai_json_object_and_bad_format(server):
    client = server.client()
    text, reason = _chat(client, False, response_format={"type": "json_object"}, temperature=0)
    if reason == "stop":  # (an unbounded object may run out of tokens: then it is a prefix of one)
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    done = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=100, seed=5,
                                     extra_body={"response_format": fmt}).choices[0]  # completions too
    assert done.finish_reason == "stop"
    jsonschema.validate(json.loads(done.text), SCHEMA)
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                             "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
