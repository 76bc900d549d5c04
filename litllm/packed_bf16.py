"""bf16 CPU Linears held once, in oneDNN's packed layout, for a compiled run (`BlockedBf16Linear`): a prompt's rows
through oneDNN's GEMM on the packed weight, one row through litllm's AVX512-BF16 op on the same bytes
(`litllm_cpu::packed_bf16_linear`, `litllm.cpu_ops`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from litllm.cpu_ops import library_built, row_split_op
from litllm.utils import cpu_flags, switched_off

PACKED_BF16_ENV = "LITLLM_PACKED_BF16"
"""`0`/`false`: compiled bf16 steps keep row-major weights and inductor's `mv` (`OneRowLinear`), e.g. to compare."""


def packed_bf16_op(build: bool = True) -> Optional[object]:
    """`torch.ops.litllm_cpu.packed_bf16_linear(x, blocks, out_features)` (the same library as `row_split_op`'s) where
    this CPU has AVX512-BF16, oneDNN packs bf16 weights in one of `BF16_BLOCKS` (`bf16_block`), the library builds or
    loads and `$LITLLM_PACKED_BF16` is not `0`; else None. Compiled bf16 steps multiply by oneDNN's packed weights
    through it (`BlockedBf16Linear`). `build=False`: None where the library is neither loaded nor built yet."""
    if switched_off(PACKED_BF16_ENV) \
            or not {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags():
        return None
    if not build and not library_built():
        return None
    if bf16_block() is None:
        return None
    return None if row_split_op() is None else torch.ops.litllm_cpu.packed_bf16_linear


BF16_BLOCKS = ((32, 64, 2), (16, 32, 2))
"""oneDNN's packed bf16 Linear weights, per W x KW block of (out, in): KW / 2 pairs of input features, each holding W
outputs x the pair's 2 values; blocks ordered (out / W, in / KW), padded with zeros. (32, 64, 2), W = KW = 64: its
AVX512-BF16 kernels' blocking; (16, 32, 2), W = KW = 32: its AMX kernels' (`onednn_bf16_blocks` checks each weight it
packs against the one `bf16_block` found)."""


@lru_cache(maxsize=None)
def bf16_block() -> Optional[tuple[int, int, int]]:
    """The `BF16_BLOCKS` entry oneDNN packs bf16 Linear weights in here (probed once, on a 192 x 128 weight), or None
    where it packs otherwise (another ISA's blocking) or not at all: then no weight becomes a `BlockedBf16Linear` and
    the saved steps' keys (`litllm.compile_decode._blocked_modules`) say so."""
    weight = torch.randn(192, 128).to(torch.bfloat16)
    for block in BF16_BLOCKS:
        try:
            if onednn_bf16_blocks(weight, block) is not None:
                return block
        except (RuntimeError, AttributeError, OSError, TypeError):  # no oneDNN bf16 reorder, or no AOTInductor C shim
            return None
    return None


def blocks_shape(out_features: int, in_features: int, block: tuple[int, int, int]) -> tuple[int, ...]:
    """The shape of an (out, in) weight's blocks in `block`'s layout: (out / W, in / KW, KW / 2, W, 2), rounded up."""
    pairs, width, _ = block
    return -(-out_features // width), -(-in_features // (2 * pairs)), *block


def onednn_bf16_blocks(weight: torch.Tensor, block: Optional[tuple[int, int, int]] = None
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(blocks, packed) for a bf16 (out, in) CPU weight: its oneDNN-packed bytes as a plain `blocks_shape` tensor
    (`block`: default `bf16_block()`'s) that owns them, and an opaque oneDNN tensor on the same memory (what
    `torch.ops.mkldnn._linear_pointwise` multiplies a prompt by without reordering); None where oneDNN packs
    otherwise here (another blocking, no bf16 GEMM)."""
    import ctypes

    block = block or bf16_block()
    if block is None or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    out_features, in_features = weight.shape
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    blocks = torch.empty(blocks_shape(out_features, in_features, block), dtype=torch.bfloat16)
    if torch.ops.mkldnn._nbytes(packed) != 2 * blocks.numel():
        return None
    ctypes.memmove(blocks.data_ptr(), torch.ops.mkldnn.data_ptr(packed), 2 * blocks.numel())
    plain = blocks.permute(0, 3, 1, 2, 4).reshape(blocks.size(0) * blocks.size(3), blocks.size(1) * 2 * blocks.size(2))
    if not torch.equal(plain[:out_features, :in_features], weight) or plain.count_nonzero() != weight.count_nonzero():
        return None  # not the blocking assumed (or nonzero padding)
    return blocks, _onednn_view(blocks, packed)


def _onednn_view(blocks: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN tensor over `blocks`' memory (not owning it) that describes it as `packed` does: made through
    the C function AOTInductor loads packed constants with (`aoti_torch_create_tensor_from_blob_v2`)."""
    import ctypes

    lib = _aoti_shim()
    meta = bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).tolist())
    sizes = (ctypes.c_int64 * 2)(*packed.shape)
    strides = (ctypes.c_int64 * 2)(packed.size(1), 1)
    handle = ctypes.c_void_p()
    code = lib.aoti_torch_create_tensor_from_blob_v2(
        blocks.data_ptr(), 2, sizes, strides, 0, lib.aoti_torch_dtype_bfloat16(), lib.aoti_torch_device_type_cpu(), -1,
        ctypes.byref(handle), lib.aoti_torch_layout__mkldnn(), meta, len(meta))
    if code != 0:
        raise RuntimeError("aoti_torch_create_tensor_from_blob_v2 failed")
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype, capsule.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(capsule(handle.value, None, None))


@lru_cache(maxsize=None)
def _aoti_shim():
    import ctypes

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.aoti_torch_create_tensor_from_blob_v2.restype = ctypes.c_int32
    lib.aoti_torch_create_tensor_from_blob_v2.argtypes = (
        ctypes.c_void_p, ctypes.c_int64, i64p, i64p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
        ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_char_p, ctypes.c_int64)
    return lib


class BlockedBf16Linear(torch.nn.Module):
    """A bf16 CPU Linear held once, in oneDNN's packed layout (`onednn_bf16_blocks`), for a compiled run: a prompt's
    rows go through oneDNN's GEMM on it as packed (`torch.ops.mkldnn._linear_pointwise`, as the eager step's
    `PackedLinear`: no per-call reorder of a row-major weight), one row (decoding: eager, or the compiled step, which
    takes `blocks` as its input) through `litllm_cpu::packed_bf16_linear` on the same bytes. For inference only: not
    saved (`blocks` is no state-dict entry), no autograd."""

    multiplies_by_weight = True  # `.weight` is the matrix it applies (MLA's absorbed attention reads it: model.py)

    def __init__(self, in_features: int, out_features: int, blocks: torch.Tensor, onednn: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("blocks", blocks, persistent=False)  # (out/W, in/KW, KW/2, W, 2) bf16: `blocks_shape`
        self.onednn = onednn  # not a buffer: opaque, and no input of the compiled step
        self._blocks_address = blocks.data_ptr()  # `onednn` reads this memory: see `forward`
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, a row-major copy gathered from the blocks (for code that multiplies by the matrix
        itself: MLA's absorbed attention)."""
        return self.blocks.permute(0, 3, 1, 2, 4).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features and not torch.compiler.is_compiling():  # a prompt
            if self.blocks.data_ptr() != self._blocks_address:  # `onednn` would read freed memory
                raise RuntimeError("BlockedBf16Linear: its blocks moved after packing (`.to()`?); pack the model "
                                   "again (`litllm.cpu_layout.blocked_bf16_linears`)")
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.onednn, self.bias, "none", [], "")
        y = torch.ops.litllm_cpu.packed_bf16_linear(x, self.blocks, self.out_features)
        return y if self.bias is None else y + self.bias
