"""Speculative decoding: greedy output equals decoding without a draft token for token; sampled tokens
follow the target's distribution (chi-square tests against exact distributions, seeded so they are
deterministic; each also shows it would reject the draft's distribution); the acceptance rate; errors."""

from __future__ import annotations


import pytest
import torch

from litllm.engine import Engine, Request, Sampling, generate_ids
from litllm.errors import LitLLMError
from litllm.model import GPT
from litllm.speculative import SpeculativeEngine, accept_proposals
from conftest import make_converted_checkpoint, tiny_config

scipy_stats = pytest.importorskip("scipy.stats")


def _noisy_copy(checkpoint, scale: float) -> GPT:
    """The checkpoint's model with relative noise on every weight: a draft that agrees sometimes."""
    model = GPT.from_checkpoint(checkpoint).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return model


def _speculate(target, draft, prompt, n, k, sampling=Sampling(), stop_token_ids=()):
    with SpeculativeEngine(target, draft, None, len(prompt) + n, num_speculative_tokens=k) as engine:
        engine.add(Request(prompt, n, sampling, stop_token_ids=stop_token_ids))
        tokens = []
        while engine.has_unfinished:
            for out in engine.step():
                tokens += out.token_ids
    return tokens, engine


@pytest.mark.parametrize("draft_kind", ["itself", "noisy"])
def test_greedy_equals_plain_decoding(tiny_checkpoint, draft_kind, one_thread):
    target = GPT.from_checkpoint(tiny_checkpoint).eval()
    draft = GPT.from_checkpoint(tiny_checkpoint).eval() if draft_kind == "itself" else _noisy_copy(tiny_checkpoint, 0.05)
    prompt = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = generate_ids(target, prompt, 110)  # a long continuation: the cache is rewound many times
    for k in (1, 4):
        tokens, engine = _speculate(target, draft, prompt, 110, k)
        assert tokens == expected, k
        if draft_kind == "itself":  # every proposal is the target's own choice (all-accepted rounds)
            assert engine.acceptance_rate == 1.0
        else:  # both paths: kept and rejected proposals
            assert 0.0 < engine.acceptance_rate < 1.0
        assert engine.proposed >= (110 - 1) // (k + 1)  # the first token comes from the prefill
    # a stop token ends the output where plain decoding ends it, also inside an accepted run
    stop = expected[30]
    tokens, _ = _speculate(target, draft, prompt, 110, 4, stop_token_ids=[stop])
    assert tokens == expected[: expected.index(stop) + 1]


def _chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the samples (token ids) coming from `probs`, over the tokens with expected count >= 5
    (the rest pooled into one cell)."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    if wanted[-1] < 5:  # nothing (much) to pool: fold it into the largest cell
        observed, wanted = observed[:-1].clone(), wanted[:-1].clone()
        observed[wanted.argmax()] += counts[~big].sum()
        wanted[wanted.argmax()] += expected[~big].sum()
    return float(scipy_stats.chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()).pvalue)


def test_acceptance_rule_keeps_the_target_distribution():
    """The rule alone, on a 6-token vocabulary with zeros in p and q (as top-k leaves): the first emitted token
    follows p[0], the second (when the first proposal is kept) p[1], the bonus token p[k]."""
    g = torch.Generator().manual_seed(0)
    k, V, N = 2, 6, 10000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    p[0, 5] = 0.0  # a token only the draft proposes
    q[0, 4] = 0.0  # a token only the target picks (reached through the residual)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    first, second, bonus = [], [], []
    for _ in range(N):
        proposed = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        kept, token = accept_proposals(proposed, p, q, g)
        emitted = proposed[:kept] + [token]
        first.append(emitted[0])
        if kept >= 1:
            second.append(emitted[1])
        if kept == k:
            bonus.append(token)
    first = torch.tensor(first)
    assert _chi_square_pvalue(first, p[0]) > 1e-3
    assert _chi_square_pvalue(torch.tensor(second), p[1]) > 1e-3
    assert _chi_square_pvalue(torch.tensor(bonus), p[k]) > 1e-3
    assert not (first == 5).any() and (first == 4).any()
    assert _chi_square_pvalue(first, q[0]) < 1e-6  # the test has the power to see the draft's distribution


