"""The OpenAI protocol: request bodies -> validated parameters, and the bodies we answer with.

Plain Python (no web framework), so every rule here is unit-testable. A bad request raises
`APIError`, which the app answers as OpenAI does: the HTTP status and
`{"error": {"message", "type", "param", "code"}}`, the message naming the field.

Fields honoured: `model`, `prompt` (a string, token ids, or a batch of either) / `messages`, `max_tokens`
(chat also `max_completion_tokens`), `n`, `temperature`, `top_p`, `top_k`, `stop`, `seed`, `stream`,
`stream_options.include_usage`, `user` (an opaque id, accepted), `logprobs` (completions: an integer k; chat:
a boolean, with `top_logprobs` k), completions' `echo`, `response_format` (json_object / json_schema, by
constrained decoding) and chat's `tools` / `tool_choice` (validated in tools.py). Fields whose effect we don't
implement are accepted only at their no-op value (`best_of: 1`, `presence_penalty: 0`, ...); anything else is a 400
naming it: never silently ignored.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from litllm.engine import SamplingError, check_sampling_args, lone_surrogate_at

COMPLETION, CHAT = "completion", "chat"

# OpenAI's own default for /v1/completions (chat has none: it runs until a stop or the context ends)
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_LOGPROBS = 20  # the most alternatives `logprobs` / `top_logprobs` may ask for (OpenAI's chat limit, vLLM's default)
MAX_CHOICES = 64  # `n` times the number of prompts
# `stop`: at most this many strings of at most this many characters (each is matched against the text
# held back at every token, so together they bound that work)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered with HTTP `status` and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
        type: Optional[str] = None, headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """What one request asks for, validated. max_tokens None: the server's default for the route."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    logprobs: Optional[int] = None  # the k top alternatives per token (0: the chosen token's only); None: none
    echo: bool = False  # completions: the prompt is part of the answer (and of its logprobs)
    # `response_format`: None (free text), or the JSON schema the answer must satisfy ({"type": "object"} for
    # json_object), enforced by constrained decoding
    json_schema: Optional[dict] = None


# ---------------------------------------------------------------------- request validation
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list}[kind])


