"""The FastAPI app: routes, API-key check, OpenAI-style errors, server-sent events.

Routes: `GET /health` (200 once the model is loaded; also the engine's counters), `GET /metrics`
(Prometheus, see metrics.py), `GET /v1/models`,
`POST /v1/completions` (prompt text, or token ids, continued as is), `POST /v1/chat/completions`
(messages rendered with the checkpoint's prompt style or chat template, as `litllm chat` renders
them). Each generation request becomes one engine `Request`; the handler then waits on its queue
(see bridge.py). A client that disconnects has its request aborted, which frees its KV-cache slot.
Server-sent events are two lines of framing (`protocol.sse`) over Starlette's StreamingResponse,
which also notices disconnects; sse-starlette would add nothing we use.

Limits: a body over `max_request_bytes` is a 413 (read no further), a body that takes over `read_timeout`
seconds to arrive a 408; parsing and tokenizing run in a worker thread, so a huge prompt never stalls
the event loop that serves every other stream. Error bodies are ASCII JSON, whatever the request held.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Optional

# this module is imported by `litllm serve` only (after it checked that the `serve` extra is installed)
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from litllm.engine import SamplingError
from litllm.errors import LitLLMError
from litllm.serve.bridge import EngineLoop
from litllm.serve.metrics import ServerMetrics
from litllm.serve.tools import call_wrapping, parse_tool_calls, parse_tools, template_messages, tool_format
from litllm.serve.protocol import (
    CHAT, COMPLETION, DEFAULT_COMPLETION_MAX_TOKENS, APIError, Params, chat_logprobs, choice_body, chunk_body,
    completion_logprobs, context_error, new_id, now, parse_json, parse_messages, parse_params, parse_prompts,
    response_body, sse, usage_body,
)


@dataclass
class ServedModel:
    """What the routes need to know about the model being served."""

    name: str  # the id clients pass as `model` (the checkpoint folder's name)
    tokenizer: object
    prompt_style: object
    max_seq_length: int
    # engine Request stop fields (`engine.default_stops`): completions stop at EOS only (the prompt is
    # raw text), chat also at the prompt style's stops, as `litllm chat` does
    completion_stops: dict = field(default_factory=dict)
    chat_stops: dict = field(default_factory=dict)
    created: int = field(default_factory=now)
    vocab_size: Optional[int] = None  # the model's logits width (grammars mask that many tokens)
    _grammars: Optional[object] = None

    def grammar(self, schema: Optional[dict], wrapping: Optional[tuple[str, str]] = None):
        """The compiled grammar of JSON valid against `schema` (None: no constraint), between the texts of `wrapping`
        (a forced tool call's); a 400 if xgrammar rejects it."""
        if schema is None:
            return None
        from litllm.constrain import Grammars

        if self._grammars is None:
            try:
                self._grammars = Grammars(self.tokenizer, self.vocab_size)
            except LitLLMError as e:  # xgrammar not installed
                raise APIError(400, f"'response_format' is not available on this server: {e}",
                               param="response_format") from None
        try:
            if wrapping is not None:
                return self._grammars.structural(wrapping[0], schema, wrapping[1])
            return self._grammars.json_schema(schema)
        except (RuntimeError, ValueError) as e:  # xgrammar's error for a schema it can't compile
            raise APIError(400, f"'response_format' holds a JSON schema that can't be enforced: {e}",
                           param="response_format") from None


log = logging.getLogger("uvicorn.error")  # uvicorn's own log, so our lines come out as its do


def build_app(
    served: ServedModel, bridge: EngineLoop, api_key: Optional[str] = None, *, max_request_bytes: int,
    read_timeout: float,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        bridge.start(asyncio.get_running_loop())
        yield
        bridge.stop()

    app = FastAPI(title="litllm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    bridge.metrics = metrics = ServerMetrics(bridge.engine)
    _answer_errors_as_openai_does(app)

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "no API key given" if not given else "invalid API key"
            raise APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "litllm",
                "max_model_len": served.max_seq_length}

    @app.get("/health")
    async def health():
        engine = bridge.engine
        return {"status": "ok", "model": served.name, "num_running": engine.num_running,
                "num_waiting": engine.num_waiting, "num_in_flight": bridge.num_in_flight,
                "num_aborted": bridge.num_aborted}

    @app.get("/metrics")
    async def prometheus_metrics():  # no API key, as vLLM's: scrapers rarely send one
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_api_key(request)
        if model_id != served.name:
            raise _unknown_model(model_id, served.name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(COMPLETION, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(CHAT, request)

    async def generate(kind: str, request: Request):
        check_api_key(request)
        raw = await _read_body(request, max_request_bytes, read_timeout)
        job = await run_in_threadpool(_prepare, kind, raw, served)
        id, created = new_id(kind), now()
        if job.params.stream:
            events = _stream(id, created, job, served, bridge)
            await events.__anext__()  # submits now: a full queue or a bad request is still a plain HTTP error
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering (nginx)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        choices = await _collect(request, bridge, job)
        if choices is None:  # the client has gone: nobody reads this
            return Response(status_code=499)
        bodies = [job.choice(served, i, *choice) for i, choice in enumerate(choices)]
        return response_body(kind, id, served.name, created, bodies, job.usage(choices))

    return app


def _answer_errors_as_openai_does(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method
        code = "not_found" if e.status_code == 404 else None
        error = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code,
                         headers=getattr(e, "headers", None))
        return _error_response(error)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))


def _error_response(error: APIError) -> Response:
    """The error as JSON, escaped to ASCII: a message quoting the request (a lone surrogate included) always encodes."""
    return Response(json.dumps(error.body()), status_code=error.status, headers=error.headers,
                    media_type="application/json")


async def _read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request body: 413 beyond `max_bytes` (before reading it when Content-Length tells), 408 when it takes
    over `timeout` s; a client that disconnects meanwhile is one log line."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes, f"{int(declared)} bytes")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes, f"over {max_bytes} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s ({size} bytes came)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        client = request.client
        log.info("%s:%s - the client disconnected while sending its request body (%d bytes came)",
                 client.host if client else "?", client.port if client else "?", size)
        raise APIError(499, "the client disconnected") from None  # nobody reads the answer
    return b"".join(chunks)


def _too_large(max_bytes: int, size: str) -> APIError:
    return APIError(413, f"the request body ({size}) exceeds this server's limit of {max_bytes} bytes "
                         "(litllm serve --max_request_bytes)", code="request_too_large")


@dataclass
class Job:
    """One API request as engine Requests: choice i runs `requests[i]`, the (i // n)-th prompt's (i % n)-th
    sample; `echo_texts[i]`: the text it answers with before its own (completions' echo)."""

    kind: str
    params: Params
    requests: list
    echo_texts: list[str]
    tool_format: Optional[str] = None  # chat with tools (tool_choice not none): the answers' calls are parsed

    def tool_message(self, text: str, finish_reason: Optional[str]) -> tuple[Optional[dict], Optional[str]]:
        """({"content", "tool_calls"}, "tool_calls") when the answer is tool calls; (None, finish_reason) if not."""
        if self.tool_format is None:
            return None, finish_reason
        content, calls = parse_tool_calls(self.tool_format, text)
        return ({"content": content, "tool_calls": calls}, "tool_calls") if calls else (None, finish_reason)

    def choice(self, served: ServedModel, index: int, text: str, outputs: list, finish_reason: Optional[str],
               stream: bool = False, first: bool = False, offset: Optional[int] = None) -> dict:
        """The body of choice `index` (a whole answer, or a chunk's) holding `text` and `outputs`' tokens;
        `offset`: where a chunk's first token starts in the whole answer's text (completions' text_offset)."""
        logprobs = None
        if self.params.logprobs is not None:
            entries = [e for out in outputs for e in out.logprobs or ()]
            token_text = _token_text(served.tokenizer)
            if self.kind == CHAT:
                logprobs = chat_logprobs(entries, token_text)
            else:
                ids = [e.token_id for e in entries]
                prompt = next((out.prompt_logprobs for out in outputs if out.prompt_logprobs), None)
                if offset is None:
                    offset = 0 if self.params.echo else len(self.echo_texts[index])
                if self.params.echo and prompt is not None:  # the prompt's tokens come first
                    ids, entries = self.requests[index].prompt_ids + ids, prompt + entries
                logprobs = completion_logprobs(ids, entries, token_text, offset)
        if self.params.echo and (first or not stream):
            text = self.echo_texts[index] + text
        calls, finish_reason = self.tool_message(text, finish_reason) if not stream else (None, finish_reason)
        body = choice_body(self.kind, index, text, finish_reason, logprobs, first=first, stream=stream)
        if calls is not None:
            body["message"].update(calls)
        return body

    def usage(self, choices: list) -> dict:
        """Each prompt counted once, however many choices it has."""
        outs = [outputs[-1] for _, outputs, _ in choices]
        prompts = sum(out.prompt_tokens for out in outs[:: self.params.n])
        return usage_body(prompts, sum(out.completion_tokens for out in outs))


def _token_text(tokenizer):
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return text


def _prepare(kind: str, raw: bytes, served: ServedModel) -> Job:
    """The request body -> a Job: parsed, validated, rendered and tokenized. In a worker thread: a prompt of
    megabytes takes a while, and the event loop serves every other stream."""
    body = parse_json(raw)
    params = parse_params(kind, body)
    if params.model is not None and params.model != served.name:
        raise _unknown_model(params.model, served.name)
    requests, echo_texts = [], []
    tools = parse_tools(body) if kind == CHAT else None
    fmt = _tool_format(served, tools, params)
    forced = tools.forced_schema(fmt) if tools else None
    grammar = served.grammar(forced, call_wrapping(fmt)) if forced else served.grammar(params.json_schema)
    for ids, text in _prompts(kind, body, served, tools):
        for j in range(params.n):
            requests.append(_engine_request(ids, "prompt" if kind == COMPLETION else "messages", params, j, served,
                                            served.completion_stops if kind == COMPLETION else served.chat_stops))
            requests[-1].grammar = grammar
            echo_texts.append(text)
    return Job(kind, params, requests, echo_texts, fmt if tools and tools.choice != "none" else None)


def _tool_format(served: ServedModel, tools, params: Params) -> Optional[str]:
    """The served template's tool-call format when the request has tools (a 400 if it can't have them)."""
    if tools is None:
        return None
    fmt = tool_format(served.prompt_style.template)
    if fmt is None:
        raise APIError(400, f"'tools' can't be used: the {served.prompt_style.name} prompt style's template does not "
                            "render tools (serve a checkpoint whose chat template does)", param="tools")
    if params.json_schema is not None and tools.choice not in ("auto", "none"):
        raise APIError(400, "'response_format' can't be combined with a forced 'tool_choice'", param="tool_choice")
    return fmt


def _prompts(kind: str, body: dict, served: ServedModel, tools=None) -> list[tuple[list[int], str]]:
    """[(token ids, text)] of each prompt: completions' prompts (strings or token ids), or the rendered chat (with
    `tools`' function specs, as `apply_chat_template(tools=...)` renders them)."""
    tokenizer = served.tokenizer
    if kind == CHAT:
        messages = template_messages(parse_messages(body))
        style = served.prompt_style
        try:  # exactly what `litllm chat` feeds the model
            text = style.render_messages(messages, add_generation_prompt=True, tools=tools and tools.tools)
            ids = style.encode(tokenizer, text).tolist()
        except LitLLMError as e:
            raise APIError(400, f"'messages' can't be rendered with the {style.name} prompt style: {e}",
                           param="messages") from None
        return [(ids, "")]
    prompts = []
    for prompt in parse_prompts(body):
        if isinstance(prompt, str):
            prompts.append((tokenizer.encode(prompt).tolist(), prompt))
            continue
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"'prompt' holds token id {bad[0]}, outside the vocabulary "
                                f"(0..{tokenizer.vocab_size - 1})", param="prompt")
        prompts.append((list(prompt), tokenizer.decode(prompt, skip_special_tokens=False)))
    return prompts


def _unknown_model(name: str, served: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist: this server serves '{served}'", param="model",
                    code="model_not_found")


def _engine_request(ids: list[int], param: str, params: Params, sample: int, served: ServedModel, stops: dict):
    """An engine Request for the `sample`-th choice of a prompt (seed + sample), max_tokens settled against the
    context window."""
    from litllm.engine import SEED_LIMIT, Request, Sampling
    from litllm.inference import tokens_to_generate

    if not ids:
        raise APIError(400, f"'{param}' is empty (no tokens)", param=param)
    limit = served.max_seq_length
    room = limit - len(ids)
    if params.max_tokens == 0 and room >= 0:  # scoring the prompt only (echo): it may fill the window
        max_tokens = 0
    else:  # a default never fails: it shrinks to the room the window leaves (chat's default is all of it)
        default = DEFAULT_COMPLETION_MAX_TOKENS if param == "prompt" else limit
        try:
            max_tokens = tokens_to_generate(len(ids), limit, params.max_tokens, default, "max_tokens", say=_quiet)
        except LitLLMError:
            raise context_error(limit, len(ids), params.max_tokens, param if room < 1 else "max_tokens") from None
    seed = None if params.seed is None else (params.seed + sample) % SEED_LIMIT
    sampling = Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)
    return Request(prompt_ids=ids, max_new_tokens=max_tokens, sampling=sampling,
                   stop_strings=[*params.stop, *stops.get("stop_strings", ())],
                   stop_token_ids=list(stops.get("stop_token_ids", ())), logprobs=params.logprobs,
                   prompt_logprobs=params.logprobs if params.echo else None)


