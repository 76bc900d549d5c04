"""bitsandbytes quantization: which layers are swapped, how close the results stay, and clear errors.

Tolerances follow from the formats. 4-bit (nf4/fp4) stores each weight as one of 16 levels scaled
by the absmax of its block of 64, so a weight moves by at most half the widest gap between adjacent
levels times that absmax (NF4's widest gap is 0.304, between -1 and -0.696; FP4's 0.333, between
0.667 and 1: `_MAX_HALF_GAP`, checked against bitsandbytes' code books); LLM.int8() rounds each
weight to 1/127 of its row's absmax (error <= absmax/254). nf4-dq also stores each block's absmax in
8 bits, which moves the scale by well under 1%: its bound gets 0.01 more.
The 4-bit forward is a matmul with exactly the dequantized weights, so it must match an fp32 model
holding those weights to float precision. End to end on the tiny model, logits move by ~13-15%
(nf4), ~20% (fp4) and ~1% (int8) relative L2: the loose bounds below leave ~1.5-3x headroom.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.model import GPT
from litllm.quantize import (
    INT4_GROUP_SIZES, QUANT_BUILDERS, Int8PackedLinear, check_quantize_mode, is_quantized, quantize_linear,
    quantize_model,
)

MODES = ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8"]
# largest |w - dequant(w)| / absmax(block): half the widest gap between adjacent code values
_MAX_HALF_GAP = {"nf4": 0.3038 / 2, "fp4": 0.3334 / 2, "int8": 1 / 254}
LOGIT_REL_ERROR = {"bnb.nf4": 0.25, "bnb.nf4-dq": 0.25, "bnb.fp4": 0.35, "bnb.int8": 0.03}


def _dequantized(layer) -> torch.Tensor:
    import bitsandbytes.functional as F

    w = layer.weight
    if type(w).__name__ == "Params4bit":
        return F.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float() * w.SCB.float()[:, None] / 127  # Int8Params: int8 rows and their absmax


def _max_block_error(original: torch.Tensor, restored: torch.Tensor, block: int) -> float:
    """max |w - w'| / absmax over blocks of `block` consecutive weights (row-major)."""
    err = (original - restored).abs().reshape(-1, block).amax(-1)
    scale = original.abs().reshape(-1, block).amax(-1).clamp(min=1e-12)
    return float((err / scale).max())


@pytest.mark.parametrize("mode", MODES)
def test_quantized_model(tiny_checkpoint, mode):
    ref = GPT.from_checkpoint(tiny_checkpoint).eval()
    originals = {n: m.weight.detach().clone() for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    four_bit = mode != "bnb.int8"
    if four_bit:  # the tiny model's MLP width (112) is no multiple of 64: bitsandbytes' CPU kernel can't
        with pytest.warns(UserWarning, match="stay unquantized"):
            model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    else:
        model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")

    # every Linear but the head is quantized (on CPU 4-bit: but those the kernel mishandles);
    # the head stays as it was
    for name, module in model.named_modules():
        if name in originals:
            skipped = four_bit and originals[name].shape[1] % 64 != 0
            assert is_quantized(module) == (name != "lm_head" and not skipped), name
    assert type(model.lm_head) is nn.Linear
    assert sum(is_quantized(m) for m in model.modules()) >= 3 * len(model.blocks)

    kind = "int8" if mode == "bnb.int8" else mode.split(".")[1].split("-")[0]
    block = 64 if kind != "int8" else None
    dequant = {}
    for name, original in originals.items():
        if not is_quantized(model.get_submodule(name)):
            continue
        restored = _dequantized(model.get_submodule(name))
        dequant[name] = restored
        per = block or original.shape[1]  # int8: one scale per row
        bound = _MAX_HALF_GAP[kind] + (0.01 if mode.endswith("-dq") else 1e-3)
        assert _max_block_error(original, restored, per) <= bound, name

    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = model(idx), ref(idx)
    rel = float((out - expected).norm() / expected.norm())
    assert rel < LOGIT_REL_ERROR[mode]
    assert torch.isfinite(out).all()

    if kind != "int8":  # 4-bit forward == fp32 forward with the dequantized weights
        with torch.no_grad():
            for name, w in dequant.items():
                ref.get_submodule(name).weight.copy_(w)
            torch.testing.assert_close(out, ref(idx), rtol=1e-4, atol=1e-4)


def test_code_values_match_the_error_bounds():
    """The bounds above are half the widest gap of bitsandbytes' own code books."""
    import bitsandbytes.functional as F

    for kind in ("nf4", "fp4"):
        values = torch.unique(F.get_4bit_type(kind, device="cpu"))
        assert values.abs().max() == 1.0
        assert abs(float(values.diff().max()) / 2 - _MAX_HALF_GAP[kind]) < 1e-3, kind


def test_cpu_4bit_layers_the_kernel_mishandles():
    """bitsandbytes 0.50's CPU 4-bit dequantization gets in_features % 64 != 0 wrong: refuse, don't compute garbage."""
    with pytest.raises(LitLLMError, match="in_features=112"):
        quantize_linear(nn.Linear(112, 64), "bnb.nf4", "cpu")
    quantize_linear(nn.Linear(112, 64), "bnb.int8", "cpu")  # int8 is fine


def test_frozen_only_and_single_layer():
    torch.manual_seed(0)

    class LoRALinear(nn.Module):  # the shape a LoRA wrapper has: a frozen base + trainable A, B
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(64, 64)
            self.base.weight.requires_grad_(False)
            self.lora_A = nn.Linear(64, 4, bias=False)
            self.lora_B = nn.Linear(4, 64, bias=False)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x))

    model = nn.Sequential(LoRALinear(), nn.ReLU(), LoRALinear())
    quantize_model(model, "bnb.nf4", "cpu", frozen_only=True)
    assert is_quantized(model[0].base) and is_quantized(model[2].base)
    assert type(model[0].lora_A) is nn.Linear and not is_quantized(model[0].lora_B)
    x = torch.randn(3, 64)
    model(x).sum().backward()
    assert model[0].lora_A.weight.grad is not None and model[2].lora_B.weight.grad is not None

    linear = nn.Linear(128, 32)
    q = quantize_linear(linear, "bnb.int8", "cpu")
    x = torch.randn(5, 128)
    with torch.no_grad():
        rel = float((q(x) - linear(x)).norm() / linear(x).norm())
    assert rel < 0.03
    assert not q.weight.requires_grad


def test_generate_quantized(tiny_checkpoint, capsys):
    from litllm import LLM
    from litllm.generate import generate

    with pytest.warns(UserWarning, match="stay unquantized"):  # the tiny model's 112-wide MLP on CPU
        generate(tiny_checkpoint, "Hello", max_new_tokens=6, temperature=0.0, quantize="bnb.nf4", device="cpu")
    assert capsys.readouterr().out.strip()
    llm = LLM.load(tiny_checkpoint, device="cpu", quantize="bnb.int8", prompt_style="default")
    assert isinstance(llm.generate("Hello", max_new_tokens=6), str)
    llm = LLM.load(tiny_checkpoint, device="cpu", quantize="torchao.int8dq", prompt_style="default")
    assert is_quantized(llm.model.lm_head) and isinstance(llm.generate("Hello", max_new_tokens=6), str)
    assert is_quantized(llm.model.blocks[0].attn.qkv)


