"""Tool calling on /v1/chat/completions: `tools` and `tool_choice` validated, the family's tool-call format found
from the chat template, calls parsed out of the model's text, and the schema a forced call (`required`, a named
function) is decoded under.

Formats (what the model writes for a call):
- `hermes` (Hermes, Qwen 2/2.5/3, ...): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call
- `llama3_json` (Llama 3.1+): `{"name": ..., "parameters": {...}}` as the whole answer (after `<|python_tag|>`)
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from litllm.serve.protocol import APIError

HERMES, LLAMA3_JSON, MISTRAL = "hermes", "llama3_json", "mistral"


@dataclass
class ToolRequest:
    """The validated `tools` / `tool_choice` of a request."""

    tools: list[dict]  # OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: Any  # "auto" | "none" | "required" | the name of the function that must be called

    def forced_schema(self, fmt: str) -> Optional[dict]:
        """The JSON schema of one call the answer must be (`required` / a named function), in `fmt`'s keys."""
        if self.choice in ("auto", "none"):
            return None
        args_key = "parameters" if fmt == LLAMA3_JSON else "arguments"
        functions = [t["function"] for t in self.tools if self.choice == "required" or
                     t["function"]["name"] == self.choice]
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   args_key: f.get("parameters") or {"type": "object"}},
                  "required": ["name", args_key], "additionalProperties": False} for f in functions]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _bad(name: str, message: str) -> APIError:
    return APIError(400, f"'{name}' {message}", param=name)


def parse_tools(body: dict) -> Optional[ToolRequest]:
    """`tools` and `tool_choice` -> a ToolRequest (None when no tools are given)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise _bad("tool_choice", "needs 'tools'")
        return None
    if not isinstance(tools, list) or not tools:
        raise _bad("tools", "must be a non-empty array of {\"type\": \"function\", \"function\": {...}}")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or not isinstance(
                function.get("name"), str):
            raise _bad(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        if not isinstance(function.get("parameters", {}), dict):
            raise _bad(f"tools[{i}].function.parameters", "must be a JSON schema (an object)")
        names.append(function["name"])
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) and choice.get("type") == "function" else None
        if name not in names:
            raise _bad("tool_choice", f"must name one of the tools ({', '.join(names)}), got {json.dumps(choice)}")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise _bad("tool_choice", f"must be auto, none, required or {{\"type\": \"function\", ...}}, got {choice!r}")
    return ToolRequest(tools, choice)


def tool_format(template: str) -> Optional[str]:
    """The tool-call format a chat template teaches its model (None: the template knows no tools)."""
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON
    return HERMES  # the most common; a template that renders tools and names no format


def call_wrapping(fmt: str) -> tuple[str, str]:
    """The text before and after a forced call's JSON."""
    return {HERMES: ("<tool_call>\n", "\n</tool_call>"), MISTRAL: ("[TOOL_CALLS][", "]"), LLAMA3_JSON: ("", "")}[fmt]


def parse_tool_calls(fmt: str, text: str) -> tuple[Optional[str], list[dict]]:
    """(the content left, [OpenAI tool calls]) of an answer; no calls: (text, [])."""
    found: list[dict] = []
    content: Optional[str] = text
    if fmt == HERMES:
        for match in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL):
            found += _calls(match.group(1))
        if found:
            content = text[: text.index("<tool_call>")]
    elif fmt == MISTRAL and "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        found, content = _calls(after.strip()), before
    elif fmt == LLAMA3_JSON:
        found = _calls(text.replace("<|python_tag|>", "").strip(), args_key="parameters")
        content = "" if found else text
    if not found:
        return text, []
    return (content.strip() or None), [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        for call in found]


def _calls(text: str, args_key: str = "arguments") -> list[dict]:
    """[{"name", "arguments"}] of a JSON call or an array of them; [] if the text is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return []
        arguments = call.get(args_key, call.get("arguments", call.get("parameters", {})))
        out.append({"name": call["name"], "arguments": arguments})
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates read them: an assistant's tool-call `arguments` (a JSON string on the
    wire) as an object, as vLLM passes them (templates write them with `tojson`)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = dict(call["function"])
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass
                calls.append({**call, "function": function})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out