def _field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of JSON `kind` (absent or null -> default)."""
    value = body.get(name)
    if value is None:
        return default
    if not _is(value, kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise APIError(400, f"'{name}' must be {article} {kind}, got {_json_type(value)}", param=name)
    return value


def _invalid(name: str, message: str) -> APIError:
    return APIError(400, f"'{name}' {message}", param=name)


def _number(body: dict, name: str, default: float) -> float:
    value = _field(body, name, "number", default)
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        raise _invalid(name, f"must be a finite number, got an integer of {len(str(value))} digits") from None


# fields accepted only with the value that changes nothing (we don't implement their effect)
_NO_OP_VALUES: dict[str, Any] = {
    "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "suffix": "",
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options", "user",
           "n", "logprobs", "response_format"}
_FIELDS = {COMPLETION: _COMMON | {"prompt", "echo"}, CHAT: _COMMON | {"messages", "max_completion_tokens",
                                                                      "top_logprobs", "tools", "tool_choice"}}


def _check_fields(kind: str, body: dict) -> None:
    for name, value in body.items():
        if name in _FIELDS[kind]:
            continue
        if name in _NO_OP_VALUES:
            no_op = _NO_OP_VALUES[name]
            if value is None or (isinstance(value, bool) == isinstance(no_op, bool) and value == no_op):
                continue
            raise _invalid(name, f"is not supported by this server (only {json.dumps(no_op)} is accepted)")
        raise _invalid(name, "is not a supported field for this endpoint")


def parse_params(kind: str, body: dict) -> Params:
    """The sampling / length / streaming fields shared by both endpoints."""
    _check_fields(kind, body)
    p = Params()
    p.model = _field(body, "model", "string")
    max_tokens = _field(body, "max_tokens", "integer")
    if kind == CHAT:
        newer = _field(body, "max_completion_tokens", "integer")
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise _invalid("max_completion_tokens", f"({newer}) and 'max_tokens' ({max_tokens}) disagree: send one")
        max_tokens = newer if newer is not None else max_tokens
    _parse_logprobs(kind, body, p)
    if max_tokens is not None and max_tokens < (0 if p.echo else 1):
        raise _invalid("max_tokens", f"must be >= 1 (0 only with 'echo', to score the prompt), got {max_tokens}")
    p.max_tokens = max_tokens
    p.n = _field(body, "n", "integer", 1)
    if not 1 <= p.n <= MAX_CHOICES:
        raise _invalid("n", f"must be in [1, {MAX_CHOICES}], got {p.n}")
    p.temperature = _number(body, "temperature", 1.0)
    p.top_p = _number(body, "top_p", 1.0)
    top_k = _field(body, "top_k", "integer")
    if top_k is not None and top_k != -1 and top_k < 1:
        raise _invalid("top_k", f"must be a positive integer (or -1 for no limit), got {top_k}")
    p.top_k = None if top_k in (None, -1) else top_k
    p.seed = _field(body, "seed", "integer")
    try:  # the engine's own rules: what passes here can't fail when sampling runs
        check_sampling_args(p.temperature, p.top_k, p.top_p, None, p.seed)
    except SamplingError as e:
        raise _invalid(e.field, e.problem) from None
    p.stop = _parse_stop(body.get("stop"))
    p.stream = _field(body, "stream", "boolean", False)
    options = _field(body, "stream_options", "object")
    if options is not None:
        if not p.stream:
            raise _invalid("stream_options", "is only allowed when 'stream' is true")
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise _invalid("stream_options", f"has unsupported key(s): {', '.join(sorted(unknown))}")
        p.include_usage = _field(options, "include_usage", "boolean", False)
    _field(body, "user", "string")
    p.json_schema = _parse_response_format(body)
    return p


def _parse_response_format(body: dict) -> Optional[dict]:
    """`response_format`: {"type": "text"} (None), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} -> the schema to enforce."""
    fmt = _field(body, "response_format", "object")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    if fmt.get("type") != "json_schema":
        raise _invalid("response_format", f"'type' must be text, json_object or json_schema, got {fmt.get('type')!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise _invalid("response_format", "needs 'json_schema': {\"name\": ..., \"schema\": {...}}")
    return spec.get("schema") or {}


def _parse_logprobs(kind: str, body: dict, p: Params) -> None:
    """Completions: `logprobs` k and `echo`. Chat: `logprobs` true and `top_logprobs` k."""
    if kind == COMPLETION:
        p.echo = _field(body, "echo", "boolean", False)
        p.logprobs = _field(body, "logprobs", "integer")
        name = "logprobs"
    else:
        asked = _field(body, "logprobs", "boolean", False)
        p.logprobs = _field(body, "top_logprobs", "integer")
        name = "top_logprobs"
        if p.logprobs is not None and not asked:
            raise _invalid("top_logprobs", "needs 'logprobs': true")
        if asked and p.logprobs is None:
            p.logprobs = 0
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise _invalid(name, f"must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")


def _parse_stop(stop: Any) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _invalid("stop", f"must be a string or an array of strings, got {_json_type(stop)}")
    stop = list(stop or [])
    if not all(stop):
        raise _invalid("stop", "must not contain an empty string")
    if len(stop) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"holds {len(stop)} strings: at most {MAX_STOP_STRINGS} are allowed")
    longest = max(stop, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise _invalid("stop", f"holds a string of {len(longest)} characters: at most {MAX_STOP_CHARS} are allowed")
    return stop


def parse_prompts(body: dict) -> list[Union[str, list[int]]]:
    """/v1/completions' `prompt`: a string, token ids, or a batch (an array) of strings or of token-id arrays."""
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is(t, "integer") for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, (str, list)) for t in prompt):
        for i, one in enumerate(prompt):
            if not (isinstance(one, str) or (one and all(_is(t, "integer") for t in one))):
                raise _invalid(f"prompt[{i}]", "must be a string or a non-empty array of token ids")
        if len(prompt) > MAX_CHOICES:
            raise _invalid("prompt", f"holds {len(prompt)} prompts: at most {MAX_CHOICES} are allowed")
        return list(prompt)
    raise _invalid("prompt", f"must be a string, an array of token ids, or an array of those, got {_json_type(prompt)}")


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_TOOL_KEYS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}}  # besides role and content


def parse_messages(body: dict) -> list[dict[str, Any]]:
    """/v1/chat/completions' `messages` -> [{"role", "content"}] with text content (developer -> system); an
    assistant's `tool_calls` (content may then be null) and a tool result's `tool_call_id` / `name` kept."""
    if "messages" not in body or body["messages"] is None:
        raise APIError(400, "'messages' is required", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", f"must be a non-empty array of messages, got {_json_type(messages)}"
                                   f"{' (empty)' if messages == [] else ''}")
    out = []
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(name, f"must be an object with 'role' and 'content', got {_json_type(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise APIError(400, f"'{name}.role' must be one of {', '.join(_ROLES)}, got {role!r}", param=f"{name}.role")
        unknown = set(m) - {"role", "content"} - _TOOL_KEYS.get(role, set())
        if unknown:
            raise _invalid(name, f"has unsupported key(s): {', '.join(sorted(unknown))}")
        message = {k: v for k, v in m.items() if k in _TOOL_KEYS.get(role, ())}
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
            raise _invalid(f"{name}.tool_calls", "must be an array of {\"function\": {\"name\", \"arguments\"}}")
        content = m.get("content")
        message["content"] = None if content is None and calls else _message_text(content, f"{name}.content")
        out.append({"role": _ROLES[role], **message})
    return out


def _message_text(content: Any, name: str) -> str:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"'{name}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}} "
                                    "(this server reads text only)", param=name)
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"'{name}' must be a string or an array of text parts, got {_json_type(content)}", param=name)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 on malformed JSON, a non-object, or a string anywhere in it,
    a field name included, that is not text: a lone surrogate such as "\\ud800", which no tokenizer
    or UTF-8 encoder takes)."""
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        what = "it nests too deeply" if isinstance(e, RecursionError) else e
        raise APIError(400, f"the request body is not valid JSON ({what})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_text(body)
    return body


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")  # Python's json reads NaN and Infinity; JSON has no such thing


def _check_text(body: dict) -> None:
    """400 naming a string or field name in `body` that can't be encoded as UTF-8."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if not _is_text(value):
                raise _not_text(path, value)
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (str, list, dict)))
        elif isinstance(value, dict):
            for key, v in value.items():
                name = f"{path}.{_printable(key)}" if path else _printable(key)
                if not _is_text(key):
                    raise _not_text(name, key, " (a field name)")
                todo.append((name, v))