def test_errors(monkeypatch):
    with pytest.raises(LitLLMError, match="unknown mode 'bnb.int2'"):
        check_quantize_mode("bnb.int2", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LitLLMError, match="CUDA is not available"):
            check_quantize_mode("bnb.nf4", "cuda")

    def unsupported(linear, device, dtype):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setitem(QUANT_BUILDERS, "bnb.test-only", unsupported)
    with pytest.raises(LitLLMError, match="can't run on cpu with this bitsandbytes: NotImplementedError: no kernel"):
        check_quantize_mode("bnb.test-only", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_quantized_on_gpu(tiny_checkpoint, mode):
    ref = GPT.from_checkpoint(tiny_checkpoint, device="cuda").eval()
    model = GPT.from_checkpoint(tiny_checkpoint, device="cpu")
    model = quantize_model(model, mode, "cuda").to("cuda").eval()
    assert is_quantized(model.blocks[0].mlp.fc) and model.blocks[0].mlp.fc.weight.device.type == "cuda"
    idx = torch.randint(0, 300, (2, 16), device="cuda")
    with torch.no_grad():
        out, expected = model(idx), ref(idx)
    assert float((out - expected).norm() / expected.norm()) < LOGIT_REL_ERROR[mode]
    from litllm.engine import generate_ids

    assert len(generate_ids(model, idx[0].tolist(), 8)) == 8


# ---------------------------------------------------------------------- torchao weight-only int8 / int4
# torchao.int8wo rounds each weight to its row's absmax / 127 (symmetric): |w - w'| <= absmax_row / 254.
# torchao.int4wo (tinygemm's asymmetric uint4) maps each group of `g` input weights onto 16 levels
# spanning [min, max]: |w - w'| <= (max - min) / 30 per group. Both bounds get 1e-3 relative slack for
# float rounding of the scales. End to end on the tiny random model the logits move by ~1% (int8) and
# ~12% (int4) relative L2; the bounds below leave ~3x / ~2x headroom. A random model's top-2 logit gap is
# small next to that noise (its distributions are nearly flat), so greedy agreement is checked per
# position on a long teacher-forced prompt (int8: >= 95%, measured ~98%; int4: >= 70%, measured ~80%),
# and int8's free-running greedy continuation must match for its first 32 tokens (measured 64).
# torchao.int8dq (W8A8 dynamic) has int8wo's weights and also rounds each activation row to 7 bits (fbgemm's
# reduce_range), the head's included: ~2% relative L2 on the logits (3% with 7-bit activations, fbgemm's
# reduce_range on CPUs without VNNI), ~94% greedy agreement (93%). Its free-running continuation leaves the fp32
# one after a few tokens on this near-flat random model (with the head in fp32 too: the activations' rounding), so
# for it the head's own effect is checked: argmaxes as with the head in fp32 (measured 98%), and the same first 32
# greedy tokens (measured 32).
# torchao.int4wo's free-running continuation leaves fp32's after 0-32 tokens (median 5, 20 prompts of 96 tokens),
# too spread for a bound, so its 32 greedy tokens through the engine (KV cache, one-row int4 decode steps) are
# checked per step: each equals int4's own uncached argmax (measured 32 of 32 on all 20 prompts), and fp32's argmax
# on the same prefix agrees at >= 70% of the steps (measured 72-100%, mean 90%; this test's prompt 91%).
TORCHAO_LOGIT_REL_ERROR = {"torchao.int8wo": 0.03, "torchao.int4wo": 0.25, "torchao.int8dq": 0.05}
TORCHAO_ARGMAX_AGREEMENT = {"torchao.int8wo": 0.95, "torchao.int4wo": 0.70, "torchao.int8dq": 0.90}


def _effective_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a Linear's kernel really multiplies by: its output on the identity, bias removed."""
    with torch.no_grad():
        eye = torch.eye(layer.in_features)
        out = layer(eye) - (layer.bias if layer.bias is not None else 0)
    return out.t().float()


def _max_group_error(original: torch.Tensor, restored: torch.Tensor, group: int, symmetric: bool) -> float:
    """max over groups of `group` consecutive inputs of |w - w'| / (that group's quantization step * levels)."""
    err = (original - restored).abs().reshape(original.size(0), -1, group).amax(-1)
    w = original.reshape(original.size(0), -1, group)
    spread = w.abs().amax(-1) / 254 if symmetric else (w.amax(-1) - w.amin(-1)) / 30
    return float((err / spread.clamp(min=1e-12)).max())


@pytest.mark.parametrize("mode", ["torchao.int8wo", "torchao.int4wo", "torchao.int8dq"])
def test_torchao_weight_only(tiny_checkpoint, mode):
    pytest.importorskip("torchao")
    from litllm.engine import generate_ids
    from litllm.quantize import INT4_GROUP_SIZES, Int8DynamicLinear, _reduce_range

    ref = GPT.from_checkpoint(tiny_checkpoint).eval()
    originals = {n: m.weight.detach().clone() for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    from litllm.cpu_ops import int8wo_rows_op

    int4, dynamic = mode == "torchao.int4wo", mode == "torchao.int8dq"
    # int8wo's head (int4wo's too: `HEAD_MODES`) is int8 where its AVX-512 op runs (fp32 logits fast eagerly too), fp32
    # elsewhere
    head_kept = mode != "torchao.int8dq" and int8wo_rows_op() is None
    if int4:  # the tiny model's MLP projection is 112 wide: no multiple of 32
        with pytest.warns(UserWarning, match="blocks.0.mlp.proj.*stay unquantized"):
            model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    else:
        model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    for name, original in originals.items():
        layer = model.get_submodule(name)
        skipped = (name == "lm_head" and head_kept) or (int4 and name != "lm_head" and original.shape[1] % 32 != 0)
        assert is_quantized(layer) == (not skipped), name
        # on the CPU int8 runs torch's int8 kernels (Int8PackedLinear, Int8DynamicLinear), any width (the tiny
        # MLP's 112 included); all three quantize the head too, int4wo's to int8wo's
        layer_int4 = int4 and name != "lm_head"
        layer_mode = "torchao.int8wo" if int4 and not layer_int4 else mode
        assert type(layer) is {"torchao.int8wo": Int8PackedLinear, "torchao.int8dq": Int8DynamicLinear}.get(
            layer_mode, nn.Linear) or skipped, name
        if skipped or dynamic:  # int8dq's weights: test_int8_dynamic_matches_torchao
            continue
        group = next(g for g in INT4_GROUP_SIZES if original.shape[1] % g == 0) if layer_int4 else original.shape[1]
        # int8 on the CPU multiplies in bf16 (its kernel's fast path): the bf16 scale and the bf16 output each
        # move the effective weight by at most absmax * 2**-8 (one bf16 step), ~1 unit of absmax/254 each
        bound = 1 + 1e-3 if layer_int4 else 3 + 1e-3
        assert _max_group_error(original, _effective_weight(layer), group, symmetric=not layer_int4) <= bound, name

    prompt = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = model(prompt), ref(prompt)
    assert float((out - expected).norm() / expected.norm()) < TORCHAO_LOGIT_REL_ERROR[mode]
    agreement = float((out.argmax(-1) == expected.argmax(-1)).float().mean())
    assert agreement >= TORCHAO_ARGMAX_AGREEMENT[mode], agreement
    if dynamic:
        fp32_head = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu", skip=("lm_head",))
        with torch.no_grad():
            kept = fp32_head(prompt)
        assert float((out.argmax(-1) == kept.argmax(-1)).float().mean()) >= 0.95
        # with 8-bit activations (VNNI) the int8 head keeps the fp32 head's greedy continuation; 7-bit ones (AVX2
        # CPUs) err twice as much and flip some of the random model's near-ties (the agreement checks above hold)
        if not _reduce_range():
            start = prompt[0, :96].tolist()  # a long prompt: 96 + 32 new tokens fill the tiny model's window
            assert generate_ids(model, start, 32) == generate_ids(fp32_head, start, 32)
    elif not int4:  # int8 (int8wo's head int8 too): the first 32 greedy tokens as in full precision
        start = prompt[0, :96].tolist()  # a long prompt: 96 + 32 new tokens fill the tiny model's window
        assert generate_ids(model, start, 32) == generate_ids(ref, start, 32)
        # eager decode rows get fp32 logits from the int8 head, as the compiled step's (never the kernel's bf16 ones,
        # which tie and flip near-ties): equal to the step's arithmetic up to fp32 summation order
        head, row = model.lm_head, torch.randn(1, model.lm_head.in_features)
        if not head_kept:
            assert type(head) is Int8PackedLinear and head.exact_output
            with torch.no_grad():
                torch.testing.assert_close(head(row), head._eager_step(row), rtol=1e-5, atol=1e-5)


def test_torchao_int4wo_greedy_continuation(tiny_checkpoint):
    """int4wo's greedy continuation of a long prompt, decoded by the engine, stays on the model's own argmax path
    and mostly on fp32's (the thresholds: the comment above TORCHAO_LOGIT_REL_ERROR)."""
    pytest.importorskip("torchao")
    from litllm.engine import generate_ids

    try:  # litllm's CPU int4wo: torchao's prototype config over torch's CPU int4 kernel
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this torchao has no CPU int4 weight-only config: {err}")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)")
    ref = GPT.from_checkpoint(tiny_checkpoint).eval()
    with pytest.warns(UserWarning, match="stay unquantized"):  # the tiny MLP's 112-wide projection
        model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), "torchao.int4wo", "cpu")
    prompt = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(0))
    start = prompt[0, :96].tolist()  # a long prompt: 96 + 32 new tokens fill the tiny model's window
    tokens = generate_ids(model, start, 32)
    with torch.no_grad():  # each position's logits for the next token, teacher-forced on int4's continuation
        sequence = torch.tensor([start + tokens])
        own, fp32 = (m(sequence)[0, len(start) - 1:-1].argmax(-1).tolist() for m in (model, ref))
    assert tokens == own  # the KV-cached one-row steps decode as the uncached prompt path
    agreement = sum(a == b for a, b in zip(tokens, fp32)) / len(tokens)
    assert agreement >= 0.70, agreement


