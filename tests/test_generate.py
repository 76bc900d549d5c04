"""Generation: greedy decoding equals transformers' `generate(do_sample=False)` token for token on
converted tiny models of several families; a continuous batch equals one-by-one; sampling, stops, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_converted_checkpoint, make_im_end_checkpoint, tiny_config, train_bpe_tokenizer

from litllm.engine import Engine, Request, Sampling, StopMatcher, default_stops, generate_ids, sample
from litllm.errors import LitLLMError
from litllm.generate import generate
from litllm.inference import fit_max_new_tokens
from litllm.model import GPT
from litllm.tokenizer import Tokenizer

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Numbers: 12345 67.89 and a much longer prompt than the others"]


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_converted_checkpoint(tmp_path_factory.mktemp(family), family=family, seed=3)
        return cache[family]

    return get


def _hf_greedy(folder: Path, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = hf.generate(
        ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=hf.config.vocab_size - 1,
    )
    return out[0, ids.numel():].tolist()


# gemma2: sliding window 6 + attention/final softcapping; phi3: sliding window 10; mistral: window 8;
# mixtral: MoE; gpt_neox: partial rotary + parallel residual. Prompt + 24 new tokens cross every window.
@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral", "phi3", "gpt_neox", "mistral", "qwen3"])
def test_greedy_matches_transformers(family_checkpoints, family):
    folder = family_checkpoints(family)
    model = GPT.from_checkpoint(folder).eval()
    tok = Tokenizer(folder)
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        ours = generate_ids(model, ids.tolist(), 24)
        assert ours == _hf_greedy(folder, ids, 24), prompt
    # the cache the engine allocated is gone: the model runs plain forwards again
    assert all(b.attn.kv_cache is None for b in model.blocks)
    model(ids[None])


@pytest.mark.parametrize("layout", ["column-major", "onednn-packed"])
@pytest.mark.parametrize("family", ["llama", "mixtral", "llama-linear-mqa"])
def test_cpu_weight_layouts_keep_greedy_output(family_checkpoints, family, layout):
    """The CPU layout switch changes only how weights sit in memory: greedy tokens still equal transformers'. (Plain
    fp32 Linears become `PromptLinear`s, the same weights, where a prompt's GEMM is oneDNN's: AVX-512 CPUs.)"""
    from litllm.cpu_layout import PackedLinear, PromptLinear, optimize_for_decoding, prompt_gemm

    plain = PromptLinear if prompt_gemm() == "onednn" else torch.nn.Linear
    folder = family_checkpoints(family)
    model = GPT.from_checkpoint(folder).eval()
    assert optimize_for_decoding(model, min_gain=float("inf")) == "row-major"  # never worth it: untouched
    assert type(model.blocks[0].attn.qkv) is plain and model.blocks[0].attn.qkv.weight.is_contiguous()
    assert optimize_for_decoding(model, layout=layout) == layout
    qkv = model.blocks[0].attn.qkv
    if layout == "column-major":
        assert type(qkv) is plain and qkv.weight.t().is_contiguous() and not qkv.weight.is_contiguous()
    else:
        assert isinstance(qkv, PackedLinear)
    if model.config.tie_embeddings:  # a head shared with the embedding keeps its layout
        assert type(model.lm_head) is plain and model.lm_head.weight is model.wte.weight
        assert model.wte.weight.is_contiguous()
    assert optimize_for_decoding(model) == layout  # idempotent
    ids = Tokenizer(folder).encode(PROMPTS[0])
    assert generate_ids(model, ids.tolist(), 20) == _hf_greedy(folder, ids, 20)
    with pytest.raises(LitLLMError, match="not available"):
        optimize_for_decoding(GPT.from_checkpoint(folder), layout="diagonal")


def skip_unless_layout_runs(layout: str, dtype: torch.dtype) -> None:
    """Skip where this CPU can't run `layout` in `dtype` (oneDNN's bf16 kernels need AVX-512: not on AVX2-only
    hosts), as `optimize_for_decoding` would refuse it there with a clear error."""
    from litllm.cpu_layout import _layout_works

    if not _layout_works(layout, torch.nn.Linear(64, 64, dtype=dtype)):
        pytest.skip(f"the {layout} layout does not run in {dtype} on this CPU")


def test_eager_16_bit_prompt_matmuls_upcast_where_onednn_has_no_16_bit_gemm(family_checkpoints, monkeypatch):
    """Where oneDNN has no bf16 GEMM (AVX2 CPUs; forced here), `optimize_for_decoding` makes the row-major bf16
    Linears `OneRowLinear`s on the same Parameters: a prompt's rows are multiplied in fp32 (`upcast_linear`, one call
    per Linear, as a compiled run's prefill), one row (decoding) keeps its kernel, bit for bit (issue #27)."""
    from litllm import cpu_layout

    monkeypatch.setattr(cpu_layout, "upcast_16_bit_gemm", lambda w: w.dtype in cpu_layout.ONE_ROW_DTYPES)
    folder = family_checkpoints("llama")
    ids = Tokenizer(folder).encode(PROMPTS[2])[None]
    model = GPT.from_checkpoint(folder).to(torch.bfloat16).eval()
    weights = {name: m.weight for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    with torch.inference_mode():
        one_row = model(ids[:, :1])
        assert cpu_layout.optimize_for_decoding(model, layout="row-major") == "row-major"
        linears = {name: m for name, m in model.named_modules() if name in weights}
        assert all(type(m) is cpu_layout.OneRowLinear and m.weight is weights[name] for name, m in linears.items())
        assert cpu_layout.optimize_for_decoding(model) == "row-major"  # idempotent
        rows, upcast = [], cpu_layout.upcast_linear
        monkeypatch.setattr(cpu_layout, "upcast_linear", lambda x, w, b: rows.append(x.shape[-2]) or upcast(x, w, b))
        assert torch.equal(model(ids[:, :1]), one_row) and rows == []
        model(ids)
    assert rows == [ids.shape[1]] * len(linears)


@pytest.mark.parametrize("layout", ["column-major", "onednn-packed"])
def test_cpu_weight_layouts_in_bf16(family_checkpoints, layout):
    """bf16 weights take the decode layouts too (`litllm generate`'s default on CPUs with bf16 units): the
    logits stay those of the row-major bf16 model within bf16's rounding."""
    from litllm.cpu_layout import optimize_for_decoding

    skip_unless_layout_runs(layout, torch.bfloat16)
    folder = family_checkpoints("llama")
    ids = Tokenizer(folder).encode(PROMPTS[2])[None]
    model = GPT.from_checkpoint(folder).to(torch.bfloat16).eval()
    with torch.inference_mode():
        expected = model(ids).float()
        assert optimize_for_decoding(model, layout=layout) == layout
        got = model(ids).float()
    qkv = model.blocks[0].attn.qkv
    assert (qkv.packed_weight if layout == "onednn-packed" else qkv.weight).dtype == torch.bfloat16
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_the_layout_pick_never_times_16_bit_weights_column_major(dtype, monkeypatch):
    """`optimize_for_decoding` times column-major for fp32 weights only: a 16-bit step over column-major weights is
    oneDNN's matmul (2-3x slower than the row-major `OneRowLinear` step on an AVX-512-BF16 EPYC), which a loaded
    machine's timing alone picked (`UNTIMED_16_BIT_LAYOUTS`). A forced `layout` still takes it."""
    from litllm import cpu_layout

    made = []
    column_major = cpu_layout.LAYOUTS["column-major"]
    monkeypatch.setitem(cpu_layout.LAYOUTS, "column-major", lambda linear: made.append(1) or column_major(linear))
    model = GPT(tiny_config()).to(dtype).eval()
    cpu_layout.optimize_for_decoding(model, min_gain=float("inf"))  # times every candidate, keeps row-major
    assert bool(made) == (dtype == torch.float32)
    model = GPT(tiny_config()).to(dtype).eval()  # (the pick may have made 16-bit Linears OneRowLinears)
    assert cpu_layout.optimize_for_decoding(model, layout="column-major") == "column-major"
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()


def test_a_compiled_16_bit_step_loads_whole_weight_vectors(monkeypatch):
    """The compiled step's one-row matmuls (`OneRowLinear` after a norm, under `cpu_compile_options`) load bf16
    weights a whole SIMD vector at a time and agree with eager. A partial load (8 of a 16-lane vector on AVX2, when
    inductor tiled the reduction by fp32's lane count) goes through a stack buffer: the 16-bit step ran 1.8x slower.
    Row-major weights (the eager pick where oneDNN cannot pack bf16: AVX2) take that kernel too, not the BLAS or
    oneDNN matmul of a one-row `F.linear` (1.4x slower on AVX2). (Where the AVX512-BF16 packed op runs, whole blocks
    take it instead, `tests/test_packed_bf16.py`: turned off here, this is the kernel everywhere else.)"""
    import re

    from litllm.packed_bf16 import PACKED_BF16_ENV

    monkeypatch.setenv(PACKED_BF16_ENV, "0")

    from torch._inductor import cpu_vec_isa
    from torch._inductor.utils import run_and_get_code

    from litllm.compile_decode import ONE_ROW_COMPILE_OPTIONS, cpu_compile_options, unpack_weights
    from litllm.cpu_layout import OneRowLinear

    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        pytest.skip("inductor does not vectorize on this CPU")
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=128, intermediate_size=256)).to(torch.bfloat16).eval()
    assert cpu_compile_options(model) is ONE_ROW_COMPILE_OPTIONS  # known before (the saved step's key)
    unpack_weights(model)  # as a compiled step does
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneRowLinear for m in linears)
    model.set_kv_cache(1, 32)
    step = lambda: model.decode(torch.tensor([[3]]), input_pos=torch.tensor([[0]]))  # noqa: E731 (the engine's step)
    with torch.no_grad():
        expected = step().float()
        options = cpu_compile_options(model)
        got, code = run_and_get_code(torch.compile(step, dynamic=False, options=options))
    # the weights' loads: (row x0, column x1) of a (rows, in_features) matrix
    widths = f"{model.config.n_embd}|{model.config.intermediate_size}"
    counts = re.findall(rf"Vectorized<at::BFloat16>::loadu\(in_ptr\d+ \+ static_cast<int64_t>\(x1 \+ ({widths})L\*x0\), "
                        r"static_cast<int64_t>\((\d+)\)\)", "".join(code))
    assert options.items() >= ONE_ROW_COMPILE_OPTIONS.items()  # (+ cpp.dynamic_threads at another thread budget)
    assert not re.search(r"extern_kernels\.(mm|addmm)|mkldnn|_linear_pointwise", "".join(code))  # no library matmul
    assert len(counts) >= 3 * 4 + 1  # qkv, proj, fc and proj of each layer, the head
    assert {int(n) for _, n in counts} == {isa.nelements(torch.bfloat16)}
    assert (got.float() - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("capability, kernel", [("AVX2", "fp32-row"), ("AVX512", "mv")])
def test_the_compiled_16_bit_one_row_kernel_is_the_one_picked_for_the_cpu(monkeypatch, capability, kernel):
    """A compiled one-row `OneRowLinear` equals plain torch (fp32 `F.linear` of the same bf16 values) within bf16's
    rounding, and converts its input row to fp32 once, into a buffer its reduction loads as fp32 vectors, exactly
    where `one_row_kernel` says so (AVX2: 1.2-1.3x faster one-row matmuls); elsewhere it stays `torch.mv`'s
    reduction, which loads the 16-bit row and converts it for every weight row."""
    import re

    import torch.nn.functional as F
    from torch._inductor import cpu_vec_isa
    from torch._inductor.utils import run_and_get_code

    from litllm import cpu_layout
    from litllm.compile_decode import ONE_ROW_COMPILE_OPTIONS

    if not cpu_vec_isa.pick_vec_isa():
        pytest.skip("inductor does not vectorize on this CPU")
    monkeypatch.setattr(cpu_layout, "CPU_CAPABILITY", capability)
    assert cpu_layout.one_row_kernel() == kernel
    torch.manual_seed(0)
    linear = cpu_layout.OneRowLinear(256, 96, bias=True, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())  # (1, 1, 96)
    torch._dynamo.reset()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(linear, dynamic=False, options=ONE_ROW_COMPILE_OPTIONS), x)
        eager = linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 96)
    assert (got.float() - expected).abs().max() <= 0.01 * expected.abs().max()  # the bf16 output's rounding
    assert (eager.float() - expected).abs().max() <= 0.01 * expected.abs().max()  # eager: torch.mv, unchanged
    code = "".join(code)
    assert not re.search(r"extern_kernels\.(mm|addmm|mv)|mkldnn", code)  # inductor's own reduction either way
    fp32_row = r"Vectorized(N<float,\d+>|<float>)::loadu\(\w+ \+ static_cast<int64_t>\(x1\)"
    bf16_row = r"Vectorized<at::BFloat16>::loadu\(\w+ \+ static_cast<int64_t>\(x1\)"
    assert bool(re.search(fp32_row, code)) == (kernel == "fp32-row")
    assert bool(re.search(bf16_row, code)) == (kernel == "mv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_saved_steps_key_is_what_the_compiled_step_multiplies_by(dtype, monkeypatch, tmp_path):
    """A saved step is found by a key computed before `unpack_weights` (`steps_folder`): it must equal the key after
    it, and tell apart steps whose Linears have other strides or kernels. fp32: packed weights unpack row-major, or
    column-major ("onednn-packed+column-major"), the strides a compiled `F.linear` (or, with more than one thread, the
    row-split op, `RowSplitLinear`) then reads; 16-bit: every row-major Linear becomes a `OneRowLinear` (`torch.mv`),
    packed ones too, or a `BlockedBf16Linear` where litllm's packed bf16 op runs, as the eager "packed-bf16" layout
    holds them already (each layout where it runs here: oneDNN packs bf16 only with AVX-512)."""
    from litllm.compile_decode import ONE_ROW_COMPILE_OPTIONS, cpu_compile_options, steps_folder, unpack_weights
    from litllm.cpu_layout import _layout_works, OneRowLinear, becomes_blocked_bf16, optimize_for_decoding
    from litllm.cpu_ops import row_split_op
    from litllm.packed_bf16 import BlockedBf16Linear, packed_bf16_op
    from litllm.row_split import RowSplitLinear, wants_row_split

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    folders, kernels = {}, {}
    for layout in ("row-major", "column-major", "onednn-packed", "onednn-packed+column-major", "packed-bf16"):
        model = GPT(tiny_config()).to(dtype).eval()
        if layout != "row-major" and not _layout_works(layout, torch.nn.Linear(64, 64, dtype=dtype)):
            continue
        assert optimize_for_decoding(model, layout=layout) == layout
        folders[layout] = steps_folder(model)
        options = cpu_compile_options(model)
        unpack_weights(model)
        assert steps_folder(model) == folders[layout] and cpu_compile_options(model) == options
        qkv = model.blocks[0].attn.qkv
        kernels[layout] = (type(qkv), qkv.weight.stride(), options.items() >= ONE_ROW_COMPILE_OPTIONS.items())
    n_in, n_out = qkv.in_features, qkv.out_features
    blocked = packed_bf16_op() is not None and becomes_blocked_bf16(torch.nn.Linear(n_in, n_out, dtype=dtype), set())
    one_row_cls = BlockedBf16Linear if blocked else OneRowLinear
    column_major = {"column-major"} if dtype == torch.bfloat16 else {"column-major", "onednn-packed+column-major"}
    for layout, (cls, strides, one_row) in kernels.items():
        # 16-bit row-major weights through OneRowLinear; column-major ones keep F.linear; fp32 ones the row-split op
        # where there are threads to split between (and it builds here)
        fp32 = RowSplitLinear if wants_row_split() and row_split_op() is not None else torch.nn.Linear
        assert cls is (fp32 if dtype == torch.float32 else one_row_cls if layout not in column_major
                       else torch.nn.Linear)
        assert strides == ((1, n_out) if layout in column_major else (n_in, 1))
        assert one_row == (dtype == torch.bfloat16 and (layout not in column_major or model.config.tie_embeddings))
        assert (folders[layout] == folders["column-major"]) == (layout in column_major)
        assert (folders[layout] == folders["row-major"]) == (layout not in column_major)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_one_row_linear_equals_linear(dtype):
    """What a compiled step multiplies 16-bit weights by (`OneRowLinear`, from `PackedLinear.unpacked`): the same
    weights bit for bit, one row through `torch.mv` equal to `F.linear` within 16-bit rounding, eager and compiled,
    and more rows exactly `F.linear`."""
    from litllm.cpu_layout import OneRowLinear, PackedLinear, _layout_works

    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 40, bias=True).to(dtype).requires_grad_(False)
    if not _layout_works("onednn-packed", plain):
        pytest.skip(f"no oneDNN {dtype} linear on this CPU")
    unpacked = PackedLinear(plain).unpacked()
    assert type(unpacked) is OneRowLinear and torch.equal(unpacked.weight, plain.weight)
    assert type(PackedLinear(torch.nn.Linear(96, 40)).unpacked()) is torch.nn.Linear  # fp32 keeps F.linear
    rows = torch.randn(2, 3, 96, dtype=dtype)
    assert torch.equal(unpacked(rows), plain(rows))
    row = torch.randn(1, 1, 96, dtype=dtype)
    expected = torch.nn.functional.linear(row.double(), plain.weight.double(), plain.bias.double())
    ulp = torch.finfo(dtype).eps * expected.abs().max()
    with torch.inference_mode():
        for got in (unpacked(row), torch.compile(unpacked, fullgraph=True)(row), plain(row)):
            assert got.shape == (1, 1, 40) and got.dtype == dtype
            assert (got.double() - expected).abs().max() <= 2 * ulp  # fp32 sums, one rounding each (+ the bias)


