"""Prefix caching on the engine: a prompt that starts with tokens a slot holds (free or running) reuses that KV, and
every output is what the engine gives with the cache off (the invariant), greedy and seeded, however requests come
and go; the cache costs no memory beyond the KV cache (a held prefix yields its slot to any new request)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer

    return GPT.from_checkpoint(tiny_checkpoint).eval(), Tokenizer(tiny_checkpoint)


def _requests(tokenizer):
    from litllm.engine import Request, Sampling

    system = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3).tolist()
    questions = ["What?", "Why not", "Who is it", "What?", "fibonacci"]
    out = []
    for i, q in enumerate(questions):
        prompt = system + tokenizer.encode(q, bos=False).tolist()
        sampling = Sampling() if i % 2 else Sampling(temperature=1.0, seed=i)
        out.append(Request(prompt, 6, sampling))
    out.append(Request(system[:7], 5))  # a prompt that is a prefix of the others
    return out


def _run(model, tokenizer, caching: bool, waves) -> tuple[list[list[int]], object]:
    from litllm.engine import Engine

    results = []
    with Engine(model, tokenizer, max_batch_size=2, max_seq_length=128, prefill_chunk=16,
                prefix_caching=caching) as engine:
        for wave in waves:  # requests of a wave run together; later waves find the earlier ones' prefixes
            ids = engine.add_many(wave) if len(wave) > 1 else [engine.add(wave[0])]
            tokens = {i: [] for i in ids}
            while engine.has_unfinished:
                for out in engine.step():
                    tokens[out.request_id] += out.token_ids
            results += [tokens[i] for i in ids]
    return results, engine


def test_prefix_cache_outputs_equal_uncached(parts):
    model, tokenizer = parts
    requests = _requests(tokenizer)
    waves = [requests[:1], requests[1:4], requests[4:5], requests[5:]]  # 3 requests on 2 slots: one queues
    off, _ = _run(model, tokenizer, False, waves)
    on, engine = _run(model, tokenizer, True, waves)
    assert on == off
    assert engine.prefix_hits > 0.5 * engine.prefix_queries  # most of the prompt tokens were not prefilled again
    _, uncached = _run(model, tokenizer, False, waves[:1])
    assert uncached.prefix_hits == 0


def test_served_with_prefix_caching(tiny_checkpoint, tmp_path):
    """`serve --prefix_caching true`: a chat that shares an earlier one's system prompt answers as it does with
    nothing cached, and /metrics reports the hits."""
    import signal

    from test_serve import KEY, Server

    server = Server(tiny_checkpoint, tmp_path / "server.log", "--max_batch_size", "2", "--api_key", KEY,
                    "--prefix_caching", "true")
    try:
        system = {"role": "system", "content": "The quick brown fox jumps over the lazy dog. " * 2}

        def ask(question: str) -> str:
            body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 8, "temperature": 0}
            return server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

        cold = ask("Why not")  # nothing held yet
        ask("What?")  # leaves the system prompt in a slot
        assert ask("Why not") == cold
        metrics = server.get("/metrics").text
        ratio = float(next(line.split()[1] for line in metrics.splitlines()
                           if line.startswith("litllm_prefix_cache_hit_ratio")))
        assert ratio > 0.3
    finally:
        server.stop(signal.SIGTERM)