def test_torchao_int4wo_head_is_int8wo_unless_skipped(tiny_checkpoint):
    """int4wo's output head is int8wo's by default (`HEAD_MODES`; fp32 logits, as int8wo's head) and stays unquantized
    with `skip=("lm_head",)`; the int8 head's own error is int8's (measured 0.6% relative L2 on the logits, next to
    int4's 10%), and the argmaxes stay the unquantized head's (measured 97-100% over 6 prompts, fp32 and bf16)."""
    pytest.importorskip("torchao")
    from litllm.cpu_ops import int8wo_rows_op

    if int8wo_rows_op() is None:  # an fp32 model's int8wo head: only where its AVX-512 op runs
        pytest.skip("no AVX-512 int8wo op here: the fp32 model's head stays fp32")
    with pytest.warns(UserWarning, match="stay unquantized"):  # the tiny MLP's 112-wide projection
        model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), "torchao.int4wo", "cpu")
        kept = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), "torchao.int4wo", "cpu", skip=("lm_head",))
    assert type(model.lm_head) is Int8PackedLinear and model.lm_head.exact_output
    assert type(kept.lm_head) is nn.Linear and not is_quantized(kept.lm_head)
    assert all(type(a) is type(b) for (name, a), b in zip(model.named_modules(), kept.modules()) if name != "lm_head")
    prompt = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = model(prompt), kept(prompt)
    assert 1e-3 < float((out - expected).norm() / expected.norm()) < TORCHAO_LOGIT_REL_ERROR["torchao.int8wo"]
    assert float((out.argmax(-1) == expected.argmax(-1)).float().mean()) >= TORCHAO_ARGMAX_AGREEMENT["torchao.int8wo"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_int8_head_decodes_through_the_int8wo_op(dtype, monkeypatch):
    """A 16-bit model's int8 head (bf16 int4wo's, int8wo's) multiplies a decode row by litllm's int8wo op (fp32
    products of the unrounded row, ~2x less CPU than torch's bf16 kernel on the 32000-row head), its logits in the
    model's dtype: the int8 weights' exact product rounded once; other int8 layers keep torch's kernel."""
    pytest.importorskip("torchao")
    import litllm.cpu_ops as cpu_ops

    if cpu_ops.int8wo_rows_op() is None:  # builds the library where it is not there yet
        pytest.skip("no AVX-512 here (or the op does not build)")
    calls, found = [], cpu_ops.int8wo_rows_op
    monkeypatch.setattr(cpu_ops, "int8wo_rows_op",
                        lambda build=True: (lambda *args: calls.append(args[0].dtype) or found(build)(*args)))
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(256, 320).to(dtype), "torchao.int8wo", "cpu")
    row = torch.randn(1, 256, dtype=dtype)
    exact = (row.double() @ (layer.weight.double() * layer.scales.double()[:, None]).t() + layer.bias.double())
    with torch.no_grad():
        layer(row)
        assert calls == []  # not the head: torch's kernel
        layer.exact_output = True
        out = layer(row)
    assert calls == [torch.float32] and out.dtype == dtype
    torch.testing.assert_close(out, exact.to(dtype), rtol=2 ** -7, atol=1e-3)  # one rounding to the model's dtype