def _run(engine: Engine, joins: dict[int, list[Request]]) -> dict[int, list[int]]:
    """Step the engine, adding joins[k] before step k; returns each request's generated tokens."""
    tokens: dict[int, list[int]] = {}
    step = 0
    while step <= max(joins) or engine.has_unfinished:
        for request in joins.get(step, []):
            tokens[engine.add(request)] = []
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step += 1
    return tokens


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "mixtral"])
def test_continuous_batch_equals_one_by_one(family_checkpoints, family):
    """Rows of different prompt lengths that join at different steps (while others are mid-decode,
    and into rows freed by finished requests) each get exactly the tokens they get alone."""
    folder = family_checkpoints(family)
    model = GPT.from_checkpoint(folder).eval()
    tok = Tokenizer(folder)
    prompts = [tok.encode(p).tolist() for p in PROMPTS + ["Hello", "A B C D E F G H"]]
    assert len({len(p) for p in prompts}) == len(prompts)
    greedy = [Request(p, 16 - i) for i, p in enumerate(prompts)]
    seeded = [Request(p, 12, Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=i)) for i, p in enumerate(prompts)]
    for requests in (greedy, seeded):
        singles = [generate_ids(model, r.prompt_ids, r.max_new_tokens, r.sampling) for r in requests]
        with Engine(model, tok, max_batch_size=3, max_seq_length=64) as engine:
            # 2 join at once, the 3rd after 2 steps, the last two wait for free rows
            got = _run(engine, {0: requests[:2], 2: requests[2:3], 5: requests[3:]})
        assert [got[i] for i in range(len(requests))] == singles
    # a stop id ends its own row only; the other rows keep going
    stop = generate_ids(model, prompts[1], 16)[5]
    singles = [generate_ids(model, p, 16, stop_token_ids=[stop]) for p in prompts[:3]]
    with Engine(model, tok, max_batch_size=3, max_seq_length=64) as engine:
        got = _run(engine, {0: [Request(p, 16, stop_token_ids=[stop]) for p in prompts[:3]]})
    assert [t[:-1] if t and t[-1] == stop else t for t in got.values()] == singles
    assert len(singles[1]) <= 5


