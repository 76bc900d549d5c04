"""A prompt's fp32 CPU matmuls by the faster GEMM here (`litllm.cpu_layout.prompt_linear`): oneDNN's on AVX-512 CPUs,
where MKL's sgemm takes no AVX-512 path on AMD's and gains little from a second thread; `F.linear` elsewhere. It
equals `F.linear` within fp32 rounding, and the engine's prefill takes it (the compiled layout's fp32 Linears, the int8
layers' eager step) with the same greedy tokens and prompt logits as the uncached forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from litllm import cpu_layout
from litllm.cpu_layout import PROMPT_GEMM_ENV, prompt_gemm, prompt_linear
from litllm.errors import LitLLMError

needs_onednn = pytest.mark.skipif(not cpu_layout._has_onednn_linear(), reason="torch without oneDNN's linear")


def ran_onednn(fn) -> bool:
    """Did `fn()` call oneDNN's linear (the profiler's op names)?"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.key == "mkldnn::_linear_pointwise" for event in prof.key_averages())


def test_the_prompt_gemm_is_onednn_on_avx512_and_blas_on_avx2(monkeypatch):
    """Keyed on torch's CPU capability (AVX2 CPUs keep `F.linear`, as measured there); `$LITLLM_PROMPT_GEMM` forces
    either, and a bad value is a one-line error."""
    monkeypatch.delenv(PROMPT_GEMM_ENV, raising=False)
    monkeypatch.setattr(cpu_layout, "CPU_CAPABILITY", "AVX2")
    assert prompt_gemm() == "blas"
    monkeypatch.setattr(cpu_layout, "CPU_CAPABILITY", "AVX512")
    assert prompt_gemm() == ("onednn" if cpu_layout._has_onednn_linear() else "blas")
    monkeypatch.setenv(PROMPT_GEMM_ENV, "blas")
    assert prompt_gemm() == "blas"
    monkeypatch.setenv(PROMPT_GEMM_ENV, "mkl")
    with pytest.raises(LitLLMError, match="LITLLM_PROMPT_GEMM.*onednn or blas"):
        prompt_gemm()


@needs_onednn
def test_prompt_linear_equals_linear(monkeypatch, threads):
    """Row- and column-major weights (the eager layout pick leaves fp32 ones either way), with and without a bias, 2 to
    33 rows: within fp32 rounding of a float64 product, on oneDNN; one row, recorded gradients and other dtypes are
    `F.linear` itself."""
    monkeypatch.setenv(PROMPT_GEMM_ENV, "onednn")
    torch.manual_seed(0)
    with torch.inference_mode():
        for n_out, n_in in ((8, 96), (200, 64), (1000, 96)):
            weight, bias = torch.randn(n_out, n_in), torch.randn(n_out)
            for w in (weight, weight.t().contiguous().t()):
                for b in (None, bias):
                    for rows in (2, 7, 33):
                        x = torch.randn(1, rows, n_in)
                        expected = F.linear(x.double(), w.double(), None if b is None else b.double())
                        assert ran_onednn(lambda: prompt_linear(x, w, b))
                        got = prompt_linear(x, w, b)
                        assert got.shape == (1, rows, n_out) and got.dtype == torch.float32
                        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
                one = torch.randn(1, 1, n_in)
                assert not ran_onednn(lambda: prompt_linear(one, w, bias))
                assert torch.equal(prompt_linear(one, w, bias), F.linear(one, w, bias))
                x16 = torch.randn(3, n_in, dtype=torch.bfloat16)
                assert torch.equal(prompt_linear(x16, w.bfloat16()), F.linear(x16, w.bfloat16()))
    x, w = torch.randn(4, 8), torch.randn(6, 8, requires_grad=True)
    prompt_linear(x, w).sum().backward()  # training: F.linear, with its backward
    assert torch.equal(w.grad, x.sum(0).expand(6, 8))


@needs_onednn
@pytest.mark.parametrize("mode, layout, threads", [
    ("none", "compiled", 2), ("none", "compiled", 1), ("none", "eager", 2), ("none", "eager-packed", 1),
    ("torchao.int8wo", "compiled", 2), ("torchao.int8dq", "compiled", 2)])
