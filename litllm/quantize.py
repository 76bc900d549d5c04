"""Weight quantization with bitsandbytes or torchao: replace a built model's `nn.Linear` layers in place.

Modes (`--quantize`):
- `bnb.nf4`     4-bit NormalFloat weights (QLoRA's data type), blockwise absmax scales.
- `bnb.nf4-dq`  nf4 with "double quantization": the scales themselves are quantized to 8 bits.
- `bnb.fp4`     4-bit floating-point weights.
- `bnb.int8`    LLM.int8(): int8 weights, outlier features (> 6.0) kept in 16 bits.
- `torchao.int8wo`  int8 weight-only: symmetric int8 per output row; the output head too (its output stays fp32).
                    CUDA: torchao's `Int8WeightOnlyConfig`; CPU: `Int8PackedLinear`, torch's `_weight_int8pack_mm`
                    kernel (gpt-fast's CPU int8) eager; a compiled fp32 step: inductor's own int8 reduction on fp32
                    activations (`Int8Words`), on AVX-512 CPUs litllm's C++ op instead (the unrounded activations
                    times the int8 weights, with VNNI as exact integers: `litllm.cpu_ops.int8wo_rows_op`), which eager
                    fp32 decode rows take too (exact, and faster than the bf16 kernel; `quantize_model` builds its
                    library where it is not built yet; without it, AVX2 CPUs, an fp32 model's head stays fp32).
- `torchao.int4wo`  torchao int4 weight-only: asymmetric uint4 per group of 128 (64, 32) input features,
                    tinygemm's layout (gpt-fast's int4). CUDA: `Int4WeightOnlyConfig`'s tile-packed
                    format, which computes in bfloat16 only; CPU: torchao's `Int4OpaqueTensor`
                    (`PrototypeInt4WeightOnlyConfig`, the kernel `_weight_int4pack_mm_for_cpu`), any float
                    dtype, fast in bfloat16; bf16 on AVX512-BF16 CPUs: `Int4RowsLinear`, torchao's values
                    repacked for litllm's C++ op (`litllm.cpu_ops.int4_rows_op`; `LITLLM_INT4_ROWS=0`: torchao's
                    layer). On the CPU a layer whose in_features is no multiple of 32
                    stays unquantized (with a warning); only toy models have such widths. The output head is
                    int8wo's (8 bits, as llama.cpp's q4_0 files keep theirs; fp32 CPU models: where int8wo's is).
- `torchao.int8dq`  int8 weights (int8wo's values) and int8 activations, quantized per token on each call (W8A8
                    dynamic, torchao's `Int8DynamicActivationInt8WeightConfig`; llama.cpp's q8_0 dot product
                    does the same per block of 32); the output head too (its output stays fp32). CUDA: torchao's
                    layer; CPU: `Int8DynamicLinear`, torch's fbgemm `quantized::linear_dynamic` kernel eager (int8
                    dot products; torchao's CPU path quantizes in eager ops and runs `torch._int_mm`, 2-3x
                    slower: benchmarks/int8_matmul.py); compiled, inductor's own int8 reduction (`Int8Words`,
                    `int8_words_linear`: no call out of the step) on activations rounded per block of 32 as q8_0
                    does, finer than fbgemm's one scale per call (on AVX-512 VNNI CPUs the same arithmetic in
                    litllm's C++ op, int8 dot products by vpdpbusd: `litllm.cpu_ops.int8_rows_op`). Faster than
                    int8wo, a little less exact (eager logits ~2% off vs ~1%). On AVX-512 VNNI CPUs both modes'
                    compiled steps take the packed-rows op (`litllm.cpu_ops.int8_packed_rows_wanted`: the weights
                    16 output rows a vector, `pack_int8_rows`), the same arithmetic.
torchao modes are for inference (the weight becomes a torchao tensor subclass inside the same
`nn.Linear`; `torchao.int8wo` on the CPU: an `Int8PackedLinear` holding torchao's int8 values);
QLoRA uses the bitsandbytes modes.

Activations and the compute stay in `compute_dtype` (the model's dtype by default); only the
weights are stored quantized (`torchao.int8dq` quantizes activations too). The output head (`lm_head`) stays
unquantized by default (except with `torchao.int8dq`, `torchao.int8wo` and `torchao.int4wo`, `QUANTIZES_HEAD`, whose
int8 heads keep greedy decoding as well: benchmarks/int8wo_head.py; int4wo's head is int8wo's, `HEAD_MODES`; an int8wo
head of an fp32 model on a CPU only where its AVX-512 op runs; `quantize_model(..., skip=("lm_head",))` keeps it): the
most sensitive layer to error.

For QLoRA: `quantize_model(model, mode, device, frozen_only=True)` quantizes only frozen Linears
(the base weights), never trainable ones (LoRA matrices), and a LoRA wrapper holding its base
layer as a child module keeps working because only that child is swapped.
`quantize_linear(linear, mode, device)` quantizes a single layer. New modes register a builder in
`QUANT_BUILDERS` (mode -> function(linear, device, compute_dtype) -> module).

bitsandbytes 0.50 runs all four modes on CPU (slowly) and on CUDA; `check_quantize_mode` probes the
combination once with a tiny layer and turns a failure into one clear error. One exception: its CPU
4-bit kernel dequantizes a layer whose `in_features` is not a multiple of the block size (64) with
the wrong scales (it blocks per row, while quantization blocks the flattened weight), so on CPU
`quantize_model` leaves such layers in full precision (with a warning) and `quantize_linear`
refuses them. Real models' widths are multiples of 64; only toy models hit this.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import math
import warnings
import weakref
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from litllm.cpu_layout import prompt_linear
from litllm.errors import LitLLMError

DeviceLike = Union[str, torch.device]


def _bnb():
    # bitsandbytes logs a note about optional CPU kernels on import; keep the CLI output clean
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LitLLMError("--quantize needs bitsandbytes: pip install bitsandbytes (or the `quant` extra)") from None
    return bnb


def _torchao_quantization():
    """torchao.quantization, imported quietly (its import logs missing optional CUDA kernels)."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        import torchao.quantization as quantization
    except ImportError:
        raise LitLLMError("--quantize torchao.* needs torchao: pip install torchao (or the `torchao` extra)") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return quantization