def test_steps_over_the_first_rows_keep_each_row_its_tokens(tiny_checkpoint):
    """Steps over the first 1 or 2 of 4 rows (`Engine.row_steps`: serve's compiled ones; here the eager step on the
    sliced rows stands in), taken while every running row lies there, give each request exactly its tokens alone,
    greedy and seeded sampling, as rows join and leave (one into a freed lower row); and each of them ran."""
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    requests = [Request(prompts[0], 20), Request(prompts[1], 6, Sampling(temperature=1.0, top_k=20, seed=1)),
                Request(prompts[2], 12), Request(prompts[3], 10, Sampling(temperature=0.8, seed=2))]
    singles = [generate_ids(model, r.prompt_ids, r.max_new_tokens, r.sampling) for r in requests]
    with Engine(model, None, max_batch_size=4, max_seq_length=64) as engine:
        engine._row_steps = {1: engine._decode_logits, 2: engine._decode_logits}
        # row 0 alone (1-row step), rows 0-1 (2), rows 0-2 (all 4); the 4th request takes row 1 once it is free,
        # and decodes there last, alone (2)
        got = _run(engine, {0: requests[:1], 3: requests[1:2], 6: requests[2:3], 12: requests[3:]})
        assert set(engine.decode_steps) == {1, 2, 4}
    assert [got[i] for i in range(len(requests))] == singles


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_chunked_prefill_joins_mid_decode(family_checkpoints, family):
    """A prompt longer than the prefill chunk, joining mid-decode, is prefilled over several steps
    while the running row keeps producing one token per step; a prompt queued behind it starts in the
    step the long one's prefill ends. Each still gets exactly the tokens it gets alone (one-pass prefill)."""
    folder = family_checkpoints(family)
    model = GPT.from_checkpoint(folder).eval()
    tok = Tokenizer(folder)
    chunk = 8
    long_prompt = tok.encode(" ".join(PROMPTS)).tolist()
    assert len(long_prompt) > 3 * chunk and len(long_prompt) % chunk
    requests = [Request(tok.encode("Hello").tolist(), 24), Request(long_prompt, 8), Request([5, 6, 7], 8)]
    assert len(requests[0].prompt_ids) <= chunk
    singles = [generate_ids(model, r.prompt_ids, r.max_new_tokens) for r in requests]
    with Engine(model, tok, max_batch_size=3, max_seq_length=96, prefill_chunk=chunk) as engine:
        ids = [engine.add(requests[0])]
        steps = [engine.step(), engine.step()]
        ids += [engine.add(r) for r in requests[1:]]
        while engine.has_unfinished:
            steps.append(engine.step())
    got = {i: [t for outs in steps for o in outs if o.request_id == i for t in o.token_ids] for i in ids}
    assert [got[i] for i in ids] == singles
    produced = [{o.request_id: len(o.token_ids) for o in outs} for outs in steps]
    joined = next(n for n, p in enumerate(produced) if ids[1] in p)  # the long prompt's first tokens
    assert joined == 2 + len(long_prompt) // chunk  # ceil(len / chunk) steps of prefill
    assert produced[0] == {ids[0]: 1}  # it found the engine idle: its first token at its prefill's end
    assert produced[joined][ids[1]] == 2  # it joined a running row: prefilled, then decoded with it, in one step
    assert all(p.get(ids[0]) == 1 for p in produced[1:joined])  # the running row never waited
    assert all(ids[2] not in p for p in produced[:joined]) and ids[2] in produced[joined]
    with pytest.raises(LitLLMError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=0)


