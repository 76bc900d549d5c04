"""`litllm serve`'s logprobs, echo, n and batched prompts, through the official `openai` client and raw HTTP,
checked against transformers' `log_softmax` of the same checkpoint's logits (the oracle)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from test_evaluate import local_tasks, tasks_dir  # noqa: F401 (fixtures)
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

    from test_evaluate import GEN_TASK, MC_TASK, _assert_same_answers, _litlm, _run

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    served = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model=server_model(server), tokenizer_backend="huggingface",
        tokenizer=str(tiny_checkpoint), add_bos_token=True, batch_size=4, max_length=128, max_retries=1,
    )
    tasks = [MC_TASK, GEN_TASK]
    expected = _run(_litlm(tiny_checkpoint, 4), local_tasks, tasks, num_fewshot=1)
    _assert_same_answers(expected, _run(served, local_tasks, tasks, num_fewshot=1), tasks, TOL)
