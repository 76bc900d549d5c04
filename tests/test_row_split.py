"""The fp32 one-row matmul on every thread (`litllm.row_split`): the op equals `F.linear` (its AVX-512 kernel and MKL's
GEMV alike), and a compiled CPU step multiplies its fp32 weights by it exactly when torch has more than one thread or
the CPU has the op's AVX-512 kernel, decoding the eager step's greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_compile_decode import greedy_tokens

from litllm.cpu_layout import prompt_linear
from litllm.engine import Engine
from litllm.model import GPT
from litllm.cpu_ops import row_split_op
from litllm.row_split import MAX_ROWS, RowSplitLinear, row_split_kernel


@pytest.fixture(scope="module")
def op():
    found = row_split_op()
    if found is None:
        pytest.skip("the row-split op does not build here (no C++ compiler?)")
    return found


@pytest.fixture
def avx512_threads(threads, op):
    """The shared `threads` fixture (1, then 2) for a test of the op's AVX-512 kernel; skipped without AVX-512."""
    if row_split_kernel() != "avx512":
        pytest.skip("no AVX-512 here: the op's chunks are MKL's GEMV, several rows F.linear")
    return threads


def test_row_split_linear_equals_linear(op, threads):
    """One row, any output width (blocks of 64 rows and a ragged last one) and layout (row- or column-major, as the
    eager layout pick leaves fp32 weights): within fp32 rounding of `F.linear`, eager and (the widest, column-major)
    compiled; more rows than the op takes (`MAX_ROWS`) go through `prompt_linear` (a prompt's GEMM) itself."""
    torch.manual_seed(0)
    for n_out in (8, 64, 200, 1000):
        weight = torch.randn(n_out, 96)
        for w in (weight, weight.t().contiguous().t()):
            row = torch.randn(1, 1, 96)
            expected = F.linear(row.double(), w.double()).float()
            got = op(row, w)
            assert got.shape == (1, 1, n_out)
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
            linear = RowSplitLinear(96, n_out, bias=True)
            linear.weight = torch.nn.Parameter(w, requires_grad=False)
            rows = torch.randn(3, 4, 96)  # 12 rows: more than MAX_ROWS
            with torch.inference_mode():
                assert torch.equal(linear(rows), prompt_linear(rows, w, linear.bias))
                got = linear(row)
                assert (got - F.linear(row, w, linear.bias)).abs().max() <= 1e-5 * expected.abs().max()
    with torch.inference_mode():  # the last one: (1000, 96), column-major
        got = torch.compile(linear, fullgraph=True)(row)
    assert (got - F.linear(row, w, linear.bias)).abs().max() <= 1e-5 * expected.abs().max()
    with pytest.raises(RuntimeError, match="features"):
        op(torch.randn(1, 95), torch.randn(8, 96))


def test_the_avx512_kernel_equals_float64_on_odd_shapes(op, avx512_threads):
    """The op's AVX-512 kernel (a row-major weight: 4 rows at a time, then one; 32 values a step, then whole and
    masked vectors of 16) within fp32 rounding of the float64 product for widths that leave every tail ragged (K and N
    no multiple of 16 or 4), rows further apart than their width (a slice of a wider weight), more rows than one
    thread's chunk, on 1 and 2 threads; the MKL-GEMV op (`row_split_linear_blas`, what it ran before) likewise."""
    torch.manual_seed(0)
    for n_out, n_in in ((1, 1), (3, 5), (5, 17), (37, 31), (9, 33), (1000, 100), (203, 772), (70, 2053)):
        for w in (torch.randn(n_out, n_in), torch.randn(n_out, n_in + 11)[:, :n_in]):
            row = torch.randn(1, n_in)
            expected = row.double() @ w.double().t()
            bound = 1e-6 * (row.double().abs() @ w.double().abs().t())  # fp32 sums of n_in products: ~n_in * 2^-24
            for kernel in (op, torch.ops.litllm_cpu.row_split_linear_blas):
                got = kernel(row, w)
                assert got.shape == (1, n_out)
                assert ((got.double() - expected).abs() <= bound * max(1, n_in / 64)).all(), (kernel, n_out, n_in)
        if n_in >= 100:  # the two sum in other orders: some of the last bits differ (the kernel ran, not MKL's)
            assert not torch.equal(op(row, w), torch.ops.litllm_cpu.row_split_linear_blas(row, w))