def test_idle_engine_returns_first_tokens_at_the_prefill_end(tiny_checkpoint):
    """A step that finds no row decoding returns the first token of each prompt it prefills without a decode step (a
    streaming client's first token comes at its prefill's end, issue #27); the next step decodes them. Each request
    still gets exactly the tokens it gets alone."""
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    prompts, n = [[5, 17, 42, 99], [7, 3, 11]], 6
    singles = [generate_ids(model, p, n) for p in prompts]
    with Engine(model, None, max_batch_size=2, max_seq_length=32) as engine:
        decodes = []
        decode = engine._decode
        engine._decode = lambda *args: decodes.append(1) or decode(*args)
        ids = [engine.add(Request(p, n)) for p in prompts]
        steps = [engine.step()]
        assert {o.request_id: o.token_ids for o in steps[0]} == {i: [s[0]] for i, s in zip(ids, singles)}
        assert not decodes
        while engine.has_unfinished:
            steps.append(engine.step())
    assert len(decodes) == len(steps) - 1 == n - 1  # tokens 2..n, one batched decode step each
    assert [[t for outs in steps for o in outs if o.request_id == i for t in o.token_ids] for i in ids] == singles


def test_engine_abort_and_errors(tiny_checkpoint):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    tok = Tokenizer(tiny_checkpoint)
    with Engine(model, tok, max_batch_size=1, max_seq_length=32) as engine:
        with pytest.raises(LitLLMError, match="context window of 32"):
            engine.add(Request([1] * 30, 5))
        with pytest.raises(LitLLMError, match="empty"):
            engine.add(Request([], 5))
        first = engine.add(Request([1, 2, 3], 20))
        waiting = engine.add(Request([1, 2], 20))
        engine.step()
        assert (engine.num_running, engine.num_waiting) == (1, 1)
        engine.abort(first)
        engine.abort(waiting)
        outs = engine.step()
        assert sorted((o.request_id, o.finish_reason) for o in outs) == [(first, "abort"), (waiting, "abort")]
        assert not engine.has_unfinished
    assert all(b.attn.kv_cache is None for b in model.blocks)