def beside_torchao(mode: str, config: str, dtype: torch.dtype):
    """(a Linear, litllm's `mode` layer of it on the CPU, torchao's own layer of it under `config`, an input)."""
    pytest.importorskip("torchao")
    from litllm.quantize import _torchao_quantization

    linear = nn.Linear(112, 64).to(dtype)  # 112: no multiple of 8, 16 or 32
    ours = quantize_linear(linear, mode, "cpu")
    theirs = nn.Linear(112, 64).to(dtype)
    theirs.load_state_dict(linear.state_dict())
    ao = _torchao_quantization()
    ao.quantize_(theirs, getattr(ao, config)(set_inductor_config=False))
    return linear, ours, theirs, torch.randn(2, 5, 112, dtype=dtype)  # (B, T, C): any leading shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cpu_kernel_matches_torchao(dtype):
    """On the CPU torchao.int8wo is torch's `_weight_int8pack_mm` layer; it computes what torchao's own int8 layer does."""
    linear, ours, theirs, x = beside_torchao("torchao.int8wo", "Int8WeightOnlyConfig", dtype)
    assert type(ours) is Int8PackedLinear and ours.weight.dtype == torch.int8
    with torch.no_grad():
        out, expected = ours(x), theirs(x)
    assert out.shape == (2, 5, 64) and out.dtype == dtype
    tol = 2e-2  # same int8 values; ours multiplies in bf16 (fp32 activations rounded), summation order differs
    assert float((out - expected).float().norm() / expected.float().norm()) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dynamic_matches_torchao(dtype):
    """On the CPU torchao.int8dq is torch's fbgemm `quantized::linear_dynamic` on torchao's int8 weights; it computes
    what torchao's own W8A8-dynamic layer does (up to the activations' 7 bits vs its 8), also compiled."""
    from litllm.quantize import Int8DynamicLinear

    linear, ours, theirs, x = beside_torchao("torchao.int8dq", "Int8DynamicActivationInt8WeightConfig", dtype)
    assert type(ours) is Int8DynamicLinear and is_quantized(ours)
    with torch.no_grad():
        out, expected, exact = ours(x), theirs(x), linear(x)
        compiled = torch.compile(ours, fullgraph=True, dynamic=False)(x)  # an opaque op: no graph break
    assert out.shape == (2, 5, 64) and out.dtype == dtype
    rel = lambda a, b: float((a - b).float().norm() / b.float().norm())  # noqa: E731
    # one 7-bit activation step and one int8 weight step per product: ~1.5% of the output's scale
    assert rel(out, expected) < 0.03 and rel(out, exact) < 0.03 and rel(expected, exact) < 0.03
    assert torch.equal(compiled, out)
    import copy

    twin = copy.deepcopy(ours)  # registered under a key of its own (the original's may go away first)
    assert twin.key != ours.key
    with torch.no_grad():
        assert torch.equal(twin(x), out)