def _is_text(s: str) -> bool:
    return lone_surrogate_at(s) is None


def _printable(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_text(name: str, s: str, what: str = "") -> APIError:
    at = lone_surrogate_at(s)
    return APIError(400, f"'{name}'{what} holds a lone surrogate ({_printable(s[at])} at character {at}), "
                         "which is not text", param=name)


def context_error(limit: int, prompt_tokens: int, max_tokens: Optional[int], param: str) -> APIError:
    """400 for a request that doesn't fit in the context window (OpenAI's code for it)."""
    if max_tokens is None:
        message = (f"This model's maximum context length is {limit} tokens, and the prompt has {prompt_tokens} "
                   "tokens: no room is left to generate. Shorten the prompt.")
    else:
        message = (f"This model's maximum context length is {limit} tokens, but {prompt_tokens + max_tokens} were "
                   f"requested ({prompt_tokens} in the prompt, {max_tokens} in max_tokens). "
                   "Shorten the prompt or lower max_tokens.")
    return APIError(400, message, param=param, code="context_length_exceeded")


# ---------------------------------------------------------------------- response bodies
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(kind: str, id: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    """The whole answer of a non-streamed request (`choices`: from `choice_body`, in index order)."""
    obj = "chat.completion" if kind == CHAT else "text_completion"
    return {"id": id, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}


def choice_body(kind: str, index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None,
                first: bool = False, stream: bool = False) -> dict:
    """One choice: of a whole answer (`message`), or of a streamed chunk (`delta`, the role in the first)."""
    if kind == COMPLETION:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if not stream:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk_body(
    kind: str, id: str, model: str, created: int, text: Optional[str] = None, first: bool = False,
    finish_reason: Optional[str] = None, usage: Optional[dict] = None, include_usage: bool = False,
    index: int = 0, logprobs: Optional[dict] = None,
) -> dict:
    """One streamed chunk (of choice `index`). Chat: the first delta carries the role. A usage chunk (usage
    given) has no choices; when the client asked for usage, the other chunks carry `"usage": null` (as OpenAI's do)."""
    obj = "chat.completion.chunk" if kind == CHAT else "text_completion"
    chunk: dict[str, Any] = {"id": id, "object": obj, "created": created, "model": model}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk
    if kind == COMPLETION:
        text = text or ""
    chunk["choices"] = [choice_body(kind, index, text, finish_reason, logprobs, first, stream=True)]
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_logprobs(token_ids: list[int], entries: list, token_text, offset: int) -> dict:
    """/v1/completions' `logprobs` of tokens `token_ids` (entries: engine TokenLogprobs, None for a token with
    none, the prompt's first): `top_logprobs` maps the k most likely tokens and the chosen one to their logprob
    (as vLLM does); `text_offset` is each token's character offset in the answer's text, from `offset`."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [None if e is None else _top_dict([*e.top, (e.token_id, e.logprob)], token_text) for e in entries]
    return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def _top_dict(pairs: list[tuple[int, float]], token_text) -> dict[str, float]:
    """{token string: logprob}; of tokens with the same string (byte pieces decode to U+FFFD alike) the likeliest."""
    top: dict[str, float] = {}
    for token_id, logprob in pairs:
        key = token_text(token_id)
        top[key] = max(logprob, top.get(key, -math.inf))
    return top


def chat_logprobs(entries: list, token_text) -> dict:
    """/v1/chat/completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token_id: int, logprob: float) -> dict:
        token = token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "backslashreplace"))}

    content = [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def sse(data: Union[dict, str]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    # a lone surrogate (only ever in an error message quoting something) goes out as its JSON escape
    return f"data: {payload}\n\n".encode("utf-8", "backslashreplace")