def test_the_avx512_kernel_multiplies_up_to_8_rows_as_one_row_calls(op, avx512_threads):
    """Up to 8 rows of x (a batched decode step's) through the op's AVX-512 kernel (each block of 4 weight rows read
    once for every x row, 2 x rows at a time and an odd last one): each row's result is the one-row call's bit for bit
    (the same sums in the same order), so within fp32 rounding of the float64 product, for ragged K and N, a weight
    slice, rows of x further apart than their width, a NaN row (NaN in its own row only), 1 and 2 threads; 9 rows go
    to `F.linear` (a GEMM), within fp32 rounding too."""
    torch.manual_seed(0)
    for n_out, n_in in ((1, 1), (5, 17), (37, 31), (9, 33), (203, 772), (70, 2053)):
        for w in (torch.randn(n_out, n_in), torch.randn(n_out, n_in + 11)[:, :n_in]):
            for m in range(1, 10):
                x = torch.randn(m, n_in + 3)[:, 1:n_in + 1]  # not contiguous
                if m == 5:
                    x[2, n_in // 2] = float("nan")
                got = op(x, w)
                assert got.shape == (m, n_out)
                if m <= MAX_ROWS:
                    one_row_calls = torch.cat([op(row[None], w) for row in x])
                    assert torch.equal(got.view(torch.int32), one_row_calls.view(torch.int32)), (n_out, n_in, m)
                expected = x.double() @ w.double().t()
                bound = 1e-6 * max(1, n_in / 64) * (x.double().abs() @ w.double().abs().t())
                close = (got.double() - expected).abs() <= bound
                if m == 5:  # the NaN row is NaN throughout, the others are untouched
                    assert got[2].isnan().all() and close[[0, 1, 3, 4]].all()
                else:
                    assert close.all(), (n_out, n_in, m)


def test_a_row_split_linear_takes_several_rows_through_the_op_on_row_major_weights(op):
    """`RowSplitLinear` multiplies 2..`MAX_ROWS` rows through the op where its kernel runs them (a row-major weight,
    not `blas`): the same rows as one-row calls, bias added; more rows, a column-major weight or the BLAS op's
    Linear: `prompt_linear`."""
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 300), torch.randn(40)
    linear = RowSplitLinear(300, 40, device="meta")
    linear.weight, linear.bias = (torch.nn.Parameter(t, requires_grad=False) for t in (weight, bias))
    with torch.inference_mode():
        for shape in ((2, 1, 300), (1, 5, 300), (4, 2, 300)):
            rows = torch.randn(shape)
            expected = prompt_linear(rows, weight, bias)
            got = linear(rows)
            if row_split_kernel() == "avx512":
                one_row_calls = torch.stack([linear(row) for row in rows.view(-1, 1, 300)]).view_as(got)
                assert torch.equal(got, one_row_calls)
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        rows = torch.randn(3, 3, 300)  # 9 rows
        assert torch.equal(linear(rows), prompt_linear(rows, weight, bias))
        linear.weight = torch.nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
        rows = torch.randn(2, 1, 300)
        assert torch.equal(linear(rows), prompt_linear(rows, linear.weight, bias))