def _q8_0_rounded(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """llama.cpp's `quantize_row_q8_0` in torch, dequantized: per block, d = absmax / 127, q = round(x * (1 / d))."""
    xb = x.reshape(x.shape[0], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (torch.round(xb * inv) * d).reshape(x.shape)


@pytest.mark.parametrize("op", [False, "rows", "packed"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["torchao.int8dq", "torchao.int8wo"])
def test_int8_compiled_step_kernel_equals_its_plain_torch_reference(mode, bias, op, monkeypatch):
    """The compiled step multiplies by a plain copy of the int8 weights: with `op` through litllm's C++ op (int8dq on
    AVX-512 VNNI CPUs: `litllm.cpu_ops.int8_rows_op`, int8 dot products; int8wo on AVX-512 ones: `int8wo_rows_op`,
    fp32 products; "packed": on AVX-512 VNNI CPUs both take the packed-rows op, `int8_packed_rows_linear`, on the
    weights 16 output rows a vector, "rows" with `LITLLM_INT8_PACKED=0`), elsewhere (and with `LITLLM_INT8_ROWS=0`) in
    torch ops (`int8_words_linear`, inductor's own int8
    reduction): int8dq rounds the activations as llama.cpp's q8_0 does (int8 per block of 32), int8wo keeps them in
    fp32. Each equals that arithmetic in plain torch on the eager layer's own int8 values up to fp32 summation order,
    and errs less against fp32 than its eager kernel (fbgemm's one activation scale per call, 7 bits without VNNI;
    `_weight_int8pack_mm`'s bf16 activations and output), except int8wo's eager call with the op, which is the op's
    (the step's arithmetic); eager is the same before and after the step's copy is made, which survives model.half()."""
    from torch._inductor.utils import run_and_get_code

    from litllm.cpu_ops import int8_packed_rows_wanted, int8_rows_op, int8wo_rows_op

    dynamic = mode == "torchao.int8dq"
    if not op:
        monkeypatch.setenv("LITLLM_INT8_ROWS", "0")
    elif (int8_rows_op() if dynamic else int8wo_rows_op()) is None:
        pytest.skip("no AVX-512 (VNNI for int8dq) here, or the op does not build")
    elif op == "rows":
        monkeypatch.setenv("LITLLM_INT8_PACKED", "0")
    elif not int8_packed_rows_wanted():
        pytest.skip("no AVX-512 VNNI here: no packed-rows op")
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)  # 96: three blocks of 32
    layer = quantize_linear(linear, mode, "cpu")
    assert layer.words is None  # eager only until a step compiles
    x = torch.randn(3, 96) * torch.linspace(0.05, 3, 96)  # blocks of unlike ranges: one scale per call is coarse
    if mode == "torchao.int8dq":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight, _ = torch.ops.quantized.linear_unpack(layer.packed)
        weight, rounded = qweight.dequantize().float(), _q8_0_rounded(x)
    else:
        weight, rounded = layer.weight.float() * layer.scales.float()[:, None], x
    with torch.no_grad():
        eager = layer(x)
        layer.prepare_compiled()
        assert layer.words.shape == ((3, 24, 16) if op == "packed" else (40, 24))  # 40 rows: 3 groups of 16
        assert "words" not in layer.state_dict() and layer.words_in_rows == bool(op)
        assert torch.equal(layer(x), eager)  # eager: as before the copy
        got, code = run_and_get_code(torch.compile(layer, fullgraph=True, dynamic=False), x)
        exact = linear(x)
    assert ("int8_rows_linear" in "".join(code)) == (op == "rows" and dynamic)
    assert ("int8wo_rows_linear" in "".join(code)) == (op == "rows" and not dynamic)
    assert ("int8_packed_rows_linear" in "".join(code)) == (op == "packed")
    reference = rounded @ weight.t() + (linear.bias.detach() if bias else 0)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(got, reference) < 1e-6
    if op and not dynamic:  # int8wo's eager rows through the row-major op: the step's arithmetic, not the bf16 kernel's
        assert rel(eager, reference) < 1e-6
    else:  # measured: int8dq 0.34-0.43x eager's error; int8wo 0.85x (the int8 weights' own error dominates both)
        assert rel(got, exact) < (0.7 if dynamic else 0.95) * rel(eager, exact)
    assert rel(reference, exact) > 1e-3  # the comparisons can fail: int8 is ~1e-2 off fp32
    layer.half()  # the int8 bits in fp32 words are moved, never converted
    with torch.no_grad():
        assert layer.words.dtype == layer.word_scales.dtype == torch.float32
        half = torch.compile(layer, fullgraph=True, dynamic=False)(x.half()).float()
    assert rel(half, got) < 5e-3  # fp16 inputs and outputs


def spy_quantized_loads(monkeypatch, where: str) -> list[bool]:
    """`load_decoder` as imported at `where`, spied on: the list fills with whether each model it loads is quantized."""
    from litllm.inference import load_decoder

    quantized = []

    def spy(*args, **kwargs):
        loaded = load_decoder(*args, **kwargs)
        quantized.append(is_quantized(loaded.model.blocks[0].attn.qkv))
        return loaded

    monkeypatch.setattr(where, spy)
    return quantized


def test_torchao_through_every_loader(tiny_checkpoint, capsys, monkeypatch):
    """generate and LLM.load take the torchao modes (chat and serve: the next test; evaluate:
    test_evaluate.py's perplexity with torchao.int8wo)."""
    pytest.importorskip("torchao")
    from litllm import LLM
    from litllm.generate import generate

    quantized = spy_quantized_loads(monkeypatch, "litllm.generate.load_decoder")
    generate(tiny_checkpoint, "Hello", max_new_tokens=6, temperature=0.0, quantize="torchao.int8wo", device="cpu")
    assert capsys.readouterr().out.strip() and quantized == [True]
    with pytest.warns(UserWarning, match="stay unquantized"):
        llm = LLM.load(tiny_checkpoint, device="cpu", quantize="torchao.int4wo", prompt_style="default")
    assert is_quantized(llm.model.blocks[0].attn.qkv) and type(llm.model.blocks[0].attn.qkv) is nn.Linear
    assert isinstance(llm.generate("Hello", max_new_tokens=6), str)


def test_serve_and_chat_take_the_torchao_modes(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`chat --quantize torchao.int8wo` decodes with quantized layers; `serve --quantize torchao.int8wo` answers
    greedily what `generate` with it prints, and its prompt logprobs are the int8 model's, not the fp32 one's
    (on this tiny model the greedy text alone can't tell them apart)."""
    pytest.importorskip("torchao")
    pytest.importorskip("openai")
    import io
    import signal
    import sys

    from test_serve import KEY, Server, generate_alone

    from litllm.chat import chat
    from litllm.inference import LoadArgs
    from litllm.tokenizer import Tokenizer

    quantized = spy_quantized_loads(monkeypatch, "litllm.chat.load_decoder")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/exit\n"))
    chat(tiny_checkpoint, temperature=0.0, max_new_tokens=6, quantize="torchao.int8wo", device="cpu")
    assert quantized == [True] and ">> Model: " in capsys.readouterr().out

    prompt = "The quick brown fox jumps over the lazy dog"
    server = Server(tiny_checkpoint, tmp_path / "server.log", "--max_batch_size", "1", "--api_key", KEY,
                    "--compile", "false", "--quantize", "torchao.int8wo")
    try:
        got = server.client().completions.create(model=tiny_checkpoint.name, prompt=prompt, max_tokens=12,
                                                 temperature=0).choices[0].text
        echoed = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 0})
    finally:
        server.stop(signal.SIGTERM)
    assert got == generate_alone(tiny_checkpoint, prompt, 12, quantize="torchao.int8wo")
    served = torch.tensor(echoed.json()["choices"][0]["logprobs"]["token_logprobs"][1:-1])  # after each prompt token
    ids = torch.as_tensor(Tokenizer(tiny_checkpoint).encode(prompt)).view(1, -1)
    errors = {}
    for mode in ("torchao.int8wo", None):
        model, _ = LoadArgs(device="cpu", precision="32-true", quantize=mode).for_decoding(tiny_checkpoint)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)
        errors[mode] = float((logprobs.gather(-1, ids[0, 1:, None])[:, 0] - served).abs().max())
    assert errors["torchao.int8wo"] <= 1e-5 and errors[None] > 5e-4, errors  # measured 0 and 3.9e-3


def test_torchao_errors(monkeypatch):
    pytest.importorskip("torchao")
    with pytest.raises(LitLLMError, match="unknown mode 'torchao.int2wo'; expected one of .*torchao.int8wo, torchao.int4wo"):
        check_quantize_mode("torchao.int2wo", "cpu")
    with pytest.raises(LitLLMError, match="in_features divisible by 32, got 112"):
        quantize_linear(nn.Linear(112, 64), "torchao.int4wo", "cpu")
    quantize_linear(nn.Linear(112, 64), "torchao.int8wo", "cpu")  # int8 takes any width
    if torch.cuda.is_available():
        with pytest.raises(LitLLMError, match="torchao.int4wo on cuda computes in bfloat16 only"):
            check_quantize_mode("torchao.int4wo", "cuda", torch.float32)
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    from litllm import quantize

    quantize._probe.cache_clear()
    with pytest.raises(LitLLMError, match="needs torchao: pip install torchao"):
        check_quantize_mode("torchao.int8wo", "cpu")
    quantize._probe.cache_clear()


@pytest.mark.parametrize("mode", ["torchao.int8wo", "torchao.int4wo", "torchao.int8dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_counts_torchao_bytes(mode, dtype):
    """`litllm estimate`'s formula for a torchao layer == the bytes of the tensors torchao really stores."""
    pytest.importorskip("torchao")
    from litllm.estimate import quantized_linear_bytes
    from litllm.quantize import Int8DynamicLinear

    layer = quantize_linear(nn.Linear(256, 192, bias=False).to(dtype), mode, "cpu")
    if type(layer) is Int8DynamicLinear:  # CPU int8dq: fbgemm's packed copy of int8 values and per-row scales
        qweight = torch.ops.quantized.linear_unpack(layer.packed)[0]
        stored = qweight.int_repr().nbytes + 4 * qweight.q_per_channel_scales().numel()
        assert stored == layer.stored_bytes == quantized_linear_bytes(192, 256, mode, dtype.itemsize)
        return
    if type(layer) is Int8PackedLinear:  # CPU int8: torchao's values without its zero points, bf16/fp16 scales
        stored = layer.weight.nbytes + layer.scales.nbytes
        assert stored == 192 * 256 + 192 * 2 <= quantized_linear_bytes(192, 256, mode, dtype.itemsize)
        return
    if type(layer).__name__ == "Int4RowsLinear":  # bf16 int4wo on AVX512-BF16 CPUs: torchao's values repacked
        assert layer.stored_bytes == quantized_linear_bytes(192, 256, mode, dtype.itemsize)
        return
    weight = layer.weight
    stored = sum(getattr(weight, name).nbytes for name in weight.__tensor_flatten__()[0])
    assert quantized_linear_bytes(192, 256, mode, dtype.itemsize) == stored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["torchao.int8wo", "torchao.int4wo", "torchao.int8dq"])
def test_torchao_on_gpu(tiny_checkpoint, mode):
    pytest.importorskip("torchao")
    ref = GPT.from_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16).eval()
    model = quantize_model(GPT.from_checkpoint(tiny_checkpoint, dtype=torch.bfloat16), mode, "cuda").to("cuda").eval()
    assert is_quantized(model.blocks[0].mlp.proj)
    idx = torch.randint(0, 300, (2, 120), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        out, expected = model(idx).float(), ref(idx).float()
    assert float((out - expected).norm() / expected.norm()) < TORCHAO_LOGIT_REL_ERROR[mode] + 0.02  # + bf16 rounding
    # greedy agreement over a long prompt, as on the CPU (test_torchao_weight_only), less a margin for bf16's rounding
    # of the reference's own near-ties (unmeasured: no GPU where this was written)
    agreement = float((out.argmax(-1) == expected.argmax(-1)).float().mean())
    assert agreement >= TORCHAO_ARGMAX_AGREEMENT[mode] - 0.1, agreement
    from litllm.engine import generate_ids

    assert len(generate_ids(model, idx[0, :16].tolist(), 8)) == 8


class _StepReference(nn.Module):
    """An int8 layer's compiled-step arithmetic in plain torch: int8dq's activations rounded per block as q8_0 does
    (int8wo's unrounded) times the layer's int8 weights and row scales in fp32."""

    def __init__(self, layer: nn.Module, dynamic: bool):
        super().__init__()
        if dynamic:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qweight, bias = torch.ops.quantized.linear_unpack(layer.packed)
            self.weight, self.bias = qweight.dequantize().float(), bias
        else:
            self.weight, self.bias = layer.weight.float() * layer.scales.float()[:, None], layer.bias
        self.block = layer.words_block if dynamic else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        flat = flat if self.block is None else _q8_0_rounded(flat, self.block)
        return (flat @ self.weight.t() + (0 if self.bias is None else self.bias)).reshape(*x.shape[:-1], -1)


def _first_token_logits(model, prompt: list[int]) -> torch.Tensor:
    """(vocab,) the logits an engine samples a prompt's first generated token from (its prefill)."""
    from litllm.engine import Engine

    engine = Engine(model, None, 1, 64)
    engine._set_caches(engine._slot_caches[0])
    with torch.no_grad():
        return engine._prefill_logits(torch.tensor(prompt), 0, len(prompt), False)[-1]


def test_an_eager_int8dq_prefill_asks_no_op_build_and_a_compile_lays_the_words_out_for_it(tiny_checkpoint,
                                                                                           monkeypatch):
    """An eager prefill of int8dq (`step_rounding`) makes the step's words without having the VNNI op's library built
    (a first build takes ~1 min: `int8_rows_op(build=False)`); a compiled step's `prepare_compiled()` then lays the
    words out for the op where it is there, and the eager step computes the same values from either layout."""
    pytest.importorskip("torchao")
    import litllm.cpu_ops as cpu_ops
    from litllm.quantize import Int8DynamicLinear, step_rounding

    asked = []

    def int8_rows_op(build=True):  # the op "is there" only when a build may be waited for
        asked.append(build)
        return object() if build else None

    monkeypatch.setattr(cpu_ops, "int8_rows_op", int8_rows_op)
    model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), "torchao.int8dq", "cpu")
    prompt = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), step_rounding():
        before = model(prompt)
    layers = [m for m in model.modules() if isinstance(m, Int8DynamicLinear) and m.words is not None]
    assert layers and asked and not any(asked)
    assert not any(m.words_in_rows for m in layers)
    for layer in layers:
        layer.prepare_compiled()
    assert all(m.words_in_rows for m in layers)
    asked.clear()
    with torch.no_grad(), step_rounding():
        after = model(prompt)
    assert not asked  # the words are there: kept as laid out
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_op", [False, True])
@pytest.mark.parametrize("mode", ["torchao.int8dq", "torchao.int8wo"])
def test_int8_first_token_is_rounded_as_the_step(tiny_checkpoint, mode, prompt_op, monkeypatch):
    """The engine's prefill (the prompt's KV and the first generated token's logits) has the compiled step's rounding
    (q8_0's blocks for int8dq, none for int8wo), as every later token, not the eager kernels' coarser one (fbgemm's
    7-bit rows; bf16): its logits equal a plain-torch reference of that arithmetic to float precision, and err
    against fp32 less than the kernels did; computed by litllm's multi-row op on AVX-512 VNNI CPUs (`prompt_op`:
    `litllm.cpu_ops.int8_prompt_op`), else (and with `LITLLM_INT8_PROMPT=0`) by an fp32 GEMM on converted weights."""
    pytest.importorskip("torchao")
    import litllm.cpu_ops as cpu_ops
    from litllm.quantize import Int8Words, _reduce_range

    calls = []
    if not prompt_op:
        monkeypatch.setenv(cpu_ops.INT8_PROMPT_ENV, "0")
    elif cpu_ops.int8_rows_op() is None:  # builds the library where it is not there yet
        pytest.skip("no AVX-512 VNNI here (or the op does not build)")
    else:
        found = cpu_ops.int8_prompt_op

        def counted():
            op = found()
            return lambda *args: calls.append(args[0].shape[0]) or op(*args)

        monkeypatch.setattr(cpu_ops, "int8_prompt_op", counted)

    dynamic = mode == "torchao.int8dq"
    ref = GPT.from_checkpoint(tiny_checkpoint).eval()
    model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    reference = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    for name, layer in list(reference.named_modules()):
        if isinstance(layer, Int8Words):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, child, _StepReference(layer, dynamic))
    prompt = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected, exact = reference(torch.tensor([prompt]))[0, -1], ref(torch.tensor([prompt]))[0, -1]
        last = torch.tensor([prompt[-1:]])  # the last token alone: through the eager kernels and as the step does
        with monkeypatch.context() as env:  # torch's kernels (int8wo's eager rows take the step's op where it's built)
            env.setenv("LITLLM_INT8_ROWS", "0")
            kernels = model(last)[0, -1]
        stepped, exact_last = reference(last)[0, -1], ref(last)[0, -1]
    got = _first_token_logits(model, prompt)
    assert (24 in calls) == prompt_op  # the prompt's rows went through the op (or not)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(got, expected) < 1e-5
    assert rel(expected, exact) > 1e-3  # int8 is ~1e-2 off fp32: the comparison can fail
    # q8_0's rounding (at most absmax / 254 per block of activations) on int8 weights: measured 1.5% (int8dq), 0.8%
    assert rel(got, exact) < (0.03 if dynamic else 0.02)
    # the kernels' rounding is coarser: measured int8dq 0.77x (one row: fbgemm's scale is that row's), int8wo 0.91x;
    # except fbgemm's with VNNI (8 bits, not 7: `_reduce_range`), whose one asymmetric scale for the tiny model's row
    # (a block or two of 32 values) is as fine as q8_0's symmetric ones: measured 1.28x on an AVX-512 VNNI EPYC
    factor = (0.85 if _reduce_range() else 1.5) if dynamic else 0.95
    assert rel(stepped, exact_last) < factor * rel(kernels, exact_last)