def test_stop_ids(tiny_checkpoint):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    ids = Tokenizer(tiny_checkpoint).encode("The quick brown fox").tolist()
    full = generate_ids(model, ids, 20)
    k = next(i for i in range(3, 18) if full[i] not in full[:i])  # a token first seen at k
    assert generate_ids(model, ids, 20, stop_token_ids=[full[k]]) == full[:k]


def test_special_token_stop_strings_stop(tiny_checkpoint, tmp_path):
    """A stop string that is one special token (chatml's `<|im_end|>`) ends the reply: the text matcher
    decodes with special tokens skipped, so it must stop on the token id -- whether the string comes
    from the prompt style (`default_stops`) or from a caller's stop strings (the server's `stop`)."""
    from litllm.prompts import PromptStyle

    folder = tmp_path / "im_end"
    reply = make_im_end_checkpoint(tiny_checkpoint, folder, "Hello there")
    model, tok, style = GPT.from_checkpoint(folder).eval(), Tokenizer(folder), PromptStyle.from_name("chatml")
    im_end = tok.token_to_id("<|im_end|>")
    stops = default_stops(tok, style)
    assert im_end in stops["stop_token_ids"] and "<|im_end|>" not in stops["stop_strings"]
    ids = style.encode(tok, style.render_messages([{"role": "user", "content": "Hello there"}])).tolist()
    with Engine(model, tok, max_batch_size=2, max_seq_length=96) as engine:
        by_style = engine.add(Request(ids, 20, **stops))
        by_caller = engine.add(Request(ids, 20, stop_strings=["<|im_end|>"], stop_token_ids=tok.stop_ids))
        outs = {by_style: [], by_caller: []}
        while engine.has_unfinished:
            for out in engine.step():
                outs[out.request_id].append(out)
    for got in outs.values():
        assert [t for o in got for t in o.token_ids] == reply + [im_end]
        assert "".join(o.text for o in got) == tok.decode(reply)
        assert got[-1].finish_reason == "stop"