def _quiet(line: str) -> None:
    """A default max_tokens shrunk to fit the window is the documented behaviour, not worth a log line."""


def _submit(bridge: EngineLoop, job: Job) -> tuple[dict[int, int], asyncio.Queue]:
    """Submit the job's requests -> ({engine request id: choice index}, the queue of all their Outputs)."""
    try:
        ids, queue = bridge.submit_many(job.requests)
    except SamplingError as e:  # the engine's own checks, a second line behind parse_params
        raise APIError(400, f"'{e.field}' {e.problem}", param=e.field) from None
    except LitLLMError as e:  # (e.g. the context window)
        raise APIError(400, str(e)) from None
    return {request_id: index for index, request_id in enumerate(ids)}, queue


def _abort(bridge: EngineLoop, choices: dict[int, int]) -> None:
    for request_id in choices:
        bridge.abort(request_id)  # no-op when it has finished


async def _next_output(queue: asyncio.Queue):
    out = await queue.get()
    if isinstance(out, Exception):
        raise out
    if out.finish_reason == "abort":  # aborted by the server itself: it is shutting down
        raise APIError(503, "the request was cancelled: the server is shutting down", headers={"Retry-After": "5"})
    return out


async def _collect(request, bridge: EngineLoop, job: Job):
    """Wait for the whole answer -> [(text, Outputs, finish_reason)] per choice; None (and the requests
    aborted) if the client disconnects first."""
    choices, queue = _submit(bridge, job)

    async def answer():
        texts: list[list[str]] = [[] for _ in choices]
        outputs: list[list] = [[] for _ in choices]
        left = len(choices)
        while left:
            out = await _next_output(queue)
            index = choices[out.request_id]
            texts[index].append(out.text)
            outputs[index].append(out)
            left -= out.finished
        return [("".join(t), outs, outs[-1].finish_reason) for t, outs in zip(texts, outputs)]

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answering, leaving = asyncio.ensure_future(answer()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answering, leaving):
            task.cancel()
        _abort(bridge, choices)
    if not answering.done() or answering.cancelled():
        return None
    return answering.result()


