"""What the decode engine does per token around its decode step (issue #27), asserted without timing: the tensor ops
of a steady decode `step()` outside the step itself (a fixed few, whatever the number of rows, no `.item()` read and
no argmax over 16-bit logits), greedy picks equal torch's argmax, and a 16-bit prefill on a CPU without 16-bit GEMM
runs as fp32 (`litllm.cpu_layout.upcast_linear`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from litllm.engine import Engine, Request, greedy
from litllm.model import GPT


class EngineOps(TorchDispatchMode):
    """Records the aten ops dispatched while it is on, except those inside `engine._decode` (the decode step)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.inside = False
        decode = engine._decode

        def step(*args):
            self.inside = True
            try:
                return decode(*args)
            finally:
                self.inside = False

        engine._decode = step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:  # (op, the dtype of its first tensor argument)
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.ops.append((str(func.overloadpacket), None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))


MAX_OPS_PER_STEP = 8
"""The engine's own aten ops in one steady decode step (fp32 logits: 6 now: the greedy pick, the next tokens written
into the step's input, their read-back, the positions moved on; bf16 logits: 1 more, their conversion to fp32)."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_decode_step_adds_a_fixed_few_ops_around_the_step(rows, dtype):
    """A steady decode step of greedy rows (no logprobs, grammar nor sampling) dispatches a fixed few ops beyond the
    decode step, the same ones for 1 and 3 rows (nothing per row), reads no scalar back one by one (`.item()`:
    `_local_scalar_dense`), and takes its argmax over fp32 values: over 16-bit ones torch's CPU argmax is a slower
    loop (`greedy`: 193 vs 129 us for 32000 bf16 logits on cold caches on an AVX2 EPYC)."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval().to(dtype)
    counted = {}
    for n in (1, rows):
        with Engine(model, None, n, 48) as engine:
            for i in range(n):
                engine.add(Request([1, 2, 3 + i], 8))
            engine.step()  # prefill and first tokens
            engine.step()
            mode = EngineOps(engine)
            with mode:
                outputs = engine.step()
            assert [len(out.token_ids) for out in outputs] == [1] * n
        counted[n] = mode.ops
    ops = counted[rows]
    assert [op for op, _ in ops] == [op for op, _ in counted[1]] and len(ops) <= MAX_OPS_PER_STEP, ops
    names = {op for op, _ in ops}
    assert "aten._local_scalar_dense" not in names and "aten.item" not in names, ops
    assert [t for op, t in ops if op == "aten.argmax"] == [torch.float32], ops


def test_greedy_is_torchs_argmax():
    """`greedy` (16-bit logits converted to fp32 first) picks torch's argmax: the first maximum, a NaN as the maximum,
    -0.0 and 0.0 as equal, for fp32/bf16/fp16 rows of any batch shape, strided views too."""
    torch.manual_seed(0)
    cases = [torch.randn(5), torch.randn(3, 7), torch.randn(2, 3, 9).bfloat16(), torch.randn(4, 11).half(),
             torch.randn(2, 40)[:, :32], torch.tensor([[1.0, float("nan"), 3.0, float("nan")], [2.0, 5.0, 5.0, 1.0],
                                                       [-0.0, 0.0, -1.0, 0.0], [float("-inf")] * 4]),
             torch.randint(0, 3, (6, 10)).float()]  # many ties
    for logits in cases:
        picked = greedy(logits)
        assert picked.dtype == torch.long and torch.equal(picked, logits.argmax(dim=-1)), logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_16_bit_prefill_without_16_bit_gemm_runs_in_fp32(dtype, monkeypatch):
    """Where the CPU has no 16-bit GEMM (`upcast_16_bit_gemm`: torch's fallback is a scalar loop, ~9x slower than
    fp32 on an AVX2 EPYC) a `OneRowLinear` multiplies several rows in fp32: no 16-bit matmul dispatched, the result
    that of the fp32 product of the same (exact) values rounded once, by blocks of weight rows alike; elsewhere it is
    `F.linear`'s."""
    from litllm import cpu_layout
    from litllm.cpu_layout import OneRowLinear, upcast_linear

    torch.manual_seed(0)
    layer = OneRowLinear(96, 40, bias=True).to(dtype).requires_grad_(False)
    rows = torch.randn(2, 3, 96, dtype=dtype)
    fp32 = torch.nn.functional.linear(rows.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    monkeypatch.setattr(cpu_layout, "upcast_16_bit_gemm", lambda weight: True)

    class Matmuls(TorchDispatchMode):
        dtypes: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.dtypes.append(args[1].dtype)
            return func(*args, **(kwargs or {}))

    with Matmuls() as mode:
        out = layer(rows)
    assert mode.dtypes and set(mode.dtypes) == {torch.float32}
    assert out.dtype == dtype and torch.equal(out, fp32)
    monkeypatch.setattr(cpu_layout, "UPCAST_BYTES", 4 * 96 * 7)  # blocks of 7 weight rows (the last of 5)
    assert torch.equal(upcast_linear(rows, layer.weight, layer.bias), fp32)
    assert torch.equal(upcast_linear(rows, layer.weight, None), torch.nn.functional.linear(
        rows.float(), layer.weight.float()).to(dtype))
    monkeypatch.setattr(cpu_layout, "upcast_16_bit_gemm", lambda weight: False)
    assert torch.equal(layer(rows), torch.nn.functional.linear(rows, layer.weight, layer.bias))