def test_the_engines_prefill_takes_the_prompt_gemm(monkeypatch, mode, layout, threads):
    """The layouts a run's engine holds: a compiled run's (`unpack_weights`: fp32 Linears as `RowSplitLinear`s on 2
    threads or where litllm's AVX-512 kernel multiplies a row, `PromptLinear`s otherwise; int8 layers' eager step) and an eager run's (`optimize_for_decoding`: column-major
    `PromptLinear`s, or oneDNN's packed ones): the prefill's matmuls run oneDNN's GEMM where `prompt_gemm` says so and
    `F.linear` where not, the same first tokens either way, and (fp32) the prompt's last logits within fp32 rounding of
    the uncached forward."""
    from litllm.compile_decode import unpack_weights
    from litllm.cpu_layout import PackedLinear, PromptLinear, optimize_for_decoding
    from litllm.engine import Engine, Request
    from litllm.model import GPT
    from litllm.quantize import quantize_model
    from litllm.cpu_ops import INT8_PROMPT_ENV, row_split_op
    from litllm.row_split import RowSplitLinear, wants_row_split

    if mode != "none":
        pytest.importorskip("torchao")
    if layout == "compiled" and threads > 1 and row_split_op() is None:
        pytest.skip("the row-split op does not build here (no C++ compiler?)")
    monkeypatch.setenv(PROMPT_GEMM_ENV, "onednn")  # the layout's pick, wherever this runs
    # int8 prompts take litllm's own int8 op where it is built (tests/test_quantize.py); this test is about the GEMM
    # they fall back to where it is not (no AVX-512 VNNI, `$LITLLM_INT8_PROMPT=0`)
    monkeypatch.setenv(INT8_PROMPT_ENV, "0")
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 320, (24,)).tolist()
    with torch.no_grad():
        uncached = model(torch.tensor([prompt]))[0, -1]
    if mode != "none":
        quantize_model(model, mode, "cpu")
    torch.set_num_threads(threads)
    if layout == "compiled":
        unpack_weights(model)
    else:
        optimize_for_decoding(model, layout="onednn-packed" if layout == "eager-packed" else "column-major")
    kinds = {type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))}
    row_split = layout == "compiled" and wants_row_split() and row_split_op() is not None
    if mode == "none":
        assert kinds == {PackedLinear if layout == "eager-packed" else RowSplitLinear if row_split else PromptLinear}
    firsts, logits = {}, {}
    for gemm in ("onednn", "blas"):
        monkeypatch.setenv(PROMPT_GEMM_ENV, gemm)
        engine = Engine(model, None, 1, 32, threads=threads)
        engine.add(Request(prompt, 3))
        with torch.inference_mode():
            prefill = engine._prefill_logits
            engine._prefill_logits = lambda *a, p=prefill, g=gemm: logits.setdefault(g, p(*a))
            outputs = []
            onednn = ran_onednn(lambda: outputs.extend(engine.step()))  # the first step: the prefill
            assert onednn == (gemm == "onednn" or layout == "eager-packed")
            while engine.has_unfinished:
                outputs += engine.step()
        firsts[gemm] = [t for out in outputs for t in out.token_ids]
        engine.close()
    assert firsts["onednn"] == firsts["blas"] and len(firsts["blas"]) == 3
    if mode == "none":
        for got in logits.values():
            assert (got[-1] - uncached).abs().max() <= 1e-5 * uncached.abs().max()


def test_an_eager_one_row_16_bit_linear_is_f_linear():
    """A compiled run's bf16 Linears are `OneRowLinear`s, and the engine's prefill runs them eagerly: one row (the
    prompt's last, through the head) goes through `F.linear` (oneDNN's bf16 GEMV where the CPU has bf16 units, 1.5x
    `torch.mv`'s there), the same values as the plain Linear's; a compiled one-row call keeps `torch.mv`'s reduction."""
    from torch.profiler import ProfilerActivity, profile

    from litllm.cpu_layout import OneRowLinear

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 300, bias=True, dtype=torch.bfloat16)
    one_row = OneRowLinear(64, 300, bias=True, device="meta")
    one_row.weight, one_row.bias = plain.weight, plain.bias
    row = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = one_row(row)
        assert "aten::mv" not in {event.key for event in prof.key_averages()}
        assert torch.equal(got, plain(row))
        compiled = torch.compile(one_row, fullgraph=True, dynamic=False)(row)
    assert (compiled.float() - got.float()).abs().max() <= 0.02 * got.float().abs().max()
