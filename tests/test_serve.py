"""`litllm serve` end to end: a real server subprocess on 127.0.0.1, spoken to with the official `openai`
client (the protocol's oracle) and raw HTTP (httpx) where a client library would hide the bytes.

One server (module-scoped, --max_batch_size 4, with an API key) serves most tests; a second one
(--max_batch_size 1 --max_queue 0) tests the full queue and SIGTERM. Greedy outputs are compared
with `litllm generate` run on each prompt alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("litllm.engine", reason="the batching engine (litllm/engine.py) is not merged yet")

KEY = "test-key-123"
WINDOW = 128  # the tiny checkpoint's context window (tests/hf_models.py max_position_embeddings)


# ---------------------------------------------------------------------- server process
class Server:
    def __init__(self, checkpoint: Path, log: Path, *flags: str) -> None:
        self.log = log
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "litllm", "serve", str(checkpoint), "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self.url = self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                if line.startswith("Serving "):
                    found.append(line.split(" at ")[1].split()[0])
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"the server did not start: {self.log.read_text()[-3000:]}")
        return found[0].removesuffix("/v1")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60, **kw)

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stderr.close()
        return code


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("serve") / "server.log", "--max_batch_size", "4",
               "--api_key", KEY)
    yield s
    s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def model_id(checkpoint) -> str:
    return checkpoint.name


def generate_alone(checkpoint: Path, prompt: str, max_new_tokens: int, prompt_style: str = "default", **load) -> str:
    """What `litllm generate` prints for `prompt`, greedy (its command function, run in-process); `load`: more
    loader flags (`quantize=...`)."""
    from litllm.generate import generate

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        generate(checkpoint, prompt=prompt, prompt_style=prompt_style, max_new_tokens=max_new_tokens,
                 temperature=0.0, top_k=None, device="cpu", precision="32-true", **load)
    text = out.getvalue()
    assert text.endswith("\n")
    return text[:-1]


# ---------------------------------------------------------------------- the happy paths
def test_health_and_models(server, model_id):
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [model_id]


def test_completion_matches_generate_with_usage(server, checkpoint, model_id):
    from litllm.tokenizer import Tokenizer

    prompt = "The quick brown fox"
    expected = generate_alone(checkpoint, prompt, 12)
    r = server.client().completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == model_id
    assert r.choices[0].text == expected
    prompt_tokens = len(Tokenizer(checkpoint).encode(prompt))
    assert r.usage.prompt_tokens == prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")

    # streamed: same text, chunk by chunk; usage chunk last when asked for
    chunks = list(server.client().completions.create(
        model=model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_chat_matches_generate_streamed_and_not(server, checkpoint, model_id):
    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    # one user message is what `litllm generate` renders with the checkpoint's own prompt style
    from litllm.prompts import PromptStyle

    expected = generate_alone(checkpoint, messages[0]["content"], 10, PromptStyle.from_checkpoint(checkpoint).name)
    client = server.client()
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.completion_tokens <= 10

    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()

    # without include_usage: no usage chunk; the raw stream ends with data: [DONE]
    raw = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 3, "stream": True})
    events = [line for line in raw.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["choices"] for line in events[:-1])
    assert raw.headers["content-type"].startswith("text/event-stream")


def test_stop_sequences(server, model_id):
    client = server.client()
    prompt = "Numbers: 12345"
    full = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    # a two-character stop from the middle of the greedy answer (no replacement characters)
    start = next(i for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i: i + 2])
    stop = full[start: start + 2]
    expected = full[: full.index(stop)]
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "@@@@"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_chat_stops_at_the_special_end_of_turn_token(checkpoint, tmp_path):
    """A prompt style whose end of turn is one special token (chatml's `<|im_end|>`) stops there."""
    from conftest import make_im_end_checkpoint
    from litllm.tokenizer import Tokenizer

    folder = tmp_path / "im_end"
    reply = make_im_end_checkpoint(checkpoint, folder, "Hello there")
    s = Server(folder, tmp_path / "server.log", "--prompt_style", "chatml")
    try:
        r = s.client().chat.completions.create(model=folder.name, messages=[{"role": "user", "content": "Hello there"}],
                                               max_tokens=20, temperature=0)
    finally:
        s.stop()
    assert r.choices[0].message.content == Tokenizer(folder).decode(reply)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(reply) + 1


def test_seed_makes_sampling_reproducible(server, model_id):
    client = server.client()

    def run(seed):
        return client.completions.create(model=model_id, prompt="Pack my box", max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=seed, extra_body={"top_k": 40}).choices[0].text

    assert run(7) == run(7)


def test_default_max_tokens_fit_the_window(server, checkpoint, model_id):
    from litllm.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint)
    words = "fox " * 200
    ids = tokenizer.encode(words).tolist()[: WINDOW - 5]
    prompt = tokenizer.decode(ids)
    n_prompt = len(tokenizer.encode(prompt))
    assert WINDOW - 16 < n_prompt < WINDOW
    client = server.client()
    r = client.completions.create(model=model_id, prompt=prompt, temperature=0)  # no max_tokens
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens <= WINDOW - n_prompt
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt[:-40]}],
                                       temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= WINDOW


def test_concurrent_clients_equal_generate_alone(server, checkpoint, model_id):
    """8 clients, prompts of different lengths, some streaming, joining at different times (4 slots: some
    wait, and join the batch mid-decode): each greedy answer equals `litllm generate` on its prompt alone."""
    from conftest import SAMPLE_TEXT

    cases = [(SAMPLE_TEXT[: 5 + 23 * i], 6 + 3 * i, i % 2 == 1) for i in range(8)]  # (prompt, max_tokens, stream)
    expected = [generate_alone(checkpoint, p, n) for p, n, _ in cases]
    client = server.client()

    def ask(i):
        prompt, n, stream = cases[i]
        time.sleep(0.07 * (i % 4))
        if stream:
            chunks = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"client {i} (prompt of {len(cases[i][0])} chars): {g!r} != {e!r}"