@pytest.mark.parametrize("mode", ["torchao.int8dq", "torchao.int8wo"])
def test_an_int8_engine_prefilled_by_the_prompt_op_decodes_the_fp32_gemm_ones_tokens(tiny_checkpoint, mode,
                                                                                       monkeypatch):
    """On AVX-512 VNNI CPUs the engine's int8 prefill goes through litllm's multi-row op (`int8_prompt_op`): the same
    arithmetic as the fp32 GEMM on converted weights (`LITLLM_INT8_PROMPT=0`) up to summation order, so the engine
    decodes the same greedy tokens either way (eager and within `step_rounding`, as a compiled step does)."""
    pytest.importorskip("torchao")
    import litllm.cpu_ops as cpu_ops
    from litllm.engine import Engine, Request
    from litllm.quantize import step_rounding

    if cpu_ops.int8_rows_op() is None:  # builds the library where it is not there yet
        pytest.skip("no AVX-512 VNNI here (or the op does not build)")
    calls, found = [], cpu_ops.int8_prompt_op

    def counted():
        op = found()
        return None if op is None else (lambda *args: calls.append(args[0].shape[0]) or op(*args))

    monkeypatch.setattr(cpu_ops, "int8_prompt_op", counted)
    model = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")
    prompt = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(2)).tolist()

    def greedy() -> list[int]:
        engine = Engine(model, None, 1, 64)
        engine.add(Request(prompt, 12))
        tokens = []
        while engine.has_unfinished:
            tokens += [t for out in engine.step() for t in out.token_ids]
        return tokens

    for rounding in (torch.no_grad, step_rounding):
        with rounding():
            monkeypatch.setenv(cpu_ops.INT8_PROMPT_ENV, "0")
            gemm = greedy()
            assert 20 not in calls
            monkeypatch.delenv(cpu_ops.INT8_PROMPT_ENV)
            assert greedy() == gemm and len(gemm) == 12
            assert 20 in calls  # the prompt's rows went through the op
            calls.clear()


