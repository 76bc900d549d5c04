"""Tool calling on `litllm serve`: `tools` rendered exactly as transformers' `apply_chat_template(tools=...)` renders
them (the oracle), calls parsed in each family's format, forced calls (`required`, a named function) valid for the
function's schema even from a random-weight model, and a round trip with the official `openai` client."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from test_evaluate import _edit_json
from test_serve import server  # noqa: F401 (fixture: litllm serve on `checkpoint`)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

# a Hermes / Qwen 2.5-style template: the tools in the system turn, calls as <tool_call> JSON, results as
# <tool_response> in a user turn
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nFunctions:\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls is defined %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}{% for call in message.tool_calls %}<tool_call>\n"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "Weather in Lima?"}]


@pytest.fixture(scope="module")
def tool_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with the template above and a 1024-token window (the tools' specs take room)."""
    folder = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    _edit_json(folder / "tokenizer_config.json", chat_template=TEMPLATE)
    config = yaml.safe_load((folder / "model_config.yaml").read_text())
    (folder / "model_config.yaml").write_text(yaml.safe_dump({**config, "block_size": 1024}))
    return folder


def _conversation(call_id: str = "call_1") -> list[dict]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather",
                                                             "arguments": json.dumps({"city": "Lima", "unit": "c"})}}
    return [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "21 C, sunny"}]


def test_tools_render_as_transformers_renders_them(tool_checkpoint):
    import transformers

    from litllm.prompts import PromptStyle
    from litllm.serve.tools import template_messages

    hf = transformers.AutoTokenizer.from_pretrained(tool_checkpoint)
    style = PromptStyle.from_checkpoint(tool_checkpoint)
    for messages in (QUESTION, _conversation()):
        # vLLM's convention, which we follow: the wire's JSON-string arguments reach the template as an object
        expected = hf.apply_chat_template(template_messages(messages), tools=TOOLS, tokenize=False,
                                          add_generation_prompt=True)
        assert style.render_messages(template_messages(messages), tools=TOOLS) == expected
    assert "<tools>" in expected and "<tool_response>" in expected


def test_tool_calls_parse_in_each_family_format():
    from litllm.serve.tools import HERMES, LLAMA3_JSON, MISTRAL, parse_tool_calls, tool_format

    args = {"city": "Lima", "unit": "c"}
    cases = {
        HERMES: f'Let me look.<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>',
        LLAMA3_JSON: f'<|python_tag|>{{"name": "get_weather", "parameters": {json.dumps(args)}}}',
        MISTRAL: f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {json.dumps(args)}}}]',
    }
    for fmt, text in cases.items():
        content, calls = parse_tool_calls(fmt, text)
        assert [c["function"]["name"] for c in calls] == ["get_weather"], fmt
        assert json.loads(calls[0]["function"]["arguments"]) == args
        assert content == ("Let me look." if fmt == HERMES else None)
    assert parse_tool_calls(HERMES, "no call here") == ("no call here", [])
    assert parse_tool_calls(LLAMA3_JSON, '{"not": "a call"}') == ('{"not": "a call"}', [])
    assert tool_format(TEMPLATE) == HERMES and tool_format("{{ messages }}") is None
    assert tool_format("{% if tools %}[TOOL_CALLS]{% endif %}") == MISTRAL
    assert tool_format("{% if tools %}<|python_tag|>{% endif %}") == LLAMA3_JSON


@pytest.fixture(scope="module")
def checkpoint(tool_checkpoint):  # what test_serve's `server` fixture serves
    return tool_checkpoint


def _ask(client, stream: bool, messages: list, **kw) -> tuple[dict, str]:
    """(the assistant message as a dict, finish_reason), streamed or not."""
    args = dict(model=client.models.list().data[0].id, messages=messages, tools=TOOLS, **{"max_tokens": 100, **kw})
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        return choice.message.model_dump(), choice.finish_reason
    message, reason = {"content": None, "tool_calls": None}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            if c.delta.content:
                message["content"] = (message["content"] or "") + c.delta.content
            if c.delta.tool_calls:
                message["tool_calls"] = [{"id": t.id, "type": t.type, "function": t.function.model_dump()}
                                         for t in c.delta.tool_calls]
            reason = c.finish_reason or reason
    return message, reason


def _check_calls(message: dict, names: set[str]) -> None:
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        name = call["function"]["name"]
        assert name in names and call["id"] and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_round_trip(server, stream):
    client = server.client()
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(2):  # a forced call is a valid call of the named function, sampled or not
        message, reason = _ask(client, stream, QUESTION, tool_choice=named, temperature=1.0, seed=seed)
        assert reason == "tool_calls"
        _check_calls(message, {"get_weather"})
    message, reason = _ask(client, stream, QUESTION, tool_choice="required", temperature=1.0, seed=3)
    assert reason == "tool_calls"
    _check_calls(message, {"get_weather", "get_time"})
    # the call goes back with its result as a `tool` message; the model answers in text
    call = message["tool_calls"][0]
    conversation = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": "21 C, sunny"}]
    answer, reason = _ask(client, stream, conversation, tool_choice="none", temperature=0, max_tokens=8)
    assert reason in ("stop", "length") and answer["tool_calls"] is None and isinstance(answer["content"], str)


def test_bad_tools_are_400(server, tiny_checkpoint):
    base = {"messages": QUESTION, "tools": TOOLS}
    for body, param in [({**base, "tool_choice": "sometimes"}, "tool_choice"),
                        ({**base, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                        ({**base, "tools": [{"type": "function"}]}, "tools[0]"),
                        ({**base, "tools": []}, "tools"),
                        ({**base, "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
                        ({**base, "tools": ["get_weather"]}, "tools[0]"),
                        ({"messages": QUESTION, "tool_choice": "required"}, "tool_choice")]:
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # a template that doesn't render tools can't take them (the plain tiny checkpoint's)
    from litllm.prompts import PromptStyle
    from litllm.serve.tools import tool_format

    assert tool_format(PromptStyle.from_checkpoint(tiny_checkpoint).template) is None