def _frozen_copy(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    copy.weight = nn.Parameter(linear.weight.detach().to(device, dtype), requires_grad=False)
    if linear.bias is not None:
        copy.bias = nn.Parameter(linear.bias.detach().to(device, dtype), requires_grad=linear.bias.requires_grad)
    return copy


def _int8_words(qdata: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> (out, in / 4) fp32 whose bits hold 4 int8 weights each: word j of a row holds, from its
    lowest byte up, the row's weights j, j + in/4, j + in/2, j + 3in/4, so that the compiled kernel multiplies byte b
    of every word by one contiguous quarter of the activation row. fp32 (not int32): inductor's CPU code loads an
    fp32 vector in one instruction but an int32 one through a stack copy (`Vectorized<int32_t>::loadu(ptr, n)`),
    which made the kernel 4x slower; the bits are reinterpreted as int32 in the kernel (free)."""
    out_f, in_f = qdata.shape  # (out, in) -> (out, 4, in/4) -> (out, in/4, 4) bytes -> (out, in/4) words
    words = qdata.reshape(out_f, 4, in_f // 4).transpose(1, 2).contiguous().view(torch.int32)
    return words.reshape(out_f, in_f // 4).view(torch.float32)


def pack_int8_rows(qdata: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> (ceil(out / 16), in / 4, 16) fp32 whose bits hold, for each group of 16 output rows and each 4
    inputs, the 16 rows' 4 weights plus 128 (u8; rows past `out` hold 128, weight 0): litllm's packed-rows op
    (`litllm.cpu_ops.int8_packed_rows_wanted`) sums one activation word times 16 outputs' weights a vector."""
    out_f, in_f = qdata.shape
    groups = -(-out_f // 16)
    padded = qdata.new_zeros(groups * 16, in_f)
    padded[:out_f] = qdata
    biased = padded.view(torch.uint8) ^ 128  # w + 128 as u8
    words = biased.reshape(groups, 16, in_f // 4, 4).transpose(1, 2).contiguous()  # (groups, in/4, 16, 4)
    return words.view(torch.int32).view(torch.float32).reshape(groups, in_f // 4, 16)


def unpack_int8_rows(words: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """int8 (stop - start, in): output rows start..stop of the weights `pack_int8_rows` laid out."""
    g0, g1 = start // 16, -(-stop // 16)
    groups = words[g0:g1].view(torch.uint8)  # (g, in/4, 64): 16 rows' 4 bytes a word
    rows = groups.reshape(g1 - g0, -1, 16, 4).transpose(1, 2).reshape(16 * (g1 - g0), -1)  # (16 g, in)
    return (rows[start - 16 * g0:stop - 16 * g0] ^ 128).view(torch.int8)


ACTIVATION_BLOCK = 32
"""Values per activation scale in the int8dq compiled step (llama.cpp q8_0's block; narrower where a layer's width
is no multiple of it: its greatest common divisor with the width)."""


def _block_quantized(x2d: torch.Tensor, block: int) -> torch.Tensor:
    """(N, in) activations rounded as llama.cpp's q8_0 rounds them: each `block` consecutive values to int8 levels
    of one symmetric scale (their absmax / 127), returned dequantized (fp32 (N, in))."""
    xb = x2d.reshape(x2d.shape[0], -1, block)  # (N, in/block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1.0 / d)  # an all-zero block stays zero
    return (torch.round(xb * inv) * d).reshape(x2d.shape)


def int8_words_linear(x2d: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                      block: Optional[int]) -> torch.Tensor:
    """(N, in) fp32 activations times the int8 weights packed in `words` (`_int8_words`), an fp32 scale per output row
    -> (N, out) fp32, in torch ops that inductor compiles into one vectorized reduction per output row: each word's
    4 bytes sign-extended, converted to fp32 and multiplied by their quarters of the activation row. `block`: the
    activations are first rounded to int8 per block of that many values (`_block_quantized`: int8dq's step); None:
    used as they are (int8wo's step: exact to the int8 weights). Without VNNI the CPU has no faster int8 product than
    this conversion, so rounding the activations buys no speed here; it keeps int8dq's W8A8 numbers."""
    if block is not None:
        x2d = _block_quantized(x2d, block)
    x4 = x2d.reshape(-1, 4, 1, x2d.shape[-1] // 4)  # (N, 4, 1, in/4): the quarters of each row
    v = words.view(torch.int32)  # (out, in/4), 4 int8 weights a word
    acc = (((v << 24) >> 24).float() * x4[:, 0] + ((v << 16) >> 24).float() * x4[:, 1]  # sign-extended bytes 0, 1
           + ((v << 8) >> 24).float() * x4[:, 2] + (v >> 24).float() * x4[:, 3]).sum(-1)  # (N, out)
    out = acc * scales
    return out if bias is None else out + bias


_STEP_ROUNDING = contextvars.ContextVar("litllm_int8_step_rounding", default=False)


@contextmanager
def step_rounding():
    """Within it, eager `Int8Words` layers compute as the compiled decode step does (`Int8Words._eager_step`: int8dq's
    activations rounded per block of 32, int8wo's unrounded) instead of their eager kernels: the engine prefills so
    (`Engine._prefill_logits`), the prompt's KV and its last row's logits, the first generated token's."""
    token = _STEP_ROUNDING.set(True)
    try:
        yield
    finally:
        _STEP_ROUNDING.reset(token)


class Int8Words(nn.Module):
    """What litllm's int8 CPU layers (`Int8PackedLinear`, `Int8DynamicLinear`) share for a compiled decode step: a
    plain-tensor copy of their int8 weights (`words`, `_int8_words`), fp32 row scales and bias, made by
    `prepare_compiled()` (`litllm.compile_decode.unpack_weights`, before a step compiles), which the step multiplies
    by in torch ops (`int8_words_linear`, inductor's own int8 reduction) instead of calling the eager kernel: no call
    out of the compiled code, exportable, so the step is saved and loaded as the unquantized ones are (AOTInductor).
    A compiled model so holds its int8 weights twice (the eager kernel's copy for prefill, `words` for the step).
    Subclasses give `_int8_values()` and `words_block` (the step's activation rounding, `int8_words_linear`)."""

    words_block: Optional[int] = None
    eager_step_rows: Optional[int] = None
    """Rows from which an eager call computes as the step does (`_eager_step`) also outside `step_rounding`: where
    that fp32 GEMM on the converted weights is faster than the eager kernel (a prefill); None: only within it."""

    def _int8_values(self) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """(int8 (out, in), scales (out,), bias or None): the weights the step multiplies by; None: no compiled copy."""
        raise NotImplementedError

    words_in_rows = False
    """Whether `words` holds the int8 weights for litllm's C++ ops (`prepare_compiled`), not as `_int8_words` lays
    them out: row-major, or packed 16 output rows a vector where `words_packed`."""
    words_packed = False

    def _init_words(self) -> None:
        for name in ("words", "word_scales", "word_bias"):  # the compiled step's copy (prepare_compiled)
            self.register_buffer(name, None, persistent=False)

    def _makes_words(self) -> bool:
        return self.in_features % 4 == 0  # a word holds 4 weights of each quarter of a row

    def compiled_tensors(self) -> list[tuple[str, tuple, torch.dtype, tuple]]:
        """(name, shape, dtype, strides) of each tensor `prepare_compiled` gives this layer for a compiled step, made
        or not yet (the saved step's key counts them: `litllm.compile_decode._weights_digest`)."""
        if not self._makes_words():
            return []
        n_out, n_words = self.out_features, self.in_features // 4
        words = ((-(-n_out // 16), n_words, 16), (16 * n_words, 16, 1)) if self._packs(self._rows_op() is not None) \
            else ((n_out, n_words), (n_words, 1))
        tensors = [("words", words[0], torch.float32, words[1]),
                   ("word_scales", (n_out,), torch.float32, (1,))]
        return tensors + ([("word_bias", (n_out,), torch.float32, (1,))] if self.has_bias else [])

    def prepare_compiled(self, build: bool = True) -> None:
        """Add the plain-tensor copy of the weights a compiled step multiplies by (idempotent; not where the input
        width is no multiple of 4: such a layer's step calls the eager kernel). `build=False` (an eager prefill's
        `_eager_step`, either layout will do): the VNNI op's layout only where its library is there already."""
        if not self._makes_words():
            return
        # on AVX-512 the step calls litllm's C++ op (`_rows_op`), which reads the weights row-major, or on AVX-512
        # VNNI its packed-rows op (`_packs`), 16 output rows a vector; elsewhere inductor's reduction, which reads
        # them as `_int8_words` lays them out
        in_rows = self._rows_op(build) is not None
        packed = self._packs(in_rows)
        if self.words is not None and (self.words_in_rows, self.words_packed) == (in_rows, packed):
            return
        qdata, scales, bias = self._int8_values()
        self.words_in_rows, self.words_packed = in_rows, packed
        if packed:  # litllm's packed-rows op: 16 output rows a vector
            words = pack_int8_rows(qdata)
        elif in_rows:  # its row ops: row-major
            words = qdata.contiguous().clone().view(torch.int32).view(torch.float32)
        else:
            words = _int8_words(qdata)
        # non-persistent buffers: moved with the module, left out of state dicts; `words` is fp32 only as a carrier
        self.register_buffer("words", words, persistent=False)
        self.register_buffer("word_scales", scales.float().to(qdata.device), persistent=False)
        self.register_buffer("word_bias", None if bias is None else bias.detach().float(), persistent=False)

    def _rows_op(self, build: bool = True):
        """litllm's C++ op this layer's step multiplies by where it builds or loads here, else None (inductor's
        reduction): int8dq's `int8_rows_op` (AVX-512 VNNI: vpdpbusd on the rounded activations), int8wo's
        `int8wo_rows_op` (AVX-512: the unrounded activations times the int8 weights; with VNNI by vpdpbusd on the
        activations as 31-bit integers, else the weights converted to fp32 16 at a time)."""
        from litllm.cpu_ops import int8_rows_op, int8wo_rows_op

        return int8wo_rows_op(build) if self.words_block is None else int8_rows_op(build)

    def _packs(self, in_rows: bool) -> bool:
        """Whether a step that calls litllm's ops (`in_rows`) takes its packed-rows op (`int8_packed_rows_wanted`;
        int8wo's exact int32 sums: up to 2^16 inputs)."""
        from litllm.cpu_ops import int8_packed_rows_wanted

        return in_rows and int8_packed_rows_wanted() and (self.words_block is not None or self.in_features <= 2**16)

    def _apply(self, fn, recurse=True):
        # the compiled step's copy moves with the module (device) but keeps its dtypes (model.half()): `words` holds
        # int8 bits in fp32, converted it would be garbage; scales and bias stay fp32
        kept = {name: self._buffers.pop(name) for name in ("words", "word_scales", "word_bias")
                if name in self._buffers}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            moved = None if t is None else (fn(t.view(torch.int32)).view(torch.float32) if name == "words"
                                            else fn(t).float())
            self.register_buffer(name, moved, persistent=False)
        return self

    def _words_linear(self, x2d: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out) fp32: the compiled step's product (the same arithmetic either way, up to fp32 summation
        order: int8dq's activations rounded per block, int32 products, fp32 sums)."""
        if self.words_packed:  # (N, out): litllm's packed-rows op (block 0: int8wo's unrounded activations)
            out = torch.ops.litllm_cpu.int8_packed_rows_linear(x2d.float(), self.words, self.word_scales,
                                                              self.words_block or 0)
            return out if self.word_bias is None else out + self.word_bias
        if self.words_in_rows:  # (N, out): litllm's C++ op, the rows split between the threads
            if self.words_block is None:  # int8wo: fp32 products of the unrounded activations
                out = torch.ops.litllm_cpu.int8wo_rows_linear(x2d.float(), self.words, self.word_scales)
            else:  # int8dq: int8 dot products by VNNI
                out = torch.ops.litllm_cpu.int8_rows_linear(x2d.float(), self.words, self.word_scales, self.words_block)
            return out if self.word_bias is None else out + self.word_bias
        return int8_words_linear(x2d.float(), self.words, self.word_scales, self.word_bias, self.words_block)

    def _step_scales(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(fp32 scales (out,), bias or None): those `_eager_step` multiplies by, as the step's."""
        raise NotImplementedError

    def _step_rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 (stop - start, in): the int8 weights of output rows start..stop, converted (`_eager_step`), their
        columns in the order `_step_columns` puts the activations in."""
        raise NotImplementedError

    def _step_columns(self, x2d: torch.Tensor) -> torch.Tensor:
        """(N, in) activations with their columns in `_step_rows`' order."""
        return x2d

    def _uses_eager_step(self, x2d: torch.Tensor) -> bool:
        """Whether this eager call computes as the compiled step would (`_eager_step`): within `step_rounding`, or
        from `eager_step_rows` rows; never where the step itself calls the eager kernel (no `words` for the layer)."""
        if torch.compiler.is_compiling() or not self._makes_words() or x2d.dtype != torch.float32:
            return False
        return _STEP_ROUNDING.get() or (self.eager_step_rows is not None and x2d.shape[0] >= self.eager_step_rows)

    def _prompt_weights(self) -> Optional[torch.Tensor]:
        """The int8 weights row-major ((out, in) int8, or `words` laid out for litllm's ops: `words_in_rows`, row-major
        or packed) for the prompt op (`litllm.cpu_ops.int8_prompt_op`); None where the layer holds none so."""
        raise NotImplementedError

    def _eager_step(self, x2d: torch.Tensor) -> torch.Tensor:
        """(N, in) fp32 -> (N, out) fp32: the compiled step's arithmetic (`int8_words_linear`: the same activation
        rounding, int8 weights, fp32 sums) eagerly, equal to it up to fp32 summation order. On AVX-512 VNNI CPUs where
        litllm's op library is there (`int8_prompt_op`): its multi-row op, which reads the int8 weights once for many
        rows (int8dq: int8 dot products on the rows rounded per block; int8wo: fp32 products on the weights converted
        in registers); elsewhere an fp32 GEMM on the weights converted a few rows at a time (`EAGER_STEP_CHUNK`), never
        kept."""
        from litllm.cpu_ops import int8_prompt_op

        op = int8_prompt_op()
        weights = None if op is None else self._prompt_weights()
        if weights is not None:  # (N, out)
            scales, bias = self._step_scales()
            out = op(x2d, weights, scales, self.words_block or 0)
            return out if bias is None else out + bias
        if self.words_block is not None:
            x2d = _block_quantized(x2d, self.words_block)
        scales, bias = self._step_scales()
        x2d = self._step_columns(x2d)
        rows = max(1, EAGER_STEP_CHUNK // self.in_features)
        out = torch.cat([prompt_linear(x2d, self._step_rows(i, min(i + rows, self.out_features)))
                         for i in range(0, self.out_features, rows)], dim=-1)  # (N, out)
        out = out * scales
        return out if bias is None else out + bias


EAGER_STEP_CHUNK = 2**18
"""int8 weights `Int8Words._eager_step` converts to fp32 at a time (1 MiB): a whole layer's fp32 copy, fresh memory on
each call, cost the output head 3x its product in page faults (a 768 x 32000 head: 78 vs 26 CPU-ms for one row)."""


class Int8PackedLinear(Int8Words):
    """A frozen Linear with int8 weights and one symmetric scale per output row (torchao's int8 weight-only
    values), computed by torch's CPU kernel `torch._weight_int8pack_mm` (gpt-fast's CPU int8 path): it reads
    the int8 weights directly, where torchao's `Int8Tensor` converts them to the activation dtype each call.

    Compiled with fp32 activations (`Int8Words`): the step multiplies the unrounded fp32 activations by the same int8
    weights and (bf16-valued) scales in inductor's own int8 reduction (`int8_words_linear`; on AVX-512 litllm's C++ op,
    `int8wo_rows_op`), where the eager kernel rounds them to bf16 (its fast path): exact to the int8 weights, and
    faster than the kernel in the step. Eager, from `eager_step_rows` rows and within `step_rounding` (the engine's
    prefill), the layer computes so too (`Int8Words._eager_step`: on AVX-512 VNNI CPUs litllm's multi-row op, the int8
    weights converted in registers; elsewhere an fp32 GEMM on the weights converted per call, ~2x the kernel's speed on
    a 512-token prompt); the eager decode of a few rows takes the C++ op where its library is built, else keeps the
    kernel (2x faster there than the converted GEMM), except the head's (`exact_output`)."""

    eager_step_rows = 16  # measured on a 2-core AVX2 EPYC, 1 thread: the GEMM is as fast as the kernel from ~16 rows
    exact_output = False
    """Whether eager calls of fewer rows never round to bf16 either (`_eager_rows`): the output head's
    (`quantize_model`), whose bf16 logits would tie and flip greedy near-ties. A 16-bit model's head: its decode rows
    (eager and compiled) in fp32 through litllm's op where it is there (`_makes_words`), logits in the model's dtype."""

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, bias: Optional[nn.Parameter]):
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        self.weight = nn.Parameter(qdata.contiguous(), requires_grad=False)  # (out, in) int8
        self.fp32_activations = scales.dtype == torch.float32  # the model's dtype (`_torchao_int8wo`)
        # (out,) in the dtype the kernel multiplies in: bf16 for fp32 activations (see forward)
        act = torch.bfloat16 if scales.dtype == torch.float32 else scales.dtype
        self.scales = nn.Parameter(scales.reshape(-1).to(act).contiguous(), requires_grad=False)
        self.bias = bias
        self._init_words()

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def _makes_words(self) -> bool:
        # 16-bit activations: the kernel's bf16 path, except the head's (`exact_output`) where litllm's op is there:
        # ~2x less CPU on one row (the benchmark Llama's 32000 x 768 head, 1 thread: 0.93 vs 2.0 ms)
        if not (self.fp32_activations or (self.exact_output and self._rows_op(build=False) is not None)):
            return False
        return super()._makes_words()

    def _int8_values(self):
        return self.weight, self.scales, self.bias

    def _step_scales(self):
        return self.scales.float(), None if self.bias is None else self.bias.float()

    def _step_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.weight[start:stop].float()

    def _prompt_weights(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unrounded = x.dtype == torch.float32 or self.exact_output  # a 16-bit head's rows: fp32 products, then x's dtype
        if torch.compiler.is_compiling() and self.words is not None and unrounded:
            out = self._words_linear(x.reshape(-1, self.in_features))  # (N, out), the bias added
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self._uses_eager_step(x2d := x.reshape(-1, self.in_features)):  # a prefill: faster than the kernel, exact
            return self._eager_step(x2d).reshape(*x.shape[:-1], self.out_features)
        if not torch.compiler.is_compiling() and unrounded and self._makes_words():
            exact = self._eager_rows(x2d.float())  # a decode step's few rows, unrounded
            if exact is not None:
                return exact.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        # the kernel is vectorized for bf16 activations only (fp32 ones run ~15x slower, slower than an fp32
        # matmul): fp32 activations are rounded to bf16 for it, finer than llama.cpp's q8_0 (int8 blocks)
        act = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        scales = self.scales if self.scales.dtype == act else self.scales.to(act)
        x2d = x2d.to(act)
        if torch.compiler.is_compiling():  # inductor's lowering of the kernel takes stored inputs, not a fused cast
            x2d = torch.ops.aten.clone(x2d, memory_format=torch.contiguous_format)
        out = torch._weight_int8pack_mm(x2d, self.weight, scales)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., in) -> (..., out)
        return out if self.bias is None else out + self.bias

    def _eager_rows(self, x2d: torch.Tensor) -> Optional[torch.Tensor]:
        """(N, in) fp32 -> (N, out) fp32 as the compiled step computes (the activations unrounded, fp32 sums) where
        that is fast eagerly: litllm's C++ op on the layer's own int8 weights (`int8wo_rows_op`, AVX-512, where its
        library is there already: 1.1-2x less CPU than the bf16 kernel on the benchmark Llama's head, loaded runs), or
        for an `exact_output` layer (the head: the kernel's bf16 logits tie and flip near-ties) `_eager_step`; None: the
        bf16 kernel."""
        op = self._rows_op(build=False)
        if op is not None:
            scales = self.word_scales if self.word_scales is not None else self.scales.float()
            out = op(x2d, self.weight.view(torch.int32).view(torch.float32), scales)
            return out if self.bias is None else out + self.bias
        return self._eager_step(x2d) if self.exact_output else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _int8_rows(layer: nn.Linear, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """torchao's int8 values of a quantized CPU layer as torch's CPU kernels take them: (int8 (out, in), scales
    (out,)), symmetric (no offset); None on another device or where torchao stored something else."""
    weight = layer.weight
    qdata, scale, zero_point = (getattr(weight, name, None) for name in ("qdata", "scale", "zero_point"))
    if (device.type == "cpu" and qdata is not None and qdata.dtype == torch.int8 and scale is not None
            and scale.numel() == layer.out_features and (zero_point is None or not zero_point.any())):
        return qdata, scale.reshape(-1)
    return None


def _torchao_int8wo(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    ao = _torchao_quantization()
    layer = _frozen_copy(linear, device, compute_dtype)
    # set_inductor_config=False: leave torch's global compile settings alone
    ao.quantize_(layer, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    rows = _int8_rows(layer, device)
    # on the CPU, torch's int8 kernel takes torchao's values as they are: int8 rows, one scale each, no offset
    if rows is not None and compute_dtype in (torch.float32, torch.bfloat16, torch.float16):
        return Int8PackedLinear(rows[0], rows[1].to(compute_dtype), layer.bias)
    return layer


@lru_cache(maxsize=None)
def _int8_dynamic_op():
    """`litllm::int8_dynamic_linear(x, key, out_features)`: torch's `quantized::linear_dynamic` on the packed
    weights of the `Int8DynamicLinear` registered under `key`. An opaque custom op, so that `torch.compile` keeps
    the decode step whole around it (it can't trace the packed-weights object the kernel takes)."""

    @torch.library.custom_op("litllm::int8_dynamic_linear", mutates_args=())
    def int8_dynamic_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, _INT8_DYNAMIC_LAYERS[key].packed, _reduce_range())

    @int8_dynamic_linear.register_fake
    def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    return int8_dynamic_linear


@lru_cache(maxsize=None)
def _reduce_range() -> bool:
    """Whether fbgemm must quantize activations to 7 bits: without VNNI its kernel sums pairs of u8 x s8 products
    in saturating int16 (a full 8-bit range could overflow them); with VNNI (int32 sums) 8 bits are exact and halve
    the error (measured on tests/test_quantize.py's tiny model: logits 1.8% vs 3.2% off). No flags read (not Linux):
    the safe range."""
    from litllm.utils import cpu_flags

    return not {"avx512_vnni", "avx_vnni"} & cpu_flags()


_INT8_DYNAMIC_LAYERS: "weakref.WeakValueDictionary[int, Int8DynamicLinear]" = weakref.WeakValueDictionary()
_INT8_DYNAMIC_KEYS = itertools.count()


class Int8DynamicLinear(Int8Words):
    """A frozen Linear with int8 weights (one symmetric scale per output row) whose activations are quantized to
    int8 on each call and multiplied by int8 dot products, the output in fp32: W8A8 dynamic, as llama.cpp's q8_0
    dot product does. Eager, the kernel is torch's fbgemm `quantized::linear_dynamic` (int8 GEMV), on weights
    prepacked for it once: one asymmetric activation scale per call's input, 8 bits (7 on CPUs without VNNI, where
    its int16 sums could saturate: `_reduce_range`).

    Compiled (`Int8Words`): the step rounds each activation row to int8 per block of 32 values with a symmetric
    scale each (q8_0's activation rounding, `int8_words_linear`): its own reduction sums in fp32, so it needs no
    narrower range on any CPU and errs less than fbgemm's one scale per call (on the benchmark Llama's logits 3.9%
    vs 6.3% for 7-bit rows; tutorials/inference.md). Eager calls within `step_rounding` (the engine's prefill)
    compute as the step does (`Int8Words._eager_step`), so the prompt's KV and the first token have its rounding
    (on AVX-512 VNNI CPUs by litllm's multi-row op, int8 dot products; elsewhere an fp32 GEMM on converted weights,
    ~2x slower than fbgemm on a 512-token prompt), while with fbgemm's 7-bit rows in the prompt's KV the benchmark
    Llama's later tokens err ~7% against fp32, not ~4% (benchmarks/int8_prefill.py). Other eager calls (decode
    steps, a batch's included; speculative verification) keep fbgemm, 4x faster for few rows. The eager step reads
    the step's `words`, so an int8dq model holds its int8 weights twice from its first prefill on, compiled or not."""

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        with warnings.catch_warnings():  # torch's quantized tensor type is deprecated; the packing is how its kernel takes weights
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                qdata.contiguous(), scales.reshape(-1).double(), torch.zeros(self.out_features, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
        # in a tuple: torch.export fakes every script object it finds among a module's attributes, and fbgemm's
        # packed weights can't be faked (the compiled step does not read them: `words`)
        self._packed = (packed,)
        self.has_bias = bias is not None
        self.words_block = math.gcd(self.in_features, ACTIVATION_BLOCK)
        self._init_words()
        self.key = next(_INT8_DYNAMIC_KEYS)  # never reused: a compiled step holds it as a constant
        _INT8_DYNAMIC_LAYERS[self.key] = self
        _int8_dynamic_op()

    def __setstate__(self, state: dict) -> None:  # a copy (copy.deepcopy) registers itself under a key of its own
        super().__setstate__(state)
        self.key = next(_INT8_DYNAMIC_KEYS)
        _INT8_DYNAMIC_LAYERS[self.key] = self

    @property
    def packed(self):
        """fbgemm's packed weights (`torch.ops.quantized.linear_prepack`)."""
        return self._packed[0]

    def _int8_values(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight, bias = torch.ops.quantized.linear_unpack(self.packed)
        return qweight.int_repr(), qweight.q_per_channel_scales(), bias

    def _step_scales(self):
        if self.words is None:  # `_step_rows` reads the words: unpacking fbgemm's copy costs more than the product
            self.prepare_compiled(build=False)
        return self.word_scales, self.word_bias

    def _step_rows(self, start: int, stop: int) -> torch.Tensor:
        # the step's words as they lie, bytes in a row: column 4j + k holds the row's weight j + k * in/4
        # (`_int8_words`; row-major where `words_in_rows`; a contiguous read, 2.5x faster than reordering the weights:
        # `_step_columns` reorders the activations instead)
        if self.words_packed:
            return unpack_int8_rows(self.words, start, stop).float()
        return self.words[start:stop].view(torch.int8).float()

    def _prompt_weights(self) -> Optional[torch.Tensor]:
        self._step_scales()  # the words made, for litllm's ops where their library is there (`prepare_compiled`)
        return self.words if self.words_in_rows else None

    def _step_columns(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.words_in_rows:  # the VNNI op's words: the weights in their own order
            return x2d
        return x2d.reshape(x2d.shape[0], 4, -1).transpose(1, 2).reshape(x2d.shape)  # column j + k*in/4 -> 4j + k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float()  # (N, in): the kernel takes fp32 activations
        if torch.compiler.is_compiling() and self.words is not None:  # (N, out) fp32
            out = self._words_linear(x2d)
        elif self._uses_eager_step(x2d):  # the step's rounding, eagerly: a prefill
            out = self._eager_step(x2d)
        elif torch.compiler.is_compiling():  # no compiled copy (a width no multiple of 4): fbgemm, opaque to inductor
            out = torch.ops.litllm.int8_dynamic_linear(x2d, self.key, self.out_features)
        else:  # eager: the kernel itself, without the custom op's Python dispatch (~100 calls a token)
            out = torch.ops.quantized.linear_dynamic(x2d, self.packed, _reduce_range())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def stored_bytes(self) -> int:
        """int8 values, an fp32 scale per row (and an fp32 bias): what a token reads."""
        return self.out_features * self.in_features + 4 * self.out_features * (1 + self.has_bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


def _torchao_int8dq(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    ao = _torchao_quantization()
    layer = _frozen_copy(linear, device, compute_dtype)
    ao.quantize_(layer, ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    rows = _int8_rows(layer, device)
    # on the CPU torchao's own layer quantizes activations in ~10 eager ops and multiplies with `torch._int_mm`,
    # several times slower than torch's fbgemm kernel on the same int8 values (benchmarks/int8_matmul.py)
    if rows is not None:
        try:
            return Int8DynamicLinear(rows[0], rows[1], layer.bias)
        except (AttributeError, RuntimeError):  # a torch without the kernel (or its quantized tensors): torchao's layer
            pass
    return layer


INT4_GROUP_SIZES = (128, 64, 32)  # the group sizes torchao's CPU int4 kernel takes, preferred first


def _torch_int4_values(qdata: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """torch's CPU int4 packing (`_convert_weight_to_int4pack_for_cpu` on an AVX-512 CPU: (N, K/2) uint8, blocks of 64
    output rows, per input k 32 bytes, byte d (< 16) holding rows d (low nibble) and d + 32, byte 16 + d rows 16 + d and
    48 + d; a last block of 16, 32 or 48 rows: byte n/2 holds rows n and n + 1) -> the uint4 values, (N, K) uint8."""
    N, K = out_features, in_features
    flat = qdata.reshape(-1)
    full = N // 64
    b = flat[: full * K * 32].reshape(full, K, 2, 16)  # (block, k, half, 16 rows)
    rows = torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 3, 1).reshape(full * 64, K)  # (row, k)
    rest = N - full * 64
    if rest:
        b = flat[full * K * 32:].reshape(K, rest // 2)  # byte n/2: rows n, n + 1
        rows = torch.cat([rows, torch.stack([b & 15, b >> 4], dim=-1).reshape(K, rest).t()])
    return rows


def int4_rows_layout(qdata: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int, in_features: int,
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's CPU int4 tensors (`Int4OpaqueTensor`: `qdata` in torch's packing, `scale_and_zero` (K/group, N, 2))
    -> the layout of litllm's `int4_rows_linear` op: (N/32, K/2, 32) uint8, per block of 32 outputs and pair of inputs
    (k, k+1) 32 bytes, byte 2j+t holding output j's value at k+t (low nibble) and output 16+j's (high nibble); and
    (N/32, K/group, 2, 32) scales then zeros per block and group (the outputs past N: zero)."""
    N, K = out_features, in_features
    blocks = -(-N // 32)
    q = torch.zeros(blocks * 32, K, dtype=torch.uint8)
    q[:N] = _torch_int4_values(qdata, N, K)
    q = q.reshape(blocks, 2, 16, K // 2, 2)  # (block, half, j, pair, t)
    packed = (q[:, 0] | (q[:, 1] << 4)).permute(0, 2, 1, 3).reshape(blocks, K // 2, 32)  # (block, pair, 2j+t)
    sz = torch.zeros(blocks * 32, K // group, 2, dtype=scale_and_zero.dtype)
    sz[:N] = scale_and_zero.transpose(0, 1)  # (N, groups, scale / zero)
    sz = sz.reshape(blocks, 32, K // group, 2).permute(0, 2, 3, 1)  # (block, group, scale / zero, 32 outputs)
    return packed.contiguous(), sz.contiguous()


class Int4RowsLinear(nn.Module):
    """A frozen Linear with torchao's int4 weight-only values (asymmetric uint4 per group of `group` inputs, bf16 scale
    and zero: `w = (q - 8) * scale + zero`), bf16 activations, computed by litllm's AVX-512 op `int4_rows_linear`
    (`litllm.cpu_ops.int4_rows_op`) on the weights repacked once at load (`int4_rows_layout`: 32 outputs x 2 inputs a
    32-byte line; torchao's copy is not kept): a decode row's inputs as int16 per group of `group` (exact within 2^7 of
    the group's largest |x|, else within 2^-15 of it) in int32 sums, 3 or more rows by AMX-BF16 tiles in fp32 sums
    where AMX runs; eager and in compiled steps (one op: a plain-tensor module, so the step is saved as the unquantized
    ones are). Prompts too: each line of weights is read once per 4 rows."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int, out_features: int,
                 bias: Optional[nn.Parameter]):
        super().__init__()
        self.in_features, self.out_features, self.group = packed.shape[1] * 2, out_features, group
        self.register_buffer("packed", packed)  # (N/32, K/2, 32) uint8
        self.register_buffer("scale_zero", scale_zero)  # (N/32, K/group, 2, 32) bf16
        self.bias = bias

    def _apply(self, fn, recurse=True):
        # moved with the module (device) but never converted (model.half()): the op reads bf16 scales
        scale_zero = self._buffers.pop("scale_zero")
        super()._apply(fn, recurse)
        moved = fn(scale_zero)
        self.register_buffer("scale_zero", moved if moved.dtype == torch.bfloat16 else scale_zero.to(moved.device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        out = torch.ops.litllm_cpu.int4_rows_linear(x2d, self.packed, self.scale_zero, self.group, self.out_features)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    @property
    def stored_bytes(self) -> int:
        """The packed values and bf16 scales and zeros (and the bias): what a token reads."""
        return self.packed.nbytes + self.scale_zero.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bias={self.bias is not None}")


def _torchao_int4wo(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    ao = _torchao_quantization()
    group = next((g for g in INT4_GROUP_SIZES if linear.in_features % g == 0), INT4_GROUP_SIZES[0])
    layer = _frozen_copy(linear, device, compute_dtype)
    if device.type == "cpu":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    else:  # tinygemm's CUDA kernel (bfloat16; torchao pads other widths)
        config = ao.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                         set_inductor_config=False)
    ao.quantize_(layer, config)
    if device.type == "cpu" and compute_dtype == torch.bfloat16:
        from litllm.cpu_ops import int4_rows_op

        weight = layer.weight
        if int4_rows_op() is not None and weight.scale_and_zero.dtype == torch.bfloat16:  # torchao's values repacked
            packed, scale_zero = int4_rows_layout(weight.qdata, weight.scale_and_zero, linear.out_features,
                                                  linear.in_features, group)
            return Int4RowsLinear(packed, scale_zero, group, linear.out_features, layer.bias)
    return layer


def _linear4bit(quant_type: str, double_quant: bool) -> Callable:
    def build(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
        bnb = _bnb()
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type, device="meta",
        )
        # quantization happens when the Params4bit moves to its device
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu", compute_dtype), requires_grad=False,
            compress_statistics=double_quant, quant_type=quant_type,
        ).to(device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=linear.bias.requires_grad)
        return q

    return build


def _linear8bit(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=6.0, device="meta",
    )
    q.weight = bnb.nn.Int8Params(
        linear.weight.data.to("cpu", compute_dtype), requires_grad=False, has_fp16_weights=False
    ).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=linear.bias.requires_grad)
    return q


# mode -> builder(linear, device, compute_dtype) -> quantized module (other modules may add modes)
QUANT_BUILDERS: dict[str, Callable[[nn.Linear, torch.device, torch.dtype], nn.Module]] = {
    "bnb.nf4": _linear4bit("nf4", double_quant=False),
    "bnb.nf4-dq": _linear4bit("nf4", double_quant=True),
    "bnb.fp4": _linear4bit("fp4", double_quant=False),
    "bnb.int8": _linear8bit,
    "torchao.int8wo": _torchao_int8wo,
    "torchao.int4wo": _torchao_int4wo,
    "torchao.int8dq": _torchao_int8dq,
}


# modes that quantize the output head too by default (`skip=("lm_head",)` keeps it unquantized; an int8wo head of an
# fp32 CPU model only where its AVX-512 op runs: `_fast_exact_int8wo_head`): their int8 heads
# compute fp32 logits (int8wo's: `Int8PackedLinear.exact_output`, never its kernel's bf16 ones, which tie and flip
# greedy near-ties) and keep greedy decoding (benchmarks/int8wo_head.py); the head is most of what an 8-bit model reads
# per token (the benchmark Llama's fp32 head: 98 of int8wo's 184 MB). int4wo's head is int8wo's (`HEAD_MODES`): 8 bits
# for the most error-sensitive layer, as llama.cpp's q4_0 files keep theirs (q6_K/q8_0); left bf16 it was 49 of the
# 94 MB a bf16 int4wo token reads
QUANTIZES_HEAD = frozenset({"torchao.int8dq", "torchao.int8wo", "torchao.int4wo"})
HEAD_MODES = {"torchao.int4wo": "torchao.int8wo"}  # mode -> its head's mode, where they differ
HEAD = "lm_head"

FOUR_BIT_BLOCKSIZE = 64  # bitsandbytes' default for Params4bit


def cpu_kernel_mishandles(linear: nn.Linear, mode: str, device: DeviceLike) -> bool:
    """True where bitsandbytes' CPU 4-bit kernel would compute this layer wrong (see module docstring)."""
    four_bit = mode in ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4")
    return four_bit and torch.device(device).type == "cpu" and linear.in_features % FOUR_BIT_BLOCKSIZE != 0


def cpu_kernel_refuses(linear: nn.Linear, mode: str, device: DeviceLike) -> Optional[str]:
    """Why this layer can't be quantized with `mode` on the CPU (None if it can)."""
    if cpu_kernel_mishandles(linear, mode, device):
        return (f"bitsandbytes computes layers with in_features={linear.in_features} (not a multiple of "
                f"{FOUR_BIT_BLOCKSIZE}) incorrectly on CPU; use bnb.int8 or a GPU")
    if (mode == "torchao.int4wo" and torch.device(device).type == "cpu"
            and linear.in_features % INT4_GROUP_SIZES[-1] != 0):
        return (f"torchao's CPU int4 kernel needs in_features divisible by {INT4_GROUP_SIZES[-1]}, "
                f"got {linear.in_features}; use torchao.int8wo or a GPU")
    return None


def _library(mode: str) -> str:
    return "torchao" if mode.startswith("torchao.") else "bitsandbytes"


def check_quantize_mode(mode: str, device: DeviceLike, compute_dtype: torch.dtype = torch.float32) -> None:
    """Fail with one clear line unless `mode` can run on `device` with this bitsandbytes."""
    if mode not in QUANT_BUILDERS:
        raise LitLLMError(f"--quantize: unknown mode {mode!r}; expected one of {', '.join(QUANT_BUILDERS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LitLLMError(f"--quantize {mode}: device {device} requested but CUDA is not available")
    if mode == "torchao.int4wo" and device.type == "cuda" and compute_dtype != torch.bfloat16:
        raise LitLLMError(f"--quantize torchao.int4wo on cuda computes in bfloat16 only (torchao's tinygemm kernel): "
                          f"use --precision bf16-true, not {compute_dtype}")
    error = _probe(mode, str(device), compute_dtype)
    if error:
        raise LitLLMError(f"--quantize {mode} can't run on {device.type} with this {_library(mode)}: {error}")


@lru_cache(maxsize=None)
def _probe(mode: str, device: str, compute_dtype: torch.dtype) -> Optional[str]:
    """Quantize and run a tiny layer; the error text if that fails, else None."""
    (_torchao_quantization if _library(mode) == "torchao" else _bnb)()  # a missing library: its own error
    try:
        with torch.no_grad():  # 128 wide: a whole int4 group of torchao, two blocks of bitsandbytes
            layer = QUANT_BUILDERS[mode](nn.Linear(128, 64), torch.device(device), compute_dtype)
            out = layer(torch.randn(2, 128, device=device, dtype=compute_dtype))
            if not torch.isfinite(out).all():
                return "non-finite outputs from a test layer"
    except Exception as e:  # the libraries raise many kinds (NotImplementedError, RuntimeError, ...)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def quantize_linear(
    linear: nn.Linear, mode: str, device: DeviceLike, compute_dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """A quantized copy of one `nn.Linear` on `device` (weights frozen; a bias keeps its requires_grad)."""
    if mode not in QUANT_BUILDERS:
        raise LitLLMError(f"--quantize: unknown mode {mode!r}; expected one of {', '.join(QUANT_BUILDERS)}")
    refused = cpu_kernel_refuses(linear, mode, device)
    if refused:
        raise LitLLMError(f"--quantize {mode} on cpu: {refused}")
    compute_dtype = compute_dtype or linear.weight.dtype
    return QUANT_BUILDERS[mode](linear, torch.device(device), compute_dtype)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    mode: str,
    device: DeviceLike,
    skip: Optional[Iterable[str]] = None,
    frozen_only: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace the model's `nn.Linear` layers with quantized ones on `device`, in place; returns `model`.

    skip: module names (or their last component) left unquantized; by default `lm_head`, except for the
        modes in `QUANTIZES_HEAD` (whose head takes the mode `HEAD_MODES` names, else their own).
    frozen_only: quantize only Linears whose weight does not require grad (QLoRA's frozen base).
    compute_dtype: dtype of activations and matmuls; defaults to each layer's weight dtype.
    The rest of the model (embeddings, norms) is not moved: call `model.to(device)` afterwards.
    """
    dtype = compute_dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    head_mode = HEAD_MODES.get(mode, mode)
    quantizes_head = mode in QUANTIZES_HEAD and (head_mode != "torchao.int8wo"
                                                 or _fast_exact_int8wo_head(device, dtype))
    skip = set((HEAD,) if skip is None and not quantizes_head else skip or ())
    check_quantize_mode(mode, device, dtype)
    if head_mode != mode and HEAD not in skip:
        check_quantize_mode(head_mode, device, dtype)
    targets = [
        (name, module, head_mode if name.rsplit(".", 1)[-1] == HEAD else mode)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name not in skip and name.rsplit(".", 1)[-1] not in skip
        and not (frozen_only and module.weight.requires_grad)
    ]
    kept = [name for name, linear, layer_mode in targets if cpu_kernel_refuses(linear, layer_mode, device)]
    if kept:
        multiple, why = ((INT4_GROUP_SIZES[-1], "torchao's CPU int4 kernel can't take them") if mode == "torchao.int4wo"
                         else (FOUR_BIT_BLOCKSIZE, "bitsandbytes' CPU kernel computes them wrong"))
        warnings.warn(
            f"--quantize {mode} on cpu: {len(kept)} layer(s) with in_features not a multiple of "
            f"{multiple} (e.g. {kept[0]}) stay unquantized: {why}",
            stacklevel=3,  # the caller of quantize_model (torch.no_grad adds a frame)
        )
        targets = [target for target in targets if target[0] not in kept]
    # torchao's CPU int4 kernel is fast in bf16 only
    if torch.device(device).type == "cpu" and mode == "torchao.int4wo" and dtype != torch.bfloat16:
        warnings.warn(
            f"--quantize {mode} on cpu in {str(dtype).replace('torch.', '')}: saves memory but decodes slower than "
            "unquantized weights; torchao.int4wo with --precision bf16-true is the fast CPU combination",
            stacklevel=3,
        )
    from tqdm import tqdm

    for name, linear, layer_mode in tqdm(targets, desc=f"quantize {mode}", unit="layer", disable=len(targets) < 50):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = quantize_linear(linear, layer_mode, device, compute_dtype or linear.weight.dtype)
        if child == HEAD and isinstance(layer, Int8PackedLinear):
            layer.exact_output = True  # fp32 logits eagerly too
        setattr(parent, child, layer)
    return model


def _fast_exact_int8wo_head(device: DeviceLike, dtype: torch.dtype) -> bool:
    """Whether an int8wo head computes its fp32 logits fast here: anywhere but fp32 on the CPU (its kernel's own dtype),
    and there where litllm's AVX-512 op builds or loads (`int8wo_rows_op`: its library built now, once per machine, ~1
    min, not when a step first compiles). Without it (AVX2 CPUs, no compiler) the head's eager fp32 rows would take
    `Int8Words._eager_step` (2.2x the fp32 head's CPU time; the eager token 1.6x), so the head stays fp32 there."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return True
    from litllm.cpu_ops import int8wo_rows_op

    return int8wo_rows_op(build=True) is not None


def is_quantized(module: nn.Module) -> bool:
    """Whether a layer holds bitsandbytes- or torchao-quantized weights."""
    if isinstance(module, (Int8PackedLinear, Int8DynamicLinear, Int4RowsLinear)):
        return True
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in ("Params4bit", "Int8Params") or type(weight).__module__.startswith("torchao.")


def quantize_frozen(model: nn.Module, quantize: Optional[str], device, compute_dtype: Optional[torch.dtype]) -> None:
    """QLoRA (a method's `after_freeze`): every frozen Linear (the base weights) becomes a bitsandbytes layer of
    mode `quantize` on `device` (None: nothing changes)."""
    if quantize is None:
        return
    quantize_model(model, quantize, device, frozen_only=True, compute_dtype=compute_dtype)
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for CPU inference whenever a layer runs in eval mode
        # (validation), which fails for inputs narrower than a quantization block: training keeps one layout
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.to(device)
    for module in model.modules():
        # the loop gathers state dicts with torch.distributed.checkpoint, which looks every key up as an
        # attribute; bitsandbytes' int8 layer saves `SCB` and `weight_format` keys it has no attributes for
        if type(module).__name__ == "Linear8bitLt" and getattr(module.weight, "SCB", None) is not None:
            module.SCB = module.weight.SCB
            module.weight_format = torch.tensor(0, dtype=torch.uint8)