def test_stop_strings_are_held_back_and_never_emitted(tmp_path):
    """Streaming: text that could begin a stop string waits; a stop string, even one spread over
    several tokens and decoded characters, never reaches the output; everything else does."""
    tok = Tokenizer(train_bpe_tokenizer(tmp_path, byte_fallback=True))
    text = "Hello world, café 東京 END here. More text after"
    ids = tok.encode(text, bos=False).tolist()
    for stops, expected in [
        (["END"], "Hello world, café 東京 "),
        (["京 E"], "Hello world, café 東"),
        (["ENDX", "o w"], "Hell"),
        (["END here. More text after!"], text),  # begins but never completes: nothing lost
        (["zzz"], text),
    ]:
        matcher = StopMatcher(tok, stops, [])
        chunks = []
        for t in ids:
            chunks.append(matcher.push(t))
            emitted = "".join(chunks)
            assert not any(s in emitted for s in stops)
            assert expected.startswith(emitted)  # never more than the answer, never a stop
            if matcher.stopped:
                break
        else:
            chunks.append(matcher.flush())
        assert "".join(chunks) == expected, stops
    # held back while it may begin a stop string, released once it can't
    matcher = StopMatcher(tok, ["lo wX"], [])
    pieces = [matcher.push(t) for t in tok.encode("Hello wor", bos=False).tolist()]
    assert "".join(pieces) == "Hello wor"
    # a stop token id ends the request without being decoded
    matcher = StopMatcher(tok, [], [ids[3]])
    assert "".join(matcher.push(t) for t in ids[:4]) == tok.decode(ids[:3])
    assert matcher.stopped


def test_context_window(tiny_checkpoint, capsys):
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    limit = model.max_seq_length
    with pytest.raises(LitLLMError, match="context window"):
        generate_ids(model, [1] * limit, 5)
    assert fit_max_new_tokens(None, 50, 3, limit) == 3  # a default shrinks to fit, and says so
    assert "reduced to 3" in capsys.readouterr().err
    assert fit_max_new_tokens(None, 50, 80, limit) == 50
    assert capsys.readouterr().err == ""
    with pytest.raises(LitLLMError, match="--max_new_tokens 50 does not fit"):
        fit_max_new_tokens(50, 20, 3, limit)  # a value the user gave must fit
    with pytest.raises(LitLLMError, match="top_p"):
        generate_ids(model, [1, 1, 1], 5, Sampling(top_p=0.0))


def test_sampling_probs_at_temperature_one_skip_the_shift_bit_for_bit():
    """At temperature 1 without top-k/top-p, `sampling_probs` is one softmax: the same values, bit for bit, as
    softmax((logits - max) / 1), since softmax shifts by the max itself (fp32, bf16 and large-magnitude logits)."""
    from litllm.engine import sampling_probs

    torch.manual_seed(0)
    for logits in (torch.randn(8, 8000), torch.randn(8, 8000) * 300 + 1e4, torch.randn(3, 5, 1000).bfloat16()):
        shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)
        assert torch.equal(sampling_probs(logits, 1.0), (shifted / 1.0).softmax(dim=-1))


