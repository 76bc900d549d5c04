"""`litllm serve` against hostile and unlucky clients (issue 20): one bad request never hurts another.

One server (module-scoped, tiny model, small limits so that each one is cheap to hit) takes a bounded
round of hostile requests, each while victim streams run through the official `openai` client:
sampling values that used to fail inside the engine, bodies over the size limit, a prompt that takes
seconds to tokenize, malformed fields and lone surrogates, clients that stall or vanish mid-request,
and last a shutdown past its grace period. Afterwards its greedy answers equal those it gave before
the abuse and its memory is within 20% of where it started.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import Server

openai = pytest.importorskip("openai")

MAX_REQUEST_BYTES = 400_000
READ_TIMEOUT = 1.0
VICTIM_PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Numbers: 12345", "Pack my box with"]
VICTIM_TOKENS = 110  # long enough to be still running while the hostile requests are answered
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8500  # 383 kB, within MAX_REQUEST_BYTES


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("abuse") / "server.log", "--max_batch_size", "4",
               "--max_request_bytes", str(MAX_REQUEST_BYTES), "--read_timeout", str(READ_TIMEOUT),
               "--shutdown_timeout", "0.5")
    yield s
    s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def before(server):
    """The server's greedy answers and RSS before any abuse, after one warm-up round that also tokenizes one long
    prompt: the tokenizer's worker threads keep what that took (a one-time high-water mark of ~65 MiB on some
    hosts), so a leak is memory that grows beyond it when the abuse repeats it."""
    answers = _greedy_answers(server)
    assert answers == _greedy_answers(server)
    long = server.post("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 2}, key=None)
    assert _error(long, 400)["code"] == "context_length_exceeded"
    return {"answers": answers, "rss": server.rss_bytes()}


def _greedy_answers(server) -> list[str]:
    client = server.client()
    model = client.models.list().data[0].id
    return [client.completions.create(model=model, prompt=p, max_tokens=VICTIM_TOKENS, temperature=0).choices[0].text
            for p in VICTIM_PROMPTS]


class Victims:
    """Greedy streams of VICTIM_PROMPTS through the openai client, in threads; `started` once each has its
    first chunk. `join()` -> their texts and when each ended."""

    def __init__(self, server) -> None:
        self.client = server.client()
        self.model = self.client.models.list().data[0].id
        self.first = [threading.Event() for _ in VICTIM_PROMPTS]
        self.pool = ThreadPoolExecutor(len(VICTIM_PROMPTS))
        self.futures = [self.pool.submit(self._run, i) for i in range(len(VICTIM_PROMPTS))]

    def _run(self, i: int) -> tuple[str, str, float]:
        chunks = self.client.completions.create(model=self.model, prompt=VICTIM_PROMPTS[i], max_tokens=VICTIM_TOKENS,
                                                temperature=0, stream=True)
        texts, reason = [], None
        for chunk in chunks:
            self.first[i].set()
            texts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(texts), reason, time.monotonic()

    def started(self) -> None:
        for event, future in zip(self.first, self.futures):
            while not event.wait(0.05):
                if future.done():
                    future.result()  # raises what the victim got
                    raise AssertionError("a victim stream ended before its first chunk")

    def join(self) -> tuple[list[str], float]:
        results = [f.result(timeout=120) for f in self.futures]
        self.pool.shutdown()
        assert all(reason == "length" for _, reason, _ in results), results
        return [text for text, _, _ in results], max(end for _, _, end in results)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------------- 1. a poison request fails alone
POISON = [  # (field the 400 must name, request fields as JSON): each used to pass validation and fail in
    # Engine.step, failing every request in flight with it
    ("temperature", '"temperature": 1e-320'),  # subnormal: 0 in float32, logits / 0 = NaN
    ("top_p", '"top_p": 1e-300'),  # 0 in float32: every token dropped
    ("seed", '"seed": 18446744073709551616'),  # 2**64: torch.Generator.manual_seed overflows
    ("stop[0]", '"stop": ["\\ud800"]'),  # a lone surrogate: the tokenizer raises on it
    ("temperature", '"temperature": 1e999'),  # inf
    (None, '"temperature": NaN'),  # not JSON
    (None, '"top_p": Infinity'),
    ("seed", '"seed": -1'),
    ("top_k", '"top_k": 0'),
]


def test_poison_requests_get_400_while_victims_stream(server, before):
    victims = Victims(server)
    victims.started()

    def poison(case):
        field, fields = case
        raw = '{"prompt": "Hello", "max_tokens": 5, "temperature": 0.5, ' + fields + "}"  # the last one counts
        assert _error(server.post("/v1/completions", raw, key=None), 400)["param"] == field, raw
        return time.monotonic()

    with ThreadPoolExecutor(len(POISON)) as pool:
        first_answered = min(pool.map(poison, POISON))
    # a tiny temperature that is a normal float32 used to overflow (logits / t = inf, inf - inf = NaN): now it
    # samples as greedy decoding does
    client = server.client()
    tiny, greedy = ({"temperature": 1e-37, "seed": 1}, {"temperature": 0})
    assert len({client.completions.create(model=victims.model, prompt="Hello", max_tokens=8, **t).choices[0].text
                for t in (tiny, greedy)}) == 1
    texts, last_victim_end = victims.join()
    assert texts == before["answers"]
    assert last_victim_end > first_answered, "the victims ended before any poison was answered: make them longer"


def test_a_request_failing_inside_the_engine_fails_alone(tiny_checkpoint, monkeypatch):
    """The second line: values that slip past validation (checks disabled here) and fail inside
    `Engine.step` (admitting, sampling) fail their own request with a 500; the others run on unchanged."""
    import litllm.engine as engine_module
    from litllm.engine import Engine, Request, Sampling, generate_ids
    from litllm.model import GPT
    from litllm.serve.bridge import EngineLoop
    from litllm.serve.protocol import APIError
    from litllm.tokenizer import Tokenizer

    model, tokenizer = GPT.from_checkpoint(tiny_checkpoint).eval(), Tokenizer(tiny_checkpoint)
    victims = [Request(tokenizer.encode(p).tolist(), 20) for p in VICTIM_PROMPTS[:2]]
    expected = [generate_ids(model, r.prompt_ids, 20) for r in victims]
    monkeypatch.setattr(engine_module, "check_sampling_args", lambda *args: None)
    monkeypatch.setattr(engine_module, "check_text", lambda *args: None)
    poison = [Request(victims[0].prompt_ids, 20, sampling) for sampling in (
        Sampling(temperature=math.nan), Sampling(temperature=1.0, seed=2**64))]
    poison.append(Request(victims[0].prompt_ids, 20, stop_strings=["\ud800"]))

    async def serve_all():
        bridge = EngineLoop(Engine(model, tokenizer, max_batch_size=3, max_seq_length=64), capacity=8)
        bridge.start(asyncio.get_running_loop())
        try:
            queues = [bridge.submit(r)[1] for r in [victims[0], *poison, victims[1]]]
            answers = []
            for queue in queues:
                tokens = []
                while True:
                    out = await asyncio.wait_for(queue.get(), 60)
                    if isinstance(out, Exception):
                        answers.append(out)
                        break
                    tokens += out.token_ids
                    if out.finished:
                        answers.append(tokens)
                        break
            return answers, bridge.num_in_flight
        finally:
            bridge.stop()

    answers, in_flight = asyncio.run(serve_all())
    assert [answers[0], answers[-1]] == expected
    for error in answers[1:-1]:
        assert isinstance(error, APIError) and error.status == 500 and "this request" in error.message
    assert in_flight == 0


def test_generate_rejects_sampling_flags_that_would_fail(tiny_checkpoint):
    """`litllm generate` runs the same checks: one error line naming the flag, before loading anything."""
    from litllm.errors import LitLLMError
    from litllm.generate import generate

    for flag, value in (("temperature", 1e-320), ("top_p", 1e-300), ("seed", 2**64 + 1), ("temperature", math.nan)):
        with pytest.raises(LitLLMError, match=f"^--{flag} "):
            generate(tiny_checkpoint, **{flag: value}, max_new_tokens=2, device="cpu", precision="32-true")


# ---------------------------------------------------------------------- 2. size limits, tokenizing off the loop
def test_body_over_the_limit_is_413_and_stop_strings_are_bounded(server, before):
    error = _error(server.post("/v1/completions", json.dumps({"prompt": "x" * MAX_REQUEST_BYTES}), key=None), 413)
    assert error["code"] == "request_too_large" and str(MAX_REQUEST_BYTES) in error["message"]

    def chunked():  # no Content-Length: counted while read
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 10_000 + 1):
            yield b"x" * 10_000
        yield b'"}'

    _error(httpx.post(server.url + "/v1/completions", content=chunked(), timeout=60), 413)
    for stop in (["a"] * 17, ["b" * 257]):
        assert _error(server.post("/v1/completions", {"prompt": "Hi", "stop": stop}, key=None), 400)["param"] == "stop"


def test_a_long_prompt_is_tokenized_off_the_event_loop(server, before):
    """A prompt that takes about half a second to tokenize (then is too long for the window): /health answers
    meanwhile as fast as ever (the event loop is free; the tokenizer lets go of the GIL)."""
    done = threading.Event()
    latencies = []

    def big():
        try:
            return server.post("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 2}, key=None)
        finally:
            done.set()

    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        answer = pool.submit(big)
        while not done.is_set():
            t = time.monotonic()
            assert server.get("/health").status_code == 200
            latencies.append(time.monotonic() - t)
            time.sleep(0.02)
        took = time.monotonic() - start
    assert _error(answer.result(), 400)["code"] == "context_length_exceeded"
    assert took > 0.15, f"the prompt took only {took:.2f} s: make it longer"
    # on the event loop, /health would wait for the whole tokenization (a latency close to `took`)
    assert max(latencies) < took / 2, f"/health took {max(latencies):.2f} s while a {took:.2f} s prompt was tokenized"


# ---------------------------------------------------------------------- 3. malformed requests are 4xx, never 500
MALFORMED = [  # (route, raw body, the field the 400 names)
    ("chat", '{"messages": [{"role": ["user"], "content": "Hi"}]}', "messages[0].role"),
    ("chat", '{"messages": [{"role": {"r": 1}, "content": "Hi"}]}', "messages[0].role"),
    ("completions", '{"prompt": "Hi \\ud800 there"}', "prompt"),
    ("chat", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    ("chat", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    ("completions", '{"model": "m\\ud800", "prompt": "Hi"}', "model"),
    ("completions", '{"prompt": "Hi", "\\ud800": 1}', "\\ud800"),
    ("completions", '{"prompt": "Hi", "stream_options": {"\\udc00": true}, "stream": true}', "stream_options.\\udc00"),
    ("completions", '{"prompt": "Hi", "temperature": ' + "9" * 400 + "}", "temperature"),
    ("completions", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
]


def test_malformed_requests_are_400_and_keep_the_connection(server, before):
    victims = Victims(server)
    victims.started()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for route, raw, param in MALFORMED:
            r = http.post(f"/v1/{route.replace('chat', 'chat/completions')}", content=raw)
            assert _error(r, 400)["param"] == param, raw[:80]
            assert r.headers.get("connection") != "close"  # the client's next request reuses the connection
        model = http.get("/v1/models").json()["data"][0]["id"]
        ok = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
    assert victims.join()[0] == before["answers"]


# ---------------------------------------------------------------------- 4. slow and vanishing clients
def test_stalled_clients_time_out_and_a_vanished_one_is_one_log_line(server, before):
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    stalled = {
        "nothing": b"",
        "headers": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        "body": b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": "Hi',
    }
    sockets = {}
    for name, data in stalled.items():
        sockets[name] = socket.create_connection((host, port))
        sockets[name].sendall(data)
    # a client that vanishes mid-body
    with socket.create_connection((host, port)) as gone:
        gone.sendall(stalled["body"])
        time.sleep(0.2)
    victims = Victims(server)
    replies = {}
    for name, sock in sockets.items():
        sock.settimeout(READ_TIMEOUT + 10)
        replies[name] = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            replies[name] += chunk
        sock.close()
    assert replies["nothing"] == b"" and replies["headers"] == b""  # closed
    head, _, body = replies["body"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"
    assert victims.join()[0] == before["answers"]
    log = server.log.read_text()
    assert log.count("disconnected while sending its request body") == 1
    assert log.count("did not arrive within") == 2
    assert "Traceback" not in log, log[-3000:]


# ---------------------------------------------------------------------- afterwards: as before
def test_after_the_abuse_answers_and_memory_are_as_before(server, before):
    assert _greedy_answers(server) == before["answers"]
    health = server.get("/health").json()
    assert health["num_in_flight"] == 0 and health["num_running"] == 0
    rss = server.rss_bytes()
    assert abs(rss - before["rss"]) < 0.2 * before["rss"], f"RSS {before['rss'] / 2**20:.0f} -> {rss / 2**20:.0f} MiB"


# ---------------------------------------------------------------------- 5. shutdown past the grace period
SHUTDOWN_STREAMS = 48  # within the server's default --max_queue (64) + 4 slots: none is refused with a 503


def test_shutdown_past_the_grace_period_ends_each_stream_with_an_error(server):
    """Last (it stops the server): 48 streams on 4 slots (seconds of work even on a fast idle machine, where the
    tiny model decodes a step in about a millisecond), SIGTERM, --shutdown_timeout 0.5 s: those still running or
    waiting then end with an error event and [DONE]; no traceback; exit 0."""
    opened = threading.Semaphore(0)

    def stream(_):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "The quick brown fox", "max_tokens": VICTIM_TOKENS, "stream": True,
                                "temperature": 0}) as r:
            opened.release()
            return [line for line in r.iter_lines() if line]

    with ThreadPoolExecutor(SHUTDOWN_STREAMS) as pool:
        streams = [pool.submit(stream, i) for i in range(SHUTDOWN_STREAMS)]
        for _ in streams:
            assert opened.acquire(timeout=60)
        code = server.stop(signal.SIGTERM)
        events = [s.result(timeout=60) for s in streams]
    assert code == 0
    assert all(e[-1] == "data: [DONE]" for e in events)
    cut = [e for e in events if '"error"' in e[-2]]
    assert cut, "every stream finished within the grace period: make them longer"
    assert all("shutting down" in json.loads(e[-2][6:])["error"]["message"] for e in cut)
    log = server.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