def _exact_marginals(model, prompt: list[int], vocab: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P(token 2) and P(token 3) of sampling from `model` after `prompt`, summed over all earlier tokens."""
    with torch.no_grad():
        def probs(rows):  # rows (B, T) -> next-token distributions (B, vocab)
            return torch.softmax(model(rows)[:, -1, :vocab].float() / temperature, -1)

        base = torch.tensor(prompt)[None]
        p1 = probs(base)[0]  # (V,)
        ones = torch.arange(vocab)[:, None]
        rows1 = torch.cat([base.expand(vocab, -1), ones], 1)  # (V, T+1): prompt, t1
        p2 = probs(rows1)  # (V, V): P(t2 | t1)
        rows2 = torch.cat([rows1.repeat_interleave(vocab, 0), ones.repeat(vocab, 1)], 1)  # (V*V, T+2)
        p3 = probs(rows2).reshape(vocab, vocab, vocab)  # P(t3 | t1, t2)
    joint12 = p1[:, None] * p2
    return joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))


@pytest.mark.parametrize("batch", [False, True])
def test_sampling_keeps_the_target_distribution(one_thread, batch):
    """End to end on an 8-token vocabulary: the 2nd and 3rd sampled tokens (from a round of k=2 proposals:
    kept, replaced or the bonus) follow the target's exact marginals, not the draft's. `batch`: serve's
    `SpeculativeBatchEngine`, its requests added one at a time (it speculates only in steps where none waits)."""
    from litllm.speculative import SpeculativeBatchEngine

    vocab, temperature, N = 8, 1.0, 1000
    torch.manual_seed(0)
    target = GPT(tiny_config(vocab_size=vocab, padding_multiple=8, block_size=16)).eval()
    draft = GPT(tiny_config(vocab_size=vocab, padding_multiple=8, block_size=16, n_layer=1)).eval()
    prompt = [1, 2, 3]
    tokens: dict[int, list[int]] = {}
    engine = (SpeculativeBatchEngine(target, draft, None, 1, 8, num_speculative_tokens=2) if batch
              else SpeculativeEngine(target, draft, None, 8, num_speculative_tokens=2))
    with engine:
        for seed in range(N):  # one request per seed, decoded one after the other
            tokens[engine.add(Request(prompt, 4, Sampling(temperature, seed=seed)))] = []
            while engine.has_unfinished:
                for out in engine.step():
                    tokens[out.request_id] += out.token_ids
    assert 0.2 < engine.acceptance_rate < 0.95  # both paths taken often
    second = torch.tensor([t[1] for t in tokens.values()])
    third = torch.tensor([t[2] for t in tokens.values()])
    m2, m3 = _exact_marginals(target, prompt, vocab, temperature)
    d2, d3 = _exact_marginals(draft, prompt, vocab, temperature)
    assert _chi_square_pvalue(second, m2) > 1e-3
    assert _chi_square_pvalue(third, m3) > 1e-3
    assert min(_chi_square_pvalue(second, d2), _chi_square_pvalue(third, d3)) < 1e-6


def test_generate_and_llm_with_a_draft(tiny_checkpoint, capsys, one_thread):
    from litllm import LLM
    from litllm.generate import generate

    prompt = "Hello there, how are"
    plain = LLM.load(tiny_checkpoint, device="cpu", prompt_style="default")
    expected = plain.generate(prompt, max_new_tokens=40)
    llm = LLM.load(tiny_checkpoint, device="cpu", prompt_style="default", draft_model=tiny_checkpoint)
    assert llm.generate(prompt, max_new_tokens=40) == expected
    assert llm.acceptance_rate == 1.0
    assert llm.generate([prompt, "Other"], max_new_tokens=12) == plain.generate([prompt, "Other"], max_new_tokens=12)
    assert "".join(llm.generate(prompt, max_new_tokens=40, stream=True)) == expected

    generate(tiny_checkpoint, prompt, max_new_tokens=20, temperature=0.0, prompt_style="default", device="cpu")
    plain_out = capsys.readouterr().out
    generate(tiny_checkpoint, prompt, max_new_tokens=20, temperature=0.0, prompt_style="default", device="cpu",
             draft_model=tiny_checkpoint, num_speculative_tokens=3)
    captured = capsys.readouterr()
    assert captured.out == plain_out
    assert "Draft acceptance: 100% (" in captured.err


def test_errors(tiny_checkpoint, tmp_path):
    from litllm import LLM
    from litllm.generate import generate

    other = make_converted_checkpoint(tmp_path / "other", vocab_size=300)
    with pytest.raises(LitLLMError, match=r"--draft_model .*other: its vocabulary .* differs from the model's"):
        LLM.load(tiny_checkpoint, device="cpu", draft_model=other)
    with pytest.raises(LitLLMError, match="--num_speculative_tokens must be >= 1, got 0"):
        generate(tiny_checkpoint, "Hi", max_new_tokens=2, device="cpu", draft_model=tiny_checkpoint,
                 num_speculative_tokens=0)
    missing = tmp_path / "missing"
    with pytest.raises(LitLLMError, match="--draft_model: .*missing"):
        generate(tiny_checkpoint, "Hi", max_new_tokens=2, device="cpu", draft_model=missing)
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    short = GPT.from_checkpoint(tiny_checkpoint, block_size=32).eval()
    with pytest.raises(LitLLMError, match="exceeds the draft model's context window of 32"):
        SpeculativeEngine(model, short, None, 64)
    engine = SpeculativeEngine(model, model, None, 16)
    with pytest.raises(LitLLMError, match="exceed the context window of 16"):
        engine.add(Request([1] * 10, 7))
    engine.close()
    assert model.blocks[0].attn.kv_cache is None


def test_draft_flags_fail_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch):
    """A missing draft folder, no proposed tokens or a tensor-parallel model are refused before the (large) model
    loads, by generate, chat and LLM alike."""
    import litllm.api
    import litllm.chat
    import litllm.generate
    from litllm import LLM

    for module in (litllm.generate, litllm.chat, litllm.api):
        monkeypatch.setattr(module, "load_decoder", lambda *a, **k: pytest.fail("the model loaded first"))
    missing = tmp_path / "missing"
    for flags, message in ((dict(draft_model=missing), "missing"),  # (LLM: not a folder nor a Hub id)
                           (dict(draft_model=tiny_checkpoint, num_speculative_tokens=0), "--num_speculative_tokens"),
                           (dict(draft_model=tiny_checkpoint, devices=2), "--draft_model with --devices > 1")):
        with pytest.raises(LitLLMError, match=message):
            litllm.generate.generate(tiny_checkpoint, "Hi", max_new_tokens=2, device="cpu", **flags)
        with pytest.raises(LitLLMError, match=message):
            litllm.chat.chat(tiny_checkpoint, device="cpu", **flags)
        with pytest.raises(LitLLMError, match=message):
            LLM.load(tiny_checkpoint, device="cpu", **flags)


def test_abort_and_the_engine_interface(tiny_checkpoint, one_thread):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    draft = _noisy_copy(tiny_checkpoint, 0.05)
    with SpeculativeEngine(model, draft, None, 64) as engine:
        first = engine.add(Request([5, 6, 7], 30))
        second = engine.add(Request([8, 9], 5))
        engine.step()
        engine.abort(first)
        (out,) = engine.step()
        assert (out.request_id, out.finished, out.finish_reason) == (first, True, "abort")
        tokens = []
        while engine.has_unfinished:
            for out in engine.step():
                tokens += out.token_ids
        assert tokens == generate_ids(model, [8, 9], 5)
    # a plain Engine of the same model set its cache in between: each engine keeps its own
    with SpeculativeEngine(model, draft, None, 64) as engine, Engine(model, None, 1, 32) as plain:
        engine.add(Request([5, 6, 7], 20))
        plain.add(Request([1, 2], 3))
        while engine.has_unfinished or plain.has_unfinished:
            engine.step()
            plain.step()


def _noisy_folder(checkpoint, folder, scale: float):
    """A model folder of `_noisy_copy(checkpoint, scale)` (the checkpoint's tokenizer): a `--draft_model` that the
    model agrees with sometimes."""
    import shutil

    from litllm.model_folder import WEIGHTS_FILE, save_model_weights

    shutil.copytree(checkpoint, folder)
    save_model_weights(_noisy_copy(checkpoint, scale).state_dict(), folder / WEIGHTS_FILE)
    return folder


def test_chat_with_a_draft(tiny_checkpoint, tmp_path, monkeypatch, capsys, one_thread):
    """chat keeps one engine for the whole conversation: with a draft, every turn's reply is the plain one, and each
    answer's draft acceptance, then the conversation's, is printed to stderr as generate words it, from the
    engine's own counts."""
    import io
    import re
    import sys

    from litllm.chat import chat
    from litllm.generate import DecodeArgs

    engines = []
    make_engine = DecodeArgs.engine

    def kept(*args, **kwargs):
        engines.append(make_engine(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(DecodeArgs, "engine", kept)
    stdin = "Hello there\nWrite a haiku about autumn.\n/exit\n"
    outputs, errors = [], []
    draft = _noisy_folder(tiny_checkpoint, tmp_path / "draft", 0.05)
    for extra in ({}, {"draft_model": draft, "num_speculative_tokens": 2}):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        chat(tiny_checkpoint, temperature=0.0, prompt_style="chatml", max_new_tokens=24, **extra)
        captured = capsys.readouterr()
        outputs.append(captured.out)
        errors.append(captured.err)
    assert outputs[0].count(">> Model: ") == 2
    assert outputs[1] == outputs[0]
    assert "Draft acceptance" not in errors[0]
    line = r"Draft acceptance{}: (\d+)% \((\d+) of (\d+) proposed tokens, 2 per step\)\n"
    answers = [tuple(map(int, m)) for m in re.findall(line.format(""), errors[1])]
    ((rate, accepted, proposed),) = re.findall(line.format(" over the conversation"), errors[1])
    engine = engines[1]
    assert len(answers) == 2 and 0 < engine.accepted < engine.proposed  # kept and rejected proposals
    assert (int(accepted), int(proposed)) == (engine.accepted, engine.proposed)
    assert [sum(counts) for counts in zip(*answers)][1:] == [engine.accepted, engine.proposed]
    for percent, a, p in answers + [(int(rate), int(accepted), int(proposed))]:
        assert p > 0 and percent == round(100 * a / p)


def _staggered_tokens(requests: list, engine, together: int = 2, steps: int = 3) -> list[list[int]]:
    """Each request's tokens from `engine` (closed after), the first `together` added at once and the rest `steps`
    steps later, while those decode."""
    tokens = {}
    with engine:
        ids = [engine.add(r) for r in requests[:together]]
        for _ in range(steps):
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        ids += [engine.add(r) for r in requests[together:]]
        while engine.has_unfinished:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_batch_engine_greedy_equals_the_engine_and_falls_back(tiny_checkpoint, one_thread, prefix_caching):
    """`serve --draft_model`'s engine: several rows at once, arriving while others decode (plain steps), one asking
    for logprobs (plain steps while it runs), one reusing another's prompt prefix (with prefix caching): every
    row's tokens are the draft-less engine's."""
    from litllm.speculative import SpeculativeBatchEngine

    target = GPT.from_checkpoint(tiny_checkpoint).eval()
    draft = _noisy_copy(tiny_checkpoint, 0.05)
    g = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(0, 300, (n,), generator=g).tolist(), m, logprobs=lp)
                for n, m, lp in ((8, 40, None), (3, 25, None), (12, 30, 2), (5, 33, None))]
    requests[3].prompt_ids = requests[0].prompt_ids + requests[3].prompt_ids


    expected = _staggered_tokens(requests, Engine(target, None, 3, 64, prefix_caching=prefix_caching))
    engine = SpeculativeBatchEngine(target, draft, None, 3, 64, num_speculative_tokens=3, prefix_caching=prefix_caching)
    assert _staggered_tokens(requests, engine) == expected
    assert 0.0 < engine.acceptance_rate < 1.0 and engine.proposed > 20
    assert engine.prefix_hits == (8 if prefix_caching else 0)
    assert target.blocks[0].attn.kv_cache is None and draft.blocks[0].attn.kv_cache is None


def test_batch_engine_samples_reproducibly_by_seed(tiny_checkpoint, one_thread):
    """Sampled rows take the draft path too (the acceptance rule is `accept_proposals`, tested above): a seed
    replays the same tokens, another seed gives others."""
    from litllm.speculative import SpeculativeBatchEngine

    target = GPT.from_checkpoint(tiny_checkpoint).eval()
    draft = _noisy_copy(tiny_checkpoint, 0.05)

    def run(seed):
        with SpeculativeBatchEngine(target, draft, None, 2, 64, num_speculative_tokens=3) as engine:
            ids = [engine.add(Request([5, 6, 7], 30, Sampling(1.0, None, 1.0, seed + i))) for i in range(2)]
            tokens = {i: [] for i in ids}
            while engine.has_unfinished:
                for out in engine.step():
                    tokens[out.request_id] += out.token_ids
        assert engine.proposed > 0
        return [tokens[i] for i in ids]

    first = run(3)
    assert run(3) == first and run(4) != first
    assert all(len(t) == 30 for t in first)


def test_a_torchao_quantized_model_with_a_draft_decodes_its_own_greedy_tokens(tiny_checkpoint, one_thread):
    """`--quantize torchao.int8wo --draft_model`: the model is quantized, its draft loads unquantized (tutorial
    section 5b), and the greedy text is the quantized model's without a draft."""
    pytest.importorskip("torchao")
    from litllm import LLM
    from litllm.quantize import is_quantized

    prompt, quantized = "Hello there, how are", {"quantize": "torchao.int8wo", "prompt_style": "default"}
    expected = LLM.load(tiny_checkpoint, device="cpu", **quantized).generate(prompt, max_new_tokens=40)
    llm = LLM.load(tiny_checkpoint, device="cpu", draft_model=tiny_checkpoint, **quantized)
    assert is_quantized(llm.model.blocks[0].attn.qkv) and not is_quantized(llm.draft.blocks[0].attn.qkv)
    assert llm.generate(prompt, max_new_tokens=40) == expected
    assert llm.acceptance_rate is not None


def test_the_speculative_benchmark_decodes_the_targets_tokens(monkeypatch, capsys, one_thread):
    """benchmarks/speculative.py (#27's 12-layer target, 2-layer draft trained on its outputs) at toy sizes: it runs,
    the draft trains, and target + draft decode the target's own greedy tokens."""
    import sys

    from test_llama_cpp_bench import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script's `from generate import timed` (benchmarks/generate.py)
    monkeypatch.setattr(sys, "argv", ["speculative.py", "--n_layer", "3", "--n_embd", "64", "--n_head", "4",
                                      "--intermediate_size", "128", "--vocab_size", "256", "--train_steps", "5",
                                      "--train_sequences", "8", "--new_tokens", "8", "--eval_prompts", "2",
                                      "--repeats", "1", "--no_compiled"])  # compiled: the slow tests above
    try:
        load_benchmark("speculative").main()
    finally:
        sys.modules.pop("generate", None)
    out = capsys.readouterr().out
    assert "draft (2 layers) trained 5 steps" in out and "{'eager speculative': True}" in out, out
    assert "speculative / plain, eager: " in out


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One compile cache for this file's compiled tests: the batch engine's per-slot steps of length 128 are the
    files the one-row test saved (loaded, not compiled again)."""
    return tmp_path_factory.mktemp("compile")


@pytest.mark.slow
def test_compiled_speculative_decoding_equals_plain_decoding_and_loads_its_saved_steps(
        tiny_checkpoint, monkeypatch, compile_cache, capsys, one_thread):
    """With --compile (refused before): the draft's one-token decode step and the target's verify step (k + 1 tokens,
    padded in the rounds that propose fewer) compile to saved steps, and greedy output is token for token the
    draftless one, compiled or eager (kept and rejected proposals, fully accepted rounds, the last rounds' padding);
    a later default engine loads both saved steps; `generate --compile true --draft_model` prints the plain output."""
    from litllm.compile_decode import STEPS_FOLDER
    from litllm.compile_ledger import COMPILE_ENV
    from litllm.generate import decode_engine, generate, speculative_engine

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
    monkeypatch.delenv(COMPILE_ENV)
    target = GPT.from_checkpoint(tiny_checkpoint).eval()
    draft = _noisy_copy(tiny_checkpoint, 0.05)
    prompt = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = generate_ids(target, prompt, 110)

    def run(engine):
        with engine:
            engine.add(Request(prompt, 110))
            tokens = []
            while engine.has_unfinished:
                for out in engine.step():
                    tokens += out.token_ids
        return tokens, engine

    compiled = speculative_engine(target, draft, None, len(prompt) + 110, None, 3, compile=True)
    assert [e.step_source for e in compiled.engines] == ["compiled", "compiled"]
    tokens, engine = run(compiled)
    assert tokens == expected
    assert 0.0 < engine.acceptance_rate < 1.0
    with decode_engine(target, None, 1, len(prompt) + 110, None, compile=True) as plain:
        plain.add(Request(prompt, 110))
        while plain.has_unfinished:
            plain.step()
        assert plain._compiled
    saved = sorted(p.name for p in (compile_cache / STEPS_FOLDER).glob("*/*.pt2"))
    assert saved == ["1x128-verify4.pt2", "1x128.pt2"], saved  # the draft's (and the plain) step, the verify step
    loaded = speculative_engine(target, draft, None, len(prompt) + 110, None, 3, tokens=110)  # the default
    assert [e.step_source for e in loaded.engines] == ["loaded", "loaded"]
    assert run(loaded)[0] == expected
    # each step priced apart by default: a compiled draft step with an eager check, and the reverse
    from litllm.compile_decode import verify_engine

    length = len(prompt) + 110
    for draft_compiled in (True, False):
        drafting = decode_engine(draft, None, 1, length, None, compile=draft_compiled or False)
        checking = verify_engine(lambda n: Engine(target, None, 1, n), target, length, 4, not draft_compiled)
        assert drafting._compiled == draft_compiled and (checking.verify is None) == draft_compiled
        mixed = SpeculativeEngine(target, draft, None, length, num_speculative_tokens=3, draft_engine=drafting,
                                  target_engine=checking)
        assert run(mixed)[0] == expected

    text = "Hello there, how are"
    generate(tiny_checkpoint, text, max_new_tokens=20, temperature=0.0, prompt_style="default", device="cpu",
             compile=False)
    plain_out = capsys.readouterr().out
    generate(tiny_checkpoint, text, max_new_tokens=20, temperature=0.0, prompt_style="default", device="cpu",
             draft_model=tiny_checkpoint, num_speculative_tokens=3, compile=True)
    captured = capsys.readouterr()
    assert captured.out == plain_out
    assert "Draft acceptance: 100% (" in captured.err and "decode step in" in captured.err
    # LLM: the steps generate saved (same loader, same choices) are loaded
    from litllm import LLM

    llm = LLM.load(tiny_checkpoint, device="cpu", prompt_style="default", draft_model=tiny_checkpoint, compile=True)
    eager = LLM.load(tiny_checkpoint, device="cpu", prompt_style="default", compile=False)
    assert llm.generate(text, max_new_tokens=20) == eager.generate(text, max_new_tokens=20)
    assert llm.acceptance_rate == 1.0


@pytest.mark.slow
def test_compiled_batch_engine_greedy_equals_the_engine(tiny_checkpoint, monkeypatch, compile_cache, one_thread):
    """`serve --draft_model --compile true` (refused before): the batched step compiled, and the rounds' draft steps
    (one token; k + 1 tokens, its catch-ups) and verify step compiled once and loaded per slot (bound to that slot's
    cache rows): every row's tokens are the draftless engine's, rows arriving while others decode."""
    from litllm.speculative import SpeculativeBatchEngine

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
    target = GPT.from_checkpoint(tiny_checkpoint).eval()
    draft = _noisy_copy(tiny_checkpoint, 0.05)
    g = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(0, 300, (n,), generator=g).tolist(), m) for n, m in ((8, 40), (3, 25), (5, 33))]


    expected = _staggered_tokens(requests, Engine(target, None, 2, 128))
    engine = SpeculativeBatchEngine(target, draft, None, 2, 128, num_speculative_tokens=3, compile=True)
    assert len(engine._draft_steps) == len(engine._draft_wide_steps) == len(engine._verify_steps) == 2
    catch_ups = []  # the draft's catch-ups of 3 or 4 tokens (the start of each)

    def counted(step):
        def run(tokens, pos, kv_len):  # (a saved step takes the length it attends over)
            catch_ups.append(int(pos[0, 0]))
            return step(tokens, pos, kv_len)

        return run

    assert _staggered_tokens(requests, engine) == expected
    assert 0.0 < engine.acceptance_rate < 1.0 and engine.proposed > 20
    # a speculating row that misses 2 plain steps (a new prompt of 4 tokens prefilled 2 a step) catches up on 3
    # tokens in one k + 1-token step
    requests = requests[:1] + [Request(requests[1].prompt_ids + [7], 10)]
    expected = _staggered_tokens(requests, Engine(target, None, 2, 128, prefill_chunk=2), together=1, steps=8)
    engine = SpeculativeBatchEngine(target, draft, None, 2, 128, num_speculative_tokens=3, compile=True,
                                    prefill_chunk=2)  # (its steps loaded, a few ms a slot)
    engine._draft_wide_steps = [counted(step) for step in engine._draft_wide_steps]
    assert _staggered_tokens(requests, engine, together=1, steps=8) == expected
    assert catch_ups
