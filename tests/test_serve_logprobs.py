"""`litllm serve`'s logprobs, echo, n and batched prompts, through the official `openai` client and raw HTTP,
checked against transformers' `log_softmax` of the same checkpoint's logits (the oracle)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from test_evaluate import chat_checkpoint, local_tasks, tasks_dir  # noqa: F401 (fixtures)
from test_serve import KEY, Server

openai = pytest.importorskip("openai")

TOL = 1e-4
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "server.log", "--max_batch_size", "4",
               "--api_key", KEY, "--prefill_chunk", "4")  # prompts span several chunks
    yield s
    s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_checkpoint):
    """ids -> transformers' log_softmax (T, vocab) after each of them."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)

    return run


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from litllm.tokenizer import Tokenizer

    return Tokenizer(tiny_checkpoint)


def _greedy(ref, ids: list[int], n: int) -> list[int]:
    """The prompt and n greedy tokens after it, by transformers."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(ref(ids)[-1].argmax()))
    return ids


def _check_echoed(choice: dict, ids: list[int], ref, k: int) -> None:
    """A completions choice with echo: its logprobs (prompt and generated tokens) equal transformers'."""
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before it
    rows = ref(ids)
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - rows[i - 1, ids[i]].item()) < TOL, i
        # the k most likely tokens and the chosen one (vLLM's shape; tokens that decode to the same string,
        # such as byte pieces, share a key)
        top = lp["top_logprobs"][i].values()
        allowed = [*rows[i - 1].topk(k).values.tolist(), rows[i - 1, ids[i]].item()]
        assert max(top) == pytest.approx(allowed[0], abs=TOL)
        assert all(min(abs(v - a) for a in allowed) < TOL for v in top)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_completion_echo_logprobs_match_transformers(server, tok, hf_logprobs):
    ids = tok.encode(PROMPT).tolist()
    r = server.client().completions.create(model=server_model(server), prompt=PROMPT, max_tokens=5, temperature=0,
                                           logprobs=3, echo=True).model_dump()
    choice = r["choices"][0]
    assert choice["text"].startswith(PROMPT)
    _check_echoed(choice, _greedy(hf_logprobs, ids, 5), hf_logprobs, 3)
    assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == 5