# ---------------------------------------------------------------------- litllm's int4 op (bf16 torchao.int4wo, CPU)
@pytest.fixture
def int4_op():
    """Skips where litllm's int4 op does not run (AVX512-BF16, torch's AVX-512 int4 packing, the op's library)."""
    pytest.importorskip("torchao")
    from litllm.cpu_ops import int4_rows_op

    if int4_rows_op() is None:
        pytest.skip("litllm's int4 op does not run here")


def _int4_layers(out_f: int, in_f: int, monkeypatch,
                 bias: bool = False) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(torchao's bf16 int4wo layer, on torch's kernel; litllm's `Int4RowsLinear` of the same weight; that layer's
    weight as torchao's format defines it, float64: `(q - 8) * scale + zero` with q from torchao's own quantization;
    `q * scale`, float64: the part of it that the AVX-512 kernel multiplies by its int16 inputs)."""
    from torchao.quantization.quant_primitives import _quantize_affine_tinygemm

    linear = nn.Linear(in_f, out_f, bias=bias).bfloat16()
    group = next(g for g in INT4_GROUP_SIZES if in_f % g == 0)
    with monkeypatch.context() as m:
        m.setenv("LITLLM_INT4_ROWS", "0")
        theirs = quantize_linear(linear, "torchao.int4wo", "cpu")
    ours = quantize_linear(linear, "torchao.int4wo", "cpu")
    scale, zero = theirs.weight.scale_and_zero.unbind(-1)  # (groups, out) each
    q = _quantize_affine_tinygemm(linear.weight.detach(), [1, group], scale.t(), zero.t(), torch.int32, 0, 15)
    expand = lambda t: t.t().double().repeat_interleave(group, dim=1)  # (out, in)  # noqa: E731
    return theirs, ours, (q.double() - 8) * expand(scale) + expand(zero), q.double() * expand(scale)


def _int4_exact_and_bound(x: torch.Tensor, ours: nn.Module, weight: torch.Tensor,
                          scaled_q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 product of bf16 rows `x` and an int4 layer's weights (`_int4_layers`' third) with its bias, and how
    far a bf16 output may be from it: roundings of the product and of its sum with the bf16 bias, fp32 sums; with
    `scaled_q` (`_int4_layers`' fourth), also the AVX-512 kernel's int16 inputs: each x within 2^-15 of its group's
    largest |x| (litllm/cpu_ops.cpp, `int4_round_x16`), times the weight's `q * scale` it multiplies."""
    product = x.double() @ weight.t()
    exact = product + (0 if ours.bias is None else ours.bias.double())
    bound = 2**-8 * (product.abs() + exact.abs()) + 1e-6 * (x.double().abs() @ weight.abs().t())
    if scaled_q is not None:  # (rows, K): each input's group's largest |x|
        group_max = x.double().abs().unflatten(-1, (-1, ours.group)).amax(-1).repeat_interleave(ours.group, -1)
        bound = bound + 2**-15 * (group_max @ scaled_q.abs().t())
    return exact, bound


@pytest.mark.parametrize("group", INT4_GROUP_SIZES)
def test_int4_rows_op_against_float64_and_torchao(int4_op, group, monkeypatch):
    """litllm's int4 op == the float64 product of torchao's int4 weights (within the bf16 output's rounding), as torch's
    kernel is, on outputs no multiple of its 32-output block, inputs of 1-5 groups and 1-5 rows (a prompt's tiles of 4
    and what is left)."""
    from litllm.quantize import Int4RowsLinear

    g = torch.Generator().manual_seed(group)
    for out_f, groups in ((48, 3), (80, 1), (112, 5)):  # odd counts: no wider group divides the width
        theirs, ours, weight, scaled_q = _int4_layers(out_f, group * groups, monkeypatch, bias=groups == 5)
        assert type(ours) is Int4RowsLinear and ours.group == group
        for rows in (1, 3, 5):
            x = torch.randn(rows, group * groups, generator=g).bfloat16()
            exact, bound = _int4_exact_and_bound(x, ours, weight)
            _, int16_bound = _int4_exact_and_bound(x, ours, weight, scaled_q)
            with torch.no_grad():
                for out, within in ((ours(x), int16_bound), (theirs(x), bound)):
                    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_f)
                    assert ((out.double() - exact).abs() <= within).all(), (out_f, group, rows)
    # the op's shapes for tracing (`litllm.cpu_ops`' fake registration, what a compiled step sees) match the op's
    torch.library.opcheck(torch.ops.litllm_cpu.int4_rows_linear, (x, ours.packed, ours.scale_zero, group, out_f))


