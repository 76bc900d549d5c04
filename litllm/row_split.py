"""The fp32 one-row matmul of a compiled CPU decode step on every thread: `litllm_cpu::row_split_linear`, a small C++
op that splits the weight's output rows into one contiguous block per thread (`at::parallel_for`) and multiplies
each block by the BLAS call `F.linear` makes (MKL's GEMV here), and `RowSplitLinear`, the Linear that calls it.

Why: MKL's fp32 GEMV, what a one-row `F.linear` (eager or compiled: inductor calls it out) runs, uses one thread
whatever torch's count, so on 2 cores a compiled fp32 step left the second one idle; inductor's own one-row
reduction (`torch.mv`, a `bmm` of one row: both lower to it on the CPU) splits the rows between threads but reads
~1.5x slower per thread (one 8-lane accumulator per row). Each block here streams its rows as fast as the whole
GEMV does, on its own core. At one thread the op is one GEMV over all rows, as `F.linear`.

The op is compiled from the C++ source below on first use (`torch.utils.cpp_extension`, ~45 CPU-s; the compiler
inductor needs anyway) into `library_folder()` (`$XDG_CACHE_HOME/litllm/extensions`, else `~/.cache/...`; one build
per machine: not inductor's cache, which tests and users point elsewhere), named by the source, torch's version and
the CPU, and loaded from there by later processes (`torch.ops.load_library`, only a library this user owns and no
one else can write). AOTInductor's saved step calls it through torch's dispatcher.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

// y (..., N) = x (..., K) @ w (N, K)^T. One row: the N output rows split into contiguous blocks of kRows, the blocks
// into one contiguous range per thread, each range one BLAS call (at::mm_out: MKL's GEMV), on w as strided (row- or
// column-major). More rows: at::linear.
at::Tensor row_split_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "row_split_linear: x has ", x.size(-1),
              " features, w is ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "row_split_linear: x is ", x.scalar_type(), ", w ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1);
  if (x.numel() != K) return at::linear(x, w);
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const at::Tensor row = x.reshape({1, K}), out = y.view({1, N});
  constexpr int64_t kRows = 64;  // block boundaries on 256 bytes of column-major weight
  // OpenMP's threads don't inherit the caller's thread-local state (inference mode, dispatch keys): mm_out on an
  // inference tensor outside inference mode fails
  const at::ThreadLocalState state;
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    const int64_t n0 = b0 * kRows, n1 = std::min(N, b1 * kRows);
    at::Tensor block = out.narrow(1, n0, n1 - n0);  // (1, n1 - n0)
    at::mm_out(block, row, w.narrow(0, n0, n1 - n0).t());
  });
  return y;
}

TORCH_LIBRARY(litllm_cpu, m) { m.def("row_split_linear(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(litllm_cpu, CPU, m) { m.impl("row_split_linear", &row_split_linear); }
"""
NAME = "litllm_cpu_ops"
FLAGS = ["-O2", "-fopenmp"]
"""The compiler's flags (`-fopenmp`: torch's `at::parallel_for` is a header template over OpenMP; without it the
loop ran on one thread)."""


def _library_name() -> str:
    """The library's file name: the source, the flags, torch's version and the CPU."""
    key = f"{SOURCE}|{FLAGS}|{torch.__version__}|{platform.machine()}|{_cpu_model()}"
    return f"{NAME}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.so"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def _trusted(path: Path) -> bool:
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def library_folder() -> Path:
    """Where the op's library is built and kept: `$XDG_CACHE_HOME/litllm/extensions`, else under `~/.cache`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litllm" / "extensions"


@lru_cache(maxsize=None)
def row_split_op() -> Optional[object]:
    """`torch.ops.litllm_cpu.row_split_linear`, its library loaded from `library_folder()` or built there first; None
    (with a one-line note) where it cannot be built or loaded here (no compiler, a foreign file...)."""
    if not hasattr(torch.ops.litllm_cpu, "row_split_linear"):
        path = library_folder() / _library_name()
        try:
            if not path.exists():
                _build(path)  # loads it too
            elif not _trusted(path):
                raise RuntimeError(f"{path} is not owned by this user, or is writable by others")
            else:
                torch.ops.load_library(str(path))
        except Exception as e:  # no compiler, a failed build, a foreign file: plain F.linear
            print(f"note: the row-split fp32 matmul is unavailable ({type(e).__name__}: {str(e)[:200]}); "
                  "the compiled step calls F.linear", file=sys.stderr)
            return None
    _register_fake()
    return torch.ops.litllm_cpu.row_split_linear


def _build(path: Path) -> None:
    """Compile `SOURCE` into the shared library at `path` (atomically: another process may build it too) and load it
    (`load_inline` does: loading the copy at `path` again would register the op twice)."""
    import tempfile

    from torch.utils.cpp_extension import load_inline

    from litllm.utils import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as build:
        load_inline(NAME, cpp_sources=[SOURCE], is_python_module=False,
                    extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
        with atomic_path(path) as tmp:
            tmp.write_bytes((Path(build) / f"{NAME}.so").read_bytes())
            tmp.chmod(0o755)


@lru_cache(maxsize=None)
def _register_fake() -> None:
    """The op's shapes for tracing (`torch.export`, `torch.compile`)."""
    @torch.library.register_fake("litllm_cpu::row_split_linear")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], w.size(0))


class RowSplitLinear(torch.nn.Linear):
    """An fp32 CPU Linear whose one-row calls (decoding) run `litllm_cpu::row_split_linear` (every thread streams its
    own block of the weight's rows); more rows go through `F.linear`. The weight is used as it is laid out (row- or
    column-major); for a compiled step (`row_split_linears`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return super().forward(x)
        y = torch.ops.litllm_cpu.row_split_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def becomes_row_split(module) -> bool:
    """Does `row_split_linears` make `module` a `RowSplitLinear`: a plain fp32 CPU Linear (a Parameter weight, not a
    quantized tensor subclass), or one already."""
    if isinstance(module, RowSplitLinear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and type(weight) is torch.nn.Parameter and weight.device.type == "cpu"
            and weight.dtype == torch.float32)


def wants_row_split() -> bool:
    """Do fp32 compiled steps here take `RowSplitLinear`s: more than one thread to split the rows between (torch's
    thread budget)."""
    return torch.get_num_threads() > 1


def row_split_linears(model) -> bool:
    """Every plain fp32 CPU Linear of `model` (`becomes_row_split`; a head tied to the embedding too) as a
    `RowSplitLinear` on the same tensors, where the op builds or loads (`row_split_op`); whether it did."""
    targets = [(module, name, child) for module in list(model.modules())
               for name, child in list(module.named_children())
               if type(child) is not RowSplitLinear and becomes_row_split(child)]
    if not targets or row_split_op() is None:
        return False
    for module, name, child in targets:
        split = RowSplitLinear(child.in_features, child.out_features, bias=False, device="meta")
        split.weight, split.bias = child.weight, child.bias  # the same Parameters: ties stay
        setattr(module, name, split)
    return True