def test_sample():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), logits.argmax(-1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sample(logits, 1.0, generator=g1), sample(logits, 1.0, generator=g2))

    # frequencies follow softmax(logits / T) restricted to top-k / the nucleus
    row = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    n = 20000
    draws = sample(row.expand(n, -1), temperature=0.7, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, torch.softmax(row / 0.7, -1), atol=0.015)

    draws = sample(row.expand(n, -1), temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(2))
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, torch.cat([torch.softmax(row[:3], -1), torch.zeros(3)]), atol=0.015)

    probs = torch.softmax(row, -1)  # [0.43, 0.26, 0.16, ...]: top_p 0.6 keeps the first two (0.69 >= 0.6)
    draws = sample(row.expand(n, -1), temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(4)]), atol=0.015)


def test_incremental_decoding_matches_decode(tmp_path):
    """Chunks never split a character, and concatenate to the full decode (SentencePiece spaces, bytes)."""
    for byte_fallback in (False, True):
        tok = Tokenizer(train_bpe_tokenizer(tmp_path / str(byte_fallback), byte_fallback=byte_fallback))
        text = "Hello  world, café 東京 🙂 end.\n  indented"
        ids = tok.encode(text, bos=False).tolist()
        matcher = StopMatcher(tok)
        chunks = [c for c in (matcher.push(t) for t in ids) if c] + [matcher.flush()]
        assert "".join(chunks) == tok.decode(ids) == text
        assert all("\ufffd" not in c for c in chunks)
        assert len(chunks) > 5  # it really streams


def test_generate_command_greedy(family_checkpoints, capsys):
    folder = family_checkpoints("llama")
    tok = Tokenizer(folder)
    expected = tok.decode(_hf_greedy(folder, tok.encode("The quick brown fox"), 12))
    capsys.readouterr()  # drop what building the checkpoint printed
    generate(folder, "The quick brown fox", max_new_tokens=12, temperature=0.0, num_samples=2, prompt_style="default")
    out = capsys.readouterr()
    assert out.out == f"{expected}\n{expected}\n"
    assert "tokens/s" in out.err