@pytest.mark.parametrize("threads", [1, 2])
def test_int4_rows_op_amx_tiles_against_float64(int4_op, threads, monkeypatch):
    """On CPUs with AMX-BF16 the int4 op sums through tiles (up to 16 rows a tile; from 3 rows, from one with
    `LITLLM_INT4_AMX=1`) or through its int16 kernel (`LITLLM_INT4_AMX=0`): both within the float64 bound above (the
    int16 kernel's with its int16 term), on outputs no multiple of the 32-output block, 1-5 groups of each size, 1 to 33
    rows (tiles of 16 and what is left), 1 and 2 threads; the default is the kernel for its row count; a NaN in one row
    leaves the others' outputs."""
    from litllm.cpu_ops import INT4_AMX_ENV
    from litllm.utils import cpu_flags

    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        pytest.skip("no AMX-BF16 here: the int4 op runs its vdpbf16ps kernel only")
    g = torch.Generator().manual_seed(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for group, out_f, groups in ((128, 80, 1), (64, 112, 5), (32, 48, 3)):
            _, ours, weight, scaled_q = _int4_layers(out_f, group * groups, monkeypatch, bias=groups == 5)
            for rows in (1, 2, 5, 16, 17, 33):
                x = torch.randn(rows, group * groups, generator=g).bfloat16()
                exact, bound = _int4_exact_and_bound(x, ours, weight)
                _, int16_bound = _int4_exact_and_bound(x, ours, weight, scaled_q)
                out = {}
                with torch.no_grad():
                    for kernel, value in (("avx512", "0"), ("amx", "1"), ("default", None)):
                        with monkeypatch.context() as m:
                            m.setenv(INT4_AMX_ENV, value) if value else m.delenv(INT4_AMX_ENV, raising=False)
                            out[kernel] = ours(x)
                        within = bound if kernel == "amx" else int16_bound  # the default: the tiles from 3 rows
                        assert ((out[kernel].double() - exact).abs() <= within).all(), (group, out_f, rows, kernel)
                    assert torch.equal(out["default"], out["amx" if rows > 2 else "avx512"])
                    if rows >= 5:
                        x[3, 7] = float("nan")
                        with monkeypatch.context() as m:
                            m.setenv(INT4_AMX_ENV, "1")
                            nan_row = ours(x)
                        assert nan_row[3].isnan().all() and torch.equal(nan_row[4:], out["amx"][4:])
                        assert torch.equal(nan_row[:3], out["amx"][:3])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_int4_rows_op_int16_inputs(int4_op, threads, monkeypatch):
    """The AVX-512 kernel (one row; up to 4 rows where AMX does not run) multiplies each group of inputs as int16 in a
    power-of-two scale: exact where a group's |x| lie within 2^7 of its largest (the float64 bound without the int16
    term), within 2^-15 of the largest otherwise (a group with an outlier 2^12 times its other inputs), on outputs no
    multiple of the 32-output block, 1-3 rows, 1 and 2 threads; a NaN in one row's input makes that row's outputs NaN
    and leaves the others'."""
    from litllm.cpu_ops import INT4_AMX_ENV

    monkeypatch.setenv(INT4_AMX_ENV, "0")
    g = torch.Generator().manual_seed(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for group, out_f, groups in ((128, 80, 2), (64, 48, 3), (32, 112, 1)):
            _, ours, weight, scaled_q = _int4_layers(out_f, group * groups, monkeypatch)
            for rows in (1, 3):
                sign = torch.randint(0, 2, (rows, group * groups), generator=g) * 2 - 1
                within_2_7 = (sign * torch.empty(rows, group * groups).uniform_(1, 128, generator=g)).bfloat16()
                outlier = torch.randn(rows, group * groups, generator=g)
                outlier[:, ::group] = 4096.0
                for x, int16 in ((within_2_7, False), (outlier.bfloat16(), True)):
                    exact, bound = _int4_exact_and_bound(x, ours, weight, scaled_q if int16 else None)
                    with torch.no_grad():
                        out = ours(x)
                    assert ((out.double() - exact).abs() <= bound).all(), (group, out_f, rows, int16)
                x = outlier.bfloat16()
                x[-1, 5] = float("nan")
                with torch.no_grad():
                    nan_row = ours(x)
                assert nan_row[-1].isnan().all() and torch.equal(nan_row[:-1], out[:-1])
    finally:
        torch.set_num_threads(previous)


def test_int4_layer_holds_one_copy_and_the_switch_keeps_torchao(int4_op, monkeypatch):
    """The bf16 CPU layer keeps its repacked values only (the bytes `litllm estimate` counts for torchao's layer), moves
    without converting its scales; `LITLLM_INT4_ROWS=0` leaves torchao's layer (torch's kernel)."""
    from litllm.estimate import quantized_linear_bytes

    theirs, ours, _, _ = _int4_layers(64, 256, monkeypatch)
    assert type(theirs) is nn.Linear and type(theirs.weight).__name__ == "Int4OpaqueTensor"
    assert [name for name, _ in ours.named_parameters()] == [] and is_quantized(ours)
    assert ours.stored_bytes == quantized_linear_bytes(64, 256, "torchao.int4wo", 2)
    ours.float()
    assert ours.scale_zero.dtype == torch.bfloat16


def test_int4_compiled_greedy_equals_eager_and_the_saved_step_loads(int4_op, tmp_path, monkeypatch):
    """A bf16 int4wo model (every Linear but the head litllm's int4 op) decodes the same greedy tokens eagerly, through
    its compiled step (one op a layer: exported and saved as unquantized models' steps are) and through that saved step
    loaded by a second engine."""
    from conftest import tiny_config
    from litllm.engine import Engine, Request
    from litllm.quantize import Int4RowsLinear

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = quantize_model(GPT(tiny_config()).to(torch.bfloat16).eval(), "torchao.int4wo", "cpu")
    assert sum(isinstance(m, Int4RowsLinear) for m in model.modules()) == 4 * 3
    prompt = [5, 17, 42, 9, 77, 3]

    def greedy(engine) -> list[int]:
        with engine:
            engine.add(Request(prompt, 10))
            tokens = []
            while engine.has_unfinished:
                tokens.extend(t for out in engine.step() for t in out.token_ids)
        return tokens

    eager = greedy(Engine(model, None, 1, 32, threads=1))
    compiled = Engine(model, None, 1, 32, threads=1, compile=True)
    assert compiled.step_source == "compiled"
    assert greedy(compiled) == eager
    loaded = Engine(model, None, 1, 32, threads=1, compile=True)
    assert loaded.step_source == "loaded" and greedy(loaded) == eager