def test_scoring_only_batch_of_token_ids(server, tok, hf_logprobs):
    """lm-eval's request: token-id prompts in a batch, echo, max_tokens 0 (or 1), logprobs 1."""
    prompts = [tok.encode(p).tolist() for p in (PROMPT, "Pack my box with five dozen liquor jugs!")]
    r = server.post("/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for ids, choice in zip(prompts, choices):
        assert choice["finish_reason"] == "length"
        lp = choice["logprobs"]["token_logprobs"]
        assert len(lp) == len(ids) and lp[0] is None
        ref = hf_logprobs(ids)
        expected = [ref[j - 1, ids[j]].item() for j in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp[1:], expected)) < TOL
    assert r.json()["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_chat_logprobs_match_transformers_streamed_too(server, tiny_checkpoint, hf_logprobs):
    from litllm.prompts import PromptStyle
    from litllm.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    style = PromptStyle.from_checkpoint(tiny_checkpoint, None)
    tokenizer = Tokenizer(tiny_checkpoint)
    prompt_ids = style.encode(tokenizer, style.render_messages(messages, add_generation_prompt=True)).tolist()
    client = server.client()
    r = client.chat.completions.create(model=server_model(server), messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and r.choices[0].message.content is not None
    ids = list(prompt_ids)
    for entry in content:
        row = hf_logprobs(ids)[-1]
        token = int(row.argmax())
        assert abs(entry.logprob - row[token].item()) < TOL
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=TOL)
        assert bytes(entry.bytes).decode("utf-8") == entry.token
        ids.append(token)
    stream = client.chat.completions.create(model=server_model(server), messages=messages, max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for chunk in stream for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_stream_with_echo_and_logprobs(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    whole = server.post("/v1/completions", body).json()["choices"][0]
    lines = [line for line in server.post("/v1/completions", {**body, "stream": True}).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    token_lps = [lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert text == whole["text"]
    assert token_lps[0] is None and whole["logprobs"]["token_logprobs"][0] is None
    assert token_lps[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=TOL)
    offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]


def test_no_logprobs_unless_asked(server):
    r = server.client().completions.create(model=server_model(server), prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None and r.choices[0].text


def server_model(server) -> str:
    return server.client().models.list().data[0].id


# ---------------------------------------------------------------------- lm-eval, a real client of the server
def test_lm_eval_local_completions_matches_litllm_evaluate(server, tiny_checkpoint, tasks_dir, local_tasks,
                                                           monkeypatch):
    """lm-eval's `local-completions` model scoring (echo + logprobs on token-id prompts, batched) and generating
    through the server answers what `litllm evaluate` (LitLLMLM, in-process) answers, request by request."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from test_evaluate import GEN_TASK, MC_TASK, _assert_same_answers, _litlm, _responses, _run

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    served = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model=server_model(server), tokenizer_backend="huggingface",
        tokenizer=str(tiny_checkpoint), add_bos_token=True, batch_size=4, max_length=128, max_retries=1,
    )
    tasks = [MC_TASK, GEN_TASK]
    expected = _run(_litlm(tiny_checkpoint, 4), local_tasks, tasks, num_fewshot=1)
    got = _run(served, local_tasks, tasks, num_fewshot=1)
    _assert_same_answers(expected, got, tasks, TOL)
    assert any(answer for doc in _responses(got, GEN_TASK) for answer in doc)  # not all empty


# ---------------------------------------------------------------------- n > 1: one prefill per prompt
def _run_engine(engine, requests, abort_first_after: int | None = None) -> dict[int, list[int]]:
    ids = engine.add_many(requests)
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    steps = 0
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        steps += 1
        if steps == abort_first_after:
            engine.abort(ids[0])
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("abort_leader", [False, True])
def test_samples_of_one_prompt_share_its_prefill(tiny_checkpoint, tok, abort_leader):
    """n seeded samples of one prompt: one prefill forward (the others copy its KV rows), and each sample is
    what the same request gives alone; when the first is aborted mid-prefill, the others prefill on their own."""
    from litllm.engine import Engine, Request, Sampling
    from litllm.model import GPT

    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog.").tolist()
    n = 3
    requests = [Request(prompt, 8, Sampling(temperature=1.0, seed=7 + j), logprobs=1) for j in range(n)]
    alone = []
    for request in requests:
        with Engine(model, tok, 1, 64) as engine:
            alone += _run_engine(engine, [request])
    prefills = []
    decode = model.decode
    model.decode = lambda idx, *a, **kw: (prefills.append(idx.shape[1]) if idx.shape[1] > 1 else None,
                                          decode(idx, *a, **kw))[1]
    try:
        with Engine(model, tok, 4, 64, prefill_chunk=4) as engine:
            shared = _run_engine(engine, requests, abort_first_after=1 if abort_leader else None)
    finally:
        del model.decode
    chunks = -(-len(prompt) // 4)
    if abort_leader:  # its first chunk, then the other two prompts on their own (one copies the other's)
        assert shared[1:] == alone[1:] and len(shared[0]) < 8
        assert len(prefills) == 1 + chunks
    else:
        assert shared == alone and len(set(map(tuple, alone))) > 1  # the samples differ: their own generators
        assert len(prefills) == chunks  # one prompt's chunks, once


def test_n_choices_through_the_openai_client(server, tok):
    """n=3 seeded: choice j is the request alone with seed + j, reproducibly; streamed, the chunks carry each
    choice's index; usage counts the prompt once."""
    client, model = server.client(), server_model(server)
    kw = dict(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11)
    r = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert texts == [client.completions.create(**{**kw, "seed": 11 + j}).choices[0].text for j in range(3)]
    assert len(set(texts)) > 1
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT)) and r.usage.completion_tokens == 18
    streamed = ["", "", ""]
    usage = None
    for chunk in client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
        usage = chunk.usage or usage
    assert streamed == texts and usage.prompt_tokens == r.usage.prompt_tokens
    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    chat = client.chat.completions.create(model=model, messages=messages, n=2, max_tokens=5, temperature=1.0, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)
    pieces = ["", ""]
    for chunk in client.chat.completions.create(model=model, messages=messages, n=2, max_tokens=5, temperature=1.0,
                                                seed=3, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)]


def test_batch_of_prompts_with_n(server, tok):
    prompts = [PROMPT, "Pack my box"]
    r = server.post("/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] and choices[2]["text"] == choices[3]["text"]  # greedy
    assert r.json()["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    # more choices than KV rows (4): they queue; those admitted once the first has left prefill on their own
    many = server.post("/v1/completions", {"prompt": PROMPT, "n": 16, "max_tokens": 2, "temperature": 0}).json()
    assert len({c["text"] for c in many["choices"]}) == 1 and len(many["choices"]) == 16


# ---------------------------------------------------------------------- /metrics
def _scrape(server) -> dict[str, float]:
    """/metrics parsed by prometheus-client's own parser: {sample name + labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()) if k != "le"):
            s.value for family in text_string_to_metric_families(r.text) for s in family.samples
            if "le" not in s.labels}


def test_metrics_count_what_was_served(server, tok):
    before = _scrape(server)
    assert before["litllm_requests_running"] == before["litllm_requests_waiting"] == 0
    assert before["litllm_kv_cache_usage_ratio"] == 0
    client, model = server.client(), server_model(server)
    for _ in client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                       stop=["never-generated-stop"]):
        pass
    client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=1.0, n=2, seed=1)
    after = _scrape(server)
    prompt = len(tok.encode(PROMPT))
    assert after["litllm_prompt_tokens_total"] - before["litllm_prompt_tokens_total"] == 2 * prompt  # n=2: once
    assert after["litllm_generation_tokens_total"] - before["litllm_generation_tokens_total"] == 20 + 2 * 5
    assert after["litllm_requests_total{finish_reason=length}"] - before.get(
        "litllm_requests_total{finish_reason=length}", 0) == 3
    assert after["litllm_time_to_first_token_seconds_count"] - before["litllm_time_to_first_token_seconds_count"] == 3
    assert after["litllm_time_per_output_token_seconds_count"] - before[
        "litllm_time_per_output_token_seconds_count"] == 3
    assert after["litllm_time_to_first_token_seconds_sum"] > before["litllm_time_to_first_token_seconds_sum"]
    assert after["litllm_requests_running"] == 0 and after["litllm_kv_cache_usage_ratio"] == 0
    # every decode step ran over all 4 rows (no compiled steps over fewer here): the stream's 19 after its first token
    assert after["litllm_decode_steps{rows=4}"] - before["litllm_decode_steps{rows=4}"] >= 19


def test_kv_cache_usage_gauge(tiny_checkpoint, tok):
    """What litllm_kv_cache_usage_ratio reads: the positions requests hold over rows x max_seq_length."""
    from litllm.engine import Engine, Request
    from litllm.model import GPT

    prompt = tok.encode("The quick brown fox jumps over the lazy dog.").tolist()
    with Engine(GPT.from_checkpoint(tiny_checkpoint).eval(), tok, 2, 64, prefill_chunk=4) as engine:
        engine.add(Request(prompt, 3))
        chunks = -(-len(prompt) // 4)
        for k in range(1, chunks):
            engine.step()  # one chunk of the prompt
            assert engine.kv_cache_usage == 4 * k / (2 * 64)
        engine.step()  # the last chunk, the first token sampled (no row was decoding: out before any decode step)
        assert engine.kv_cache_usage == len(prompt) / (2 * 64)
        engine.step()  # the first token decoded (written), the second sampled
        assert engine.kv_cache_usage == (len(prompt) + 1) / (2 * 64)
        while engine.has_unfinished:
            engine.step()
        assert engine.kv_cache_usage == 0


@pytest.mark.slow
def test_lm_eval_local_chat_completions_generates_as_litllm_evaluate(chat_checkpoint, local_tasks, tmp_path,
                                                                     monkeypatch):
    """lm-eval's `local-chat-completions` (messages, chat-template rendered by the server) on a generate_until
    task: the same text as `litllm evaluate --apply_chat_template` on the same checkpoint, document by document."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    from test_evaluate import GEN_TASK, _assert_same_answers, _litlm, _responses, _run

    chat_server = Server(chat_checkpoint, tmp_path / "server.log", "--max_batch_size", "2")
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "unused")
        served = LocalChatCompletion(base_url=chat_server.url + "/v1/chat/completions", model=chat_checkpoint.name,
                                     max_retries=1)
        got = _run(served, local_tasks, [GEN_TASK], num_fewshot=1, apply_chat_template=True)
    finally:
        chat_server.stop()
    expected = _run(_litlm(chat_checkpoint, 4), local_tasks, [GEN_TASK], num_fewshot=1, apply_chat_template=True)
    _assert_same_answers(expected, got, [GEN_TASK], TOL)
    assert any(answer for doc in _responses(got, GEN_TASK) for answer in doc)  # not all empty


def test_engine_scores_only_the_rows_that_ask(tiny_checkpoint, tok, monkeypatch):
    """A row without logprobs costs nothing: token_logprobs never sees its logits, nor runs when no row asks."""
    import litllm.engine as engine_module
    from litllm.engine import Engine, Request
    from litllm.model import GPT

    scored_rows = []
    real = engine_module.token_logprobs
    monkeypatch.setattr(engine_module, "token_logprobs",
                        lambda logits, tokens, k: (scored_rows.append(logits.shape[0]), real(logits, tokens, k))[1])
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    prompt = tok.encode(PROMPT).tolist()
    with Engine(model, tok, 3, 64) as engine:
        plain = _run_engine(engine, [Request(prompt, 5), Request(prompt[1:], 5)])
        assert scored_rows == []
        mixed = _run_engine(engine, [Request(prompt, 5), Request(prompt[1:], 5, logprobs=2)])
    assert mixed == plain and scored_rows == [1] * 5  # the asking row's first token, then one row per step