def test_a_compiled_fp32_step_multiplies_by_the_row_split_op(op, threads):
    """With a thread budget > 1, or on an AVX-512 CPU (the op's own kernel) at 1 too, every fp32 Linear of a compiled
    CPU step (the tied head too) becomes a `RowSplitLinear` whose compiled code calls the op, and the step's logits
    stay within fp32 rounding of the eager step's; otherwise (1 thread, no AVX-512) the step keeps `F.linear` (one
    GEMV: nothing to split between)."""
    from torch._inductor.utils import run_and_get_code

    from litllm.compile_decode import cpu_compile_options, steps_folder, unpack_weights

    split = threads > 1 or row_split_kernel() == "avx512"
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    model.set_kv_cache(1, 32)
    step = lambda: model.decode(torch.tensor([[3]]), input_pos=torch.tensor([[0]]))  # noqa: E731
    with torch.no_grad():
        expected = step()
        folder = steps_folder(model)
        unpack_weights(model)  # as a compiled step does
        assert steps_folder(model) == folder  # the saved step's key, before and after
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all((type(m) is RowSplitLinear) == split for m in linears)
        got, code = run_and_get_code(torch.compile(step, dynamic=False, options=cpu_compile_options(model)))
    assert ("row_split_linear" in "".join(code)) == split
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_compiled_batched_fp32_step_multiplies_its_rows_by_the_row_split_op(op):
    """A compiled step of 3 KV-cache rows at their own positions (a batched server's) multiplies every fp32 Linear's
    3 rows by the op where its kernel takes several (no aten `mm` left in the code: before, `mm` multiplied them), and
    its logits stay within fp32 rounding of the eager step's, the same greedy tokens."""
    from torch._inductor.utils import run_and_get_code

    from litllm.compile_decode import cpu_compile_options, unpack_weights

    if row_split_kernel() != "avx512":
        pytest.skip("no AVX-512 here: several rows go to F.linear")
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    model.set_kv_cache(3, 32)
    tokens, positions = torch.tensor([[3], [7], [11]]), torch.tensor([[0], [4], [9]])
    step = lambda: model.decode(tokens, input_pos=positions)  # noqa: E731
    with torch.no_grad():
        expected = step()
        unpack_weights(model)
        got, code = run_and_get_code(torch.compile(step, dynamic=False, options=cpu_compile_options(model)))
    assert "row_split_linear" in "".join(code) and "extern_kernels.mm(" not in "".join(code)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_compiled_fp32_engine_decodes_the_eager_greedy_tokens_and_saves_its_kernel(op, monkeypatch, tmp_path):
    """The compiled 1-thread fp32 engine (the op's AVX-512 kernel where the CPU has it) decodes the eager engine's
    greedy tokens from the same prompt; a step whose op runs MKL's GEMV (`LITLLM_ROW_SPLIT=blas`) is saved under
    another key, so neither loads the other's."""
    from litllm.compile_decode import steps_folder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    state = GPT(tiny_config()).state_dict()

    def model():
        fresh = GPT(tiny_config()).eval()
        fresh.load_state_dict(state)
        return fresh

    prompt = list(range(1, 9))
    eager = greedy_tokens(Engine(model(), None, 1, 32, threads=1), prompt)
    compiled = Engine(model(), None, 1, 32, threads=1, compile=True)
    assert compiled.step_source == "compiled"
    assert greedy_tokens(compiled, prompt) == eager
    folder = steps_folder(model())
    monkeypatch.setenv("LITLLM_ROW_SPLIT", "blas")
    assert steps_folder(model()) != folder


def test_row_split_can_be_turned_off(monkeypatch):
    """`LITLLM_ROW_SPLIT=0` keeps compiled fp32 steps on `F.linear` whatever the thread count (an A/B switch)."""
    from litllm.compile_decode import unpack_weights

    monkeypatch.setenv("LITLLM_ROW_SPLIT", "0")
    torch.set_num_threads(2)
    model = GPT(tiny_config()).eval()
    unpack_weights(model)
    assert not any(isinstance(m, RowSplitLinear) for m in model.modules())


def test_row_split_linear_runs_under_inference_mode_on_every_thread(op):
    """The engine decodes under `torch.inference_mode()`: the op's worker threads write the inference tensor it
    returns (they failed when they did not take the caller's thread-local state)."""
    torch.set_num_threads(2)
    w, row = torch.randn(512, 64), torch.randn(1, 64)
    with torch.inference_mode():
        got = op(row, w)
    assert (got - F.linear(row, w)).abs().max() <= 1e-5 * got.abs().max()