def test_an_eager_generate_imports_no_compiler(tiny_checkpoint):
    # the model is built on the meta device with its initialisers and RoPE tables skipped (`meta_device`): run there,
    # they go through torch's Python reference kernels, whose first call imports torch._dynamo and torch._inductor
    # (~1 CPU-s of a ~3 CPU-s start) for no values at all
    code = ("import sys; from litllm.generate import generate; "
            "generate(sys.argv[1], 'Hello', max_new_tokens=4, temperature=0.0, compile=False); "
            "print([m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_generate_command_stops_at_eos(tiny_checkpoint, tmp_path, capsys):
    """An id listed as EOS in generation_config.json ends the output (and is not printed)."""
    import json

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    tok = Tokenizer(folder)
    model = GPT.from_checkpoint(folder).eval()
    full = generate_ids(model, tok.encode("The quick brown fox").tolist(), 20)
    k = next(i for i in range(3, 18) if full[i] not in full[:i])
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_id, full[k]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    generate(folder, "The quick brown fox", max_new_tokens=20, temperature=0.0, prompt_style="default")
    assert capsys.readouterr().out == tok.decode(full[:k]) + "\n"


def test_generate_command_sampling_seeded(tiny_checkpoint, capsys):
    kwargs = dict(prompt="Hello", max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    generate(tiny_checkpoint, seed=5, **kwargs)
    first = capsys.readouterr().out
    generate(tiny_checkpoint, seed=5, **kwargs)
    assert capsys.readouterr().out == first
    generate(tiny_checkpoint, seed=6, num_samples=3, **kwargs)
    samples = capsys.readouterr().out
    assert len(set(samples.splitlines())) > 1


def test_generate_command_precision_bf16(tiny_checkpoint, capsys):
    generate(tiny_checkpoint, "Hello", max_new_tokens=5, temperature=0.0, precision="bf16-true")
    assert capsys.readouterr().out.strip()
    with pytest.raises(LitLLMError, match="--precision") as error:
        generate(tiny_checkpoint, "Hello", precision="64-true")
    assert "did you mean" not in str(error.value)
    for training_name in ("bf16-mixed", "bf16"):  # what a training recipe says, or a bare dtype
        with pytest.raises(LitLLMError, match=r"got '.+' \(did you mean bf16-true\?\)"):
            generate(tiny_checkpoint, "Hello", precision=training_name)


def test_default_precision_and_its_environment_variable(monkeypatch):
    from litllm import inference
    from litllm.inference import resolve_precision

    monkeypatch.delenv("LITLLM_PRECISION", raising=False)
    # bf16 where the CPU has bf16 units (AVX512-BF16, AMX), unquantized; else fp32 (tutorials/inference.md 6c)
    for units, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(inference, "cpu_has_bf16_units", lambda units=units: units)
        assert resolve_precision(None, "cpu") == dtype and resolve_precision("32-true", "cpu") == torch.float32
        assert resolve_precision(None, "cpu", "torchao.int8wo") == torch.float32  # quantized: fp32 compute
    monkeypatch.setenv("LITLLM_PRECISION", "bf16-true")
    assert resolve_precision(None, "cpu") == torch.bfloat16 and resolve_precision("32-true", "cpu") == torch.float32
    monkeypatch.setenv("LITLLM_PRECISION", "fp8")
    with pytest.raises(LitLLMError, match=r"\$LITLLM_PRECISION: expected one of 32-true, bf16-true, 16-true, got 'fp8'"):
        resolve_precision(None, "cpu")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_cpu_bf16_units_are_this_cpus():
    """`cpu_has_bf16_units` (the CPU default precision's test) says what the kernel's CPU flags say."""
    from litllm.inference import cpu_has_bf16_units

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_bf16_units() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_generate_command_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(LitLLMError, match="top_p"):
        generate(tiny_checkpoint, top_p=1.5)
    with pytest.raises(LitLLMError, match="context window"):
        generate(tiny_checkpoint, prompt="word " * 200, max_new_tokens=5)
    with pytest.raises(LitLLMError, match="unknown prompt style"):
        generate(tiny_checkpoint, prompt_style="nope")
    with pytest.raises(LitLLMError, match="unknown mode"):
        generate(tiny_checkpoint, quantize="bnb.int3")
    # a downloaded but not converted folder: the error offers the command
    hf_only = tmp_path / "hf"
    shutil.copytree(tiny_checkpoint, hf_only)
    (hf_only / "lit_model.safetensors").unlink()
    with pytest.raises(LitLLMError, match="convert_to_litllm"):
        generate(hf_only)


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "checkpoint folder not found"),
    (["{ckpt}/model_config.yaml"], "model_config.yaml: a file; expected a model folder"),
    (["{ckpt}", "--top_p", "0"], "--top_p must be in (0, 1]"),
    (["{ckpt}", "--quantize", "bnb.nf4", "--device", "cuda"], "CUDA is not available"),
])
def test_generate_cli_errors(tiny_checkpoint, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    args = [a.format(missing=tmp_path / "missing", ckpt=tiny_checkpoint) for a in args]
    proc = subprocess.run([sys.executable, "-m", "litllm", "generate", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_generate_compiled_equals_eager(tiny_checkpoint, capsys):
    generate(tiny_checkpoint, "Hello", max_new_tokens=8, temperature=0.0)
    eager = capsys.readouterr().out
    generate(tiny_checkpoint, "Hello", max_new_tokens=8, temperature=0.0, compile=True)
    assert capsys.readouterr().out == eager


def test_decode_threads(tiny_checkpoint):
    from litllm.engine import threads_for
    from litllm.inference import pick_decode_threads

    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    torch.set_num_threads(2)
    assert pick_decode_threads(model, min_gain=float("inf")) == 2  # fewer threads never good enough
    assert pick_decode_threads(model, min_gain=0.0) == 1  # fewer threads always good enough
    assert torch.get_num_threads() == 2  # timing leaves the setting alone
    assert all(b.attn.kv_cache is None for b in model.blocks)
    with threads_for(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert pick_decode_threads(model) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype, layout", [(torch.float32, "onednn-packed"), (torch.bfloat16, "onednn-packed"),
                                           (torch.float32, "onednn-packed+column-major")],
                         ids=["fp32", "bf16", "fp32-column-major"])
def test_a_compiled_step_runs_over_onednn_packed_weights(tiny_checkpoint, dtype, layout, monkeypatch, tmp_path):
    """The layout the eager step may pick (oneDNN's packed weights) used to fail inductor's lowering once `chat`,
    `serve` or a long `generate` compiled the step; compiled, it multiplies by the same weights unpacked."""
    from litllm.generate import decode_engine
    from litllm.cpu_layout import OneRowLinear, PackedLinear, optimize_for_decoding
    from litllm.packed_bf16 import BlockedBf16Linear

    skip_unless_layout_runs(layout, dtype)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    def greedy(compile: bool) -> list[int]:
        model = GPT.from_checkpoint(tiny_checkpoint).to(dtype).eval()
        assert optimize_for_decoding(model, layout=layout) == layout
        engine = Engine(model, None, 1, 32, compile=compile)
        assert any(isinstance(m, PackedLinear) for m in model.modules()) != compile
        # bf16 compiled: `OneRowLinear`, or oneDNN's packed bytes held once where the AVX512-BF16 op runs
        one_row = (OneRowLinear, BlockedBf16Linear)
        assert isinstance(model.blocks[0].attn.qkv, one_row) == (compile and dtype == torch.bfloat16)
        engine.add(Request([1, 2, 3, 4], 8))
        tokens = []
        while engine.has_unfinished:
            tokens += [t for out in engine.step() for t in out.token_ids]
        return tokens

    compiled, eager = greedy(True), greedy(False)
    assert len(compiled) == 8
    assert compiled == eager
    # a later run of a packed model finds that saved step by its key (the weights as the step takes them)
    model = GPT.from_checkpoint(tiny_checkpoint).to(dtype).eval()
    optimize_for_decoding(model, layout=layout)
    engine = decode_engine(model, None, 1, 20, None, compile=True)
    assert (engine.max_seq_length, engine.step_source) == (32, "loaded")