async def _stream(id, created, job: Job, served: ServedModel, bridge: EngineLoop):
    """Server-sent events of one API request, its choices' chunks interleaved (each with its `index`). The first
    `__anext__` submits it and yields nothing useful; from then on `finally` aborts its engine requests however
    the stream ends (client gone included)."""
    choices, queue = _submit(bridge, job)
    kind, model, include_usage = job.kind, served.name, job.params.include_usage
    chunk = {"kind": kind, "id": id, "model": model, "created": created, "include_usage": include_usage}
    finished: list = [None] * len(choices)
    offsets: list = [None] * len(choices)  # completions' text_offset goes on across a choice's chunks
    started = [kind == CHAT] * len(choices)
    held = [""] * len(choices)  # the text of answers that may be tool calls
    try:
        yield b""
        if kind == CHAT:  # the role at once, before the prompt is even prefilled
            for index in range(len(choices)):
                yield sse(chunk_body(**chunk, index=index, text="", first=True))
        while not all(finished):
            try:
                out = await _next_output(queue)
            except APIError as e:  # headers are sent: the error goes in the stream, as OpenAI does
                yield sse(e.body())
                break
            index = choices[out.request_id]
            if job.tool_format is not None:  # calls are parsed from the whole answer: it goes out once done
                held[index] += out.text
                if out.finished:
                    finished[index] = out
                    for data in _tool_chunks(job, chunk, index, held[index], out.finish_reason):
                        yield sse(data)
                continue
            first, started[index] = not started[index], True  # (chat: the role went out already)
            body = job.choice(served, index, out.text, [out], None, stream=True, first=first and kind == COMPLETION,
                              offset=offsets[index])
            if kind == COMPLETION and body["logprobs"] and body["logprobs"]["tokens"]:
                offsets[index] = body["logprobs"]["text_offset"][-1] + len(body["logprobs"]["tokens"][-1])
            if first or out.text or (out.token_ids and body["logprobs"] is not None):
                yield sse({**chunk_body(**chunk), "choices": [body]})
            if out.finished:
                finished[index] = out
                yield sse(chunk_body(**chunk, index=index, finish_reason=out.finish_reason))
        else:
            if include_usage:
                yield sse(chunk_body(**chunk, usage=job.usage([(None, [out], None) for out in finished])))
        yield sse("[DONE]")
    finally:
        _abort(bridge, choices)


def _tool_chunks(job: Job, chunk: dict, index: int, text: str, finish_reason: str) -> list[dict]:
    """The last chunks of a streamed answer that may be tool calls: its content or its calls, then its finish."""
    message, reason = job.tool_message(text, finish_reason)
    delta = {"content": text} if message is None else {
        "content": message["content"],
        "tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
    body = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    return [{**chunk_body(**chunk), "choices": [body]}, chunk_body(**chunk, index=index, finish_reason=reason)]