def test_a_row_split_linear_trains_as_a_linear(op):
    """The op has no backward: with gradients recorded (a forward through a decode layout's module, say) one row goes
    through `F.linear`, and the gradients are the plain Linear's."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 48)
    split = RowSplitLinear(32, 48, device="meta")
    split.weight = torch.nn.Parameter(plain.weight.detach().clone())
    split.bias = torch.nn.Parameter(plain.bias.detach().clone())
    row = torch.randn(1, 1, 32)
    plain(row).square().sum().backward()
    split(row).square().sum().backward()
    torch.testing.assert_close(split.weight.grad, plain.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(split.bias.grad, plain.bias.grad, rtol=0, atol=0)


@pytest.fixture(scope="module")
def int8_op():
    from litllm.cpu_ops import int8_rows_op

    found = int8_rows_op()
    if found is None:
        pytest.skip("no AVX-512 VNNI here (or the op does not build): int8 steps keep inductor's reduction")
    return found


def test_int8_rows_op_equals_its_plain_torch_arithmetic(int8_op, threads):
    """`litllm_cpu::int8_rows_linear` (AVX-512 VNNI): activations rounded per block as llama.cpp's q8_0 rounds them
    (`litllm.quantize._block_quantized`) times row-major int8 weights (-128 included: vpdpbusd takes |w| unsigned) and
    a scale per row, within fp32 rounding of that arithmetic in float64, for widths with a ragged 64-byte tail, output
    widths no multiple of 4 (rows 4 at a time, then one) and several input rows (each its own blocks), on 1 and 2
    threads."""
    from litllm.quantize import _block_quantized

    torch.manual_seed(0)
    for n_out, n_in, block in ((200, 768, 32), (37, 100, 4), (64, 2048, 32), (50, 36, 4), (33, 96, 32), (3, 64, 32)):
        w = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8)
        w[0] = -128
        scales, x = torch.rand(n_out), torch.randn(3, n_in) * torch.linspace(0.05, 3, n_in)
        x[0, :block or 8] = 0  # an all-zero block stays zero
        words = w.view(torch.int32).view(torch.float32)  # the layers' fp32-typed carrier, 4 weights a word
        rounded = _block_quantized(x, block)
        expected = (rounded.double() @ w.double().t()) * scales.double()
        got = int8_op(x, words, scales, block)
        assert got.shape == (3, n_out)
        assert float((got.double() - expected).norm() / expected.norm()) < 1e-6
        unrounded = (x.double() @ w.double().t()) * scales.double()  # the rounding is checked: it changes the product
        assert float((unrounded - expected).norm() / expected.norm()) > 1e-4
    with pytest.raises(RuntimeError, match="int8_rows_linear"):
        int8_op(torch.randn(1, 96), torch.zeros(8, 24), torch.ones(8), 6)  # a block no multiple of 4
    with pytest.raises(RuntimeError, match="int8_rows_linear"):
        int8_op(torch.randn(1, 96), torch.zeros(8, 24), torch.ones(8), 0)  # no block: not int8 activations


def test_int8_prompt_op_equals_its_plain_torch_arithmetic(int8_op, threads):
    """`litllm_cpu::int8_prompt_linear` (the int8 layers' eager prefill on AVX-512 VNNI CPUs): many rows times row-major
    int8 weights (-128 included) and a scale per row, int8dq's rows rounded per block as q8_0 rounds them (`block`),
    int8wo's unrounded (block 0), within fp32 rounding of that arithmetic in float64: from the int8 weights or their
    fp32-typed words, for widths with a ragged 64-byte (and 16-value) tail, output widths no multiple of 4 (weight rows
    4 at a time, then one) or of the packed groups (32 weight rows, 16 a vector: from 8 rows on, int8wo's from 16),
    more groups than the threads' chunks, row counts that leave tiles (4 and 6 rows; packed: 6, 3, 1 and 12, 4, 1) and
    passes (64 rows) ragged, on 1 and 2 threads; an int8 width no multiple of 4 (no words) takes the unpacked tiles at
    any row count."""
    from litllm.quantize import _block_quantized
    from litllm.cpu_ops import int8_prompt_op

    prompt_op = int8_prompt_op()
    assert prompt_op is not None  # the same library as the decode op's, loaded by the fixture
    torch.manual_seed(0)
    for n_out, n_in, block in ((200, 768, 32), (37, 100, 4), (50, 36, 4), (33, 96, 32), (3, 64, 32),
                               (293, 64, 32), (16, 64, 32), (48, 160, 16), (5, 99, 0)):
        w = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8)
        w[0] = -128
        scales = torch.rand(n_out)
        for n_rows in (1, 5, 7, 8, 10, 13, 17, 70):
            x = torch.randn(n_rows, n_in) * torch.linspace(0.05, 3, n_in)
            x[0, :block] = 0  # an all-zero block stays zero
            for rounded_block in dict.fromkeys((block, 0)):
                rows = _block_quantized(x, rounded_block) if rounded_block else x
                expected = (rows.double() @ w.double().t()) * scales.double()
                for weights in (w, w.view(torch.int32).view(torch.float32)) if n_in % 4 == 0 else (w,):
                    got = prompt_op(x, weights, scales, rounded_block)
                    assert got.shape == (n_rows, n_out)
                    assert float((got.double() - expected).norm() / expected.norm()) < 1e-6
    with pytest.raises(RuntimeError, match="int8_prompt_linear"):
        prompt_op(torch.randn(2, 96), torch.zeros(8, 96, dtype=torch.int8), torch.ones(8), 6)  # no multiple of 4
    with pytest.raises(RuntimeError, match="int8_prompt_linear"):
        prompt_op(torch.randn(2, 96), torch.zeros(8, 95, dtype=torch.int8), torch.ones(8), 0)  # widths differ
    with pytest.raises(RuntimeError, match="int8_prompt_linear"):
        prompt_op(torch.randn(2, 96), torch.zeros(8, 96, dtype=torch.int16), torch.ones(8), 0)  # not int8 weights


@pytest.mark.parametrize("mode", ["torchao.int8dq", "torchao.int8wo"])
def test_an_int8_step_is_saved_under_its_kernel(mode, int8_op, tiny_checkpoint, monkeypatch):
    """A step whose int8 layers call litllm's op (int8dq's VNNI one, int8wo's) reads `words` row-major (on AVX-512
    VNNI packed 16 output rows a vector, `litllm.quantize.pack_int8_rows`; row-major with `LITLLM_INT8_PACKED=0`), one
    over inductor's reduction reads them interleaved (`litllm.quantize._int8_words`): they are saved under different
    keys, so none loads another's."""
    pytest.importorskip("torchao")
    from litllm.compile_decode import steps_folder
    from litllm.quantize import quantize_model

    from litllm.cpu_ops import int8_packed_rows_wanted

    model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    folder = steps_folder(model)
    if int8_packed_rows_wanted():  # the packed-rows op's words, (out / 16, in / 4, 16), and the row-major op's
        with monkeypatch.context() as env:
            env.setenv("LITLLM_INT8_PACKED", "0")
            assert steps_folder(model) != folder
    monkeypatch.setenv("LITLLM_INT8_ROWS", "0")
    assert steps_folder(model) != folder


def int8wo_activations(n_rows: int, n_in: int) -> dict[str, torch.Tensor]:
    """(n_rows, n_in) activation rows of the kinds an int8wo layer sees, by name: a ramp of scales across the
    features; outlier features (every 37th, 50x, as LLM.int8()'s); one massive feature (3000, as some models' first
    layers have); an all-zero row among ordinary ones; denormal values (the VNNI kernel's scale 2^e far above fp32's
    largest power of two)."""
    x = torch.randn(n_rows, n_in) * torch.linspace(0.05, 3, n_in)
    outliers, massive, zero = x.clone(), x.clone(), x.clone()
    outliers[:, ::37] *= 50
    massive[:, n_in // 2] = 3000.0
    zero[n_rows // 2] = 0
    return {"ramp": x, "outliers": outliers, "massive": massive, "zero row": zero, "denormal": x * 1e-39}


def test_int8wo_rows_op_equals_its_plain_torch_arithmetic(threads):
    """`litllm_cpu::int8wo_rows_linear` (AVX-512) and its fp32 kernel alone (`int8wo_rows_linear_fma`, what it runs
    without VNNI): unrounded fp32 activations times row-major int8 weights (-128 and 127 included) and a scale per row,
    within fp32 rounding of the exact product (float64), for widths with a ragged 64-weight (and 16-weight) tail,
    output widths no multiple of 4 (rows 4 at a time, then one), several input rows, activations with outliers, a
    massive feature, a zero row and denormals (`int8wo_activations`), on 1 and 2 threads. On VNNI CPUs the op's error
    per output is at most the rounding of its fp32 result plus the activations' as 31-bit integers (2^-30 of the row's
    absmax each: `int8wo_digits`), far inside the fp32 kernel's. A non-finite activation gives the fp32 kernel's
    output (NaN where it has NaN); a width no multiple of 4 is refused."""
    from litllm.cpu_ops import has_avx512_vnni, int8wo_rows_op

    op = int8wo_rows_op()
    if op is None:
        pytest.skip("no AVX-512 here (or the op does not build): int8wo steps keep inductor's reduction")
    fma = torch.ops.litllm_cpu.int8wo_rows_linear_fma
    torch.manual_seed(0)
    for n_out, n_in in ((200, 768), (37, 100), (64, 2048), (50, 36), (3, 4), (1000, 772), (9, 5640)):
        w = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8)
        w[0], w[-1] = -128, 127
        scales, words = torch.rand(n_out), w.view(torch.int32).view(torch.float32)  # the layers' carrier
        for n_rows in (1, 3):
            for kind, x in int8wo_activations(n_rows, n_in).items():
                expected = (x.double() @ w.double().t()) * scales.double()
                for kernel in (op, fma):
                    got = kernel(x, words, scales)
                    assert got.shape == (n_rows, n_out)
                    error = (got.double() - expected).norm() / expected.norm().clamp_min(1e-300)
                    assert float(error) < 1e-6, (kernel, n_out, n_in, kind)
                if has_avx512_vnni():  # each output: its fp32 rounding (denormal too), 2^-30 absmax per x
                    bound = (2.0**-23 * expected.abs() + 2.0**-149 + 2.0**-30
                             * x.double().abs().amax(-1, keepdim=True) * w.double().abs().sum(-1) * scales.double())
                    assert ((op(x, words, scales).double() - expected).abs() <= bound).all(), (n_out, n_in, kind)
    x = torch.randn(3, 100)
    x[0, 7], x[1, 50] = float("nan"), float("inf")
    w = torch.randint(-128, 128, (37, 100), dtype=torch.int8).view(torch.int32).view(torch.float32)
    scales = torch.rand(37)
    got = op(x, w, scales)  # NaN and inf rows: the fp32 kernel's sums, which carry them
    torch.testing.assert_close(got, fma(x, w, scales), rtol=0, atol=0, equal_nan=True)
    assert got[0].isnan().all() and not got[1].isfinite().any() and got[2].isfinite().all()
    for kernel in (op, fma):
        with pytest.raises(RuntimeError, match="int8wo_rows_linear"):
            kernel(torch.randn(1, 98), torch.zeros(8, 24), torch.ones(8))  # 98 activations for 96 weights a row


def test_int8_packed_rows_op_equals_the_row_major_ops(int8_op, threads):
    """`litllm_cpu::int8_packed_rows_linear` (the int8 compiled steps' op on AVX-512 VNNI CPUs) on the weights laid out
    16 output rows a vector (`litllm.quantize.pack_int8_rows`, which `unpack_int8_rows` undoes): int8dq (`block`)
    within fp32 rounding of its arithmetic in float64 (activations rounded per block as q8_0's), int8wo (block 0) bit
    for bit the row-major op's (`int8wo_rows_linear`: the same exact integer sums), for output widths no multiple of
    16 or of the 4 groups in flight, inputs no multiple of 64, several input rows, the int8wo activation kinds
    (`int8wo_activations`), on 1 and 2 threads; a row with NaN or inf gives an fp32 product's NaN and inf; the prompt
    op takes the packed weights as they are (int8dq's prefill) with the same result; bad shapes are refused."""
    from litllm.cpu_ops import int8_packed_rows_wanted, int8wo_rows_op
    from litllm.quantize import _block_quantized, pack_int8_rows, unpack_int8_rows

    if not int8_packed_rows_wanted():
        pytest.skip("no AVX-512 VNNI and DQ here")
    op, wo, prompt = (torch.ops.litllm_cpu.int8_packed_rows_linear, int8wo_rows_op(),
                      torch.ops.litllm_cpu.int8_prompt_linear)
    torch.manual_seed(0)
    for n_out, n_in, block in ((200, 768, 32), (37, 100, 4), (64, 2048, 32), (50, 36, 4), (3, 64, 32),
                               (1000, 772, 4), (9, 5640, 8)):
        w = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8)
        w[0], w[-1] = -128, 127
        scales, packed = torch.rand(n_out), pack_int8_rows(w)
        assert packed.shape == ((n_out + 15) // 16, n_in // 4, 16)
        assert torch.equal(unpack_int8_rows(packed, 1, n_out), w[1:])
        for kind, x in int8wo_activations(3, n_in).items():
            x[0, :block] = 0  # an all-zero block stays zero
            words = w.view(torch.int32).view(torch.float32)
            assert torch.equal(op(x, packed, scales, 0), wo(x, words, scales)), (n_out, n_in, kind)
            if kind == "denormal":  # int8dq: q8_0's scale 1 / d overflows (the reference's too: NaN)
                continue
            expected = (_block_quantized(x, block).double() @ w.double().t()) * scales.double()
            got = op(x, packed, scales, block)
            assert got.shape == (3, n_out)
            assert float((got.double() - expected).norm() / expected.norm()) < 1e-6, (n_out, n_in, kind)
            if kind == "ramp":
                from_prompt = prompt(x, packed, scales, block)
                assert float((from_prompt.double() - expected).norm() / expected.norm()) < 1e-6
    x = torch.randn(3, 100)
    x[0, 7], x[1, 50] = float("nan"), float("inf")
    w = torch.randint(-128, 128, (37, 100), dtype=torch.int8)
    got = op(x, pack_int8_rows(w), torch.rand(37), 0)
    assert got[0].isnan().all() and not got[1].isfinite().any() and got[2].isfinite().all()
    packed = pack_int8_rows(torch.zeros(20, 96, dtype=torch.int8))
    for bad in ((torch.randn(1, 96), packed, torch.ones(33), 32),  # 33 outputs for 2 groups of 16
                (torch.randn(1, 100), packed, torch.ones(20), 4),  # 100 activations for 96 weights a row
                (torch.randn(1, 96), packed, torch.ones(20), 6),  # a block no multiple of 4
                (torch.randn(1, 96), packed[:, :, :8].contiguous(), torch.ones(20), 32)):  # not 16 rows a group
        with pytest.raises(RuntimeError, match="int8_packed_rows_linear"):
            op(*bad)


def test_int8wo_packed_rows_amx_equals_vnni(int8_op, threads, monkeypatch):
    """On CPUs with AMX-INT8, int8wo's packed-rows op (block 0) sums through AMX tiles (up to 4 activation rows' digits
    a tile; from 2 rows, and from one with `LITLLM_INT8_AMX=1`) and its VNNI kernel (`LITLLM_INT8_AMX=0`) through
    vpdpbusd: the same int32 sums, so the outputs are bit for bit equal, for inputs no multiple of 64 (the tail past
    the tiles) and fewer than 64 (no tile at all), outputs no multiple of 16 or of the 3 groups in flight, the 134M
    Llama's head (32000 x 768), 1 to 9 rows (more than one tile of 4), a row with NaN among them (the fp32 kernel's
    output for it), on 1 and 2 threads; the default (2 rows up) is one of the two."""
    from litllm.cpu_ops import INT8_AMX_ENV, int8_packed_rows_wanted
    from litllm.quantize import pack_int8_rows
    from litllm.utils import cpu_flags

    if not int8_packed_rows_wanted() or not {"amx_tile", "amx_int8"} <= cpu_flags():
        pytest.skip("no AMX-INT8 here: int8wo's packed rows run the VNNI kernel only")
    op = torch.ops.litllm_cpu.int8_packed_rows_linear
    torch.manual_seed(0)
    for n_out, n_in in ((200, 768), (37, 100), (50, 36), (33, 196), (1000, 772), (9, 5640), (32000, 768)):
        w = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8)
        w[0], w[-1] = -128, 127
        packed, scales = pack_int8_rows(w), torch.rand(n_out)
        for n_rows in (1, 2, 5, 9):
            for kind, x in int8wo_activations(n_rows, n_in).items():
                if n_rows == 5 and kind == "ramp":
                    x[3, n_in // 3] = float("nan")
                monkeypatch.setenv(INT8_AMX_ENV, "0")
                vnni = op(x, packed, scales, 0)
                monkeypatch.setenv(INT8_AMX_ENV, "1")
                amx = op(x, packed, scales, 0)
                torch.testing.assert_close(amx, vnni, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{n_out} x {n_in}, {n_rows} rows, {kind}")
                monkeypatch.delenv(INT8_AMX_ENV)
                torch.testing.assert_close(op(x, packed, scales, 0), vnni, rtol=0, atol=0, equal_nan=True)
                if n_out > 1000:  # the head: one row kind is enough (the others cost ~1 s)
                    break