def test_aborted_streams_leave_nothing_behind(server, model_id):
    """100 clients that disconnect mid-stream in a row: every slot comes back, memory stays flat."""
    client = server.client()

    def abort_one():
        stream = client.completions.create(model=model_id, prompt="The quick brown fox", max_tokens=100,
                                           temperature=0, stream=True)
        next(iter(stream))
        stream.close()

    def settled():
        for _ in range(100):
            h = server.get("/health").json()
            if h["num_in_flight"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"requests still in flight: {h}")

    for _ in range(10):  # warm-up: allocator pools, first-use caches
        abort_one()
    before, rss_before = settled(), server.rss_bytes()
    for _ in range(100):
        abort_one()
    after = settled()
    assert after["num_running"] == 0 and after["num_waiting"] == 0
    assert after["num_aborted"] - before["num_aborted"] >= 90  # they really were cut off mid-answer
    growth = server.rss_bytes() - rss_before
    assert growth < 30 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 aborted streams"
    # and the server still answers
    r = client.completions.create(model=model_id, prompt="The quick", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_disconnected_non_streaming_client_is_aborted(server):
    before = server.get("/health").json()["num_aborted"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 110 tokens are generated
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "The quick brown fox", "max_tokens": 110, "temperature": 0},
                   timeout=httpx.Timeout(30, read=0.005))
    for _ in range(100):
        health = server.get("/health").json()
        if health["num_in_flight"] == 0:
            break
        time.sleep(0.05)
    assert health["num_in_flight"] == 0 and health["num_running"] == 0
    assert health["num_aborted"] == before + 1


# ---------------------------------------------------------------------- bad input: OpenAI-style errors
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_malformed_json_is_400(server):
    error = _error(server.post("/v1/completions", "{not json"), 400)
    assert "JSON" in error["message"]
    _error(server.post("/v1/chat/completions", "[1, 2]"), 400)


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "regex"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": True}, "frobnicate"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
])
def test_bad_fields_are_400_naming_the_field(server, route, body, param):
    error = _error(server.post(route, body), 400)
    assert error["param"] == param and f"'{param}'" in error["message"]


def test_beyond_the_context_window_is_400_naming_the_limit(server, model_id):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="The quick brown fox", max_tokens=WINDOW)
    assert e.value.status_code == 400 and str(WINDOW) in e.value.message
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # a prompt longer than the window, no max_tokens
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "fox " * 300}])
    assert str(WINDOW) in e.value.message


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert "gpt-4o" in e.value.message
    _error(server.get("/v1/nothing-here"), 404)


def test_api_key(server, model_id):
    for key in ("wrong-key",):
        with pytest.raises(openai.AuthenticationError):
            server.client(key).completions.create(model=model_id, prompt="hi", max_tokens=2)
    _error(server.post("/v1/completions", {"prompt": "hi"}, key=None), 401)
    _error(server.get("/v1/models"), 401)
    assert server.get("/health").status_code == 200  # load balancers probe without a key


def test_the_server_survives_bad_input(server, model_id):
    for body in ("{", "null", '{"prompt": []}', '{"prompt": [999999]}', '{"messages": [{}]}'):
        assert server.post("/v1/completions", body).status_code == 400
        assert server.post("/v1/chat/completions", body).status_code == 400
    r = server.client().completions.create(model=model_id, prompt="The quick", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_port_in_use_fails_in_one_line(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "litllm", "serve", str(checkpoint), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and str(port) in lines[0], p.stderr


# ---------------------------------------------------------------------- full queue and shutdown
def test_full_queue_503_and_sigterm_exits_0(checkpoint, tmp_path, model_id):
    """One slot, no waiting room: of 8 requests sent at once, those that find the slot taken get 503 +
    Retry-After; SIGTERM with a request in flight lets it finish (or cancels it) and exits 0."""
    s = Server(checkpoint, tmp_path / "server.log", "--max_batch_size", "1", "--max_queue", "0", "--api_key", KEY)
    try:
        start = threading.Barrier(8)

        def ask(_):
            start.wait()
            return s.post("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 110, "temperature": 0})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert {r.status_code for r in answers} == {200, 503}
        for busy in (r for r in answers if r.status_code == 503):
            error = _error(busy, 503)
            assert int(busy.headers["Retry-After"]) >= 1 and "capacity" in error["message"]

        first_chunk = threading.Event()
        lines: list[str] = []

        def long_stream():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                              json={"prompt": "The quick brown fox", "max_tokens": 110, "temperature": 0,
                                    "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=long_stream)
        reader.start()
        assert first_chunk.wait(60)
        code = s.stop(signal.SIGTERM)
        reader.join(60)
    finally:
        s.stop(signal.SIGKILL)
    assert code == 0, s.log.read_text()[-3000:]
    assert lines[-1] == "data: [DONE]" or any('"error"' in t for t in lines)
    assert "Traceback" not in s.log.read_text()


def test_sigint_exits_0(server, model_id):
    """Last: Ctrl-C stops the shared server cleanly while a request is in flight."""
    client = server.client()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: client.completions.create(model=model_id, prompt="The quick brown fox",
                                                                max_tokens=60, temperature=0))
        time.sleep(0.05)
        code = server.stop(signal.SIGINT)
        with contextlib.suppress(openai.APIError):
            pending.result(timeout=60)
    assert code == 0, server.log.read_text()[-3000:]
    assert "Traceback" not in server.log.read_text()
