"""bf16 weights held once, in oneDNN's packed layout, for a compiled CPU run (`litllm.packed_bf16.BlockedBf16Linear`):
the one-row op on those bytes equals the bf16 matmul, a prompt's GEMM is the eager `PackedLinear`'s, and a compiled
step over them decodes the eager engine's greedy tokens and is saved under the key it is looked up by."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_compile_decode import greedy_tokens

from litllm.cpu_layout import PackedLinear
from litllm.engine import Engine
from litllm.model import GPT
from litllm.packed_bf16 import BF16_BLOCKS, BlockedBf16Linear, blocks_shape, onednn_bf16_blocks, packed_bf16_op


@pytest.fixture(scope="module")
def op():
    found = packed_bf16_op()
    if found is None:
        pytest.skip("the packed bf16 op does not run here (no AVX512-BF16, or no C++ compiler)")
    return found


def _bf16_config(**overrides):  # whole 64 x 64 blocks in every Linear
    return tiny_config(**{"n_embd": 64, "n_head": 4, "n_query_groups": 4, "intermediate_size": 128, **overrides})


def test_packed_bf16_op_equals_the_bf16_matmul(op, threads):
    """One row and a batch of decode rows (2, 3 and 7: tiles of 4 and 2 rows and a last single one) on oneDNN's
    packed bytes: the fp32 sums of the bf16 products, rounded once to bf16 (within one bf16 rounding of the exact
    product); a prompt through the module is the eager `PackedLinear`'s oneDNN GEMM on the same packed weight, bit for
    bit."""
    torch.manual_seed(0)
    for n_out, n_in in ((64, 64), (192, 128), (1024, 256)):
        linear = torch.nn.Linear(n_in, n_out, bias=True, dtype=torch.bfloat16)
        blocks, onednn = onednn_bf16_blocks(linear.weight)
        assert blocks.shape in [blocks_shape(n_out, n_in, block) for block in BF16_BLOCKS]
        module = BlockedBf16Linear(n_in, n_out, blocks, onednn, linear.bias)
        assert torch.equal(module.weight, linear.weight)  # what MLA's absorbed attention multiplies by
        with torch.inference_mode():
            for shape in ((1, 1, n_in), (2, 1, n_in), (3, 1, n_in), (7, 1, n_in)):
                x = torch.randn(shape, dtype=torch.bfloat16)
                exact = F.linear(x.double(), linear.weight.double())
                got = op(x, blocks, n_out)
                assert got.shape == (*shape[:-1], n_out) and got.dtype == torch.bfloat16
                assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()
                assert torch.equal(module(x), (got + linear.bias) if x.numel() == n_in else module(x))
            prompt = torch.randn(1, 7, n_in, dtype=torch.bfloat16)
            assert torch.equal(module(prompt), PackedLinear(linear)(prompt))
    with pytest.raises(RuntimeError, match="packed_bf16_linear"):
        op(torch.randn(1, 96, dtype=torch.bfloat16), blocks, 1024)  # 96 features: not the weight's


def _blocks_by_hand(weight: torch.Tensor, block: tuple[int, int, int]) -> torch.Tensor:
    """A bf16 (out, in) weight laid out in `block`'s layout by hand, zero-padded to whole blocks."""
    (n_out, n_in), (pairs, width, _) = weight.shape, block
    shape = blocks_shape(n_out, n_in, block)
    padded = torch.zeros(shape[0] * width, shape[1] * 2 * pairs, dtype=torch.bfloat16)
    padded[:n_out, :n_in] = weight
    # (out/W, W, in/KW, KW/2, 2) -> (out/W, in/KW, KW/2, W, 2)
    return padded.view(shape[0], width, shape[1], pairs, 2).permute(0, 2, 3, 1, 4).contiguous()


@pytest.mark.parametrize("block", BF16_BLOCKS)
def test_packed_bf16_op_reads_each_blocking(op, block):
    """Both blockings oneDNN packs bf16 weights in (AVX512-BF16's 64 x 64 and AMX's 32 x 32 blocks), whichever this
    CPU's oneDNN uses: a weight laid out in `block` by hand, zero-padded to whole blocks (outputs and inputs that are
    not multiples of the block), times one row and a batch of 3, within one bf16 rounding of the exact product."""
    torch.manual_seed(0)
    pairs, width, _ = block
    for n_out, n_in in ((width, 2 * pairs), (3 * width + 5, 2 * pairs + 7), (200, 300)):
        weight = torch.randn(n_out, n_in).to(torch.bfloat16)
        blocks = _blocks_by_hand(weight, block)
        for rows in (1, 3):
            x = torch.randn(rows, n_in).to(torch.bfloat16)
            exact = F.linear(x.double(), weight.double())
            got = op(x, blocks, n_out)
            assert got.shape == (rows, n_out)
            assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()


@pytest.mark.parametrize("block", BF16_BLOCKS)
def test_packed_bf16_op_rounds_exact_sums_to_nearest_even(op, block, threads):
    """Each thread rounds its own outputs to bf16: on small integers, whose products and sums fp32 holds exactly, the
    op's output is the exact product rounded once to nearest even (sums above 256 need rounding), bit for bit, for
    one row and batches (tiles of 4 and 2 rows, a last single one), output counts that end inside a group (masked
    stores) and inputs that end inside a block (zero-padded rows) or not (read in place)."""
    torch.manual_seed(0)
    pairs, width, _ = block
    for n_out, n_in in ((width + 3, 2 * pairs), (5 * width + 17, 4 * pairs), (3 * width - 1, 2 * pairs + 7)):
        weight = torch.randint(-8, 9, (n_out, n_in)).to(torch.bfloat16)
        blocks = _blocks_by_hand(weight, block)
        for rows in (1, 3, 6):  # 6: a tile of 4 rows, then of 2
            x = torch.randint(-8, 9, (rows, 1, n_in)).to(torch.bfloat16)
            exact = F.linear(x.double(), weight.double())  # integers below 2^24: exact in fp32 too
            assert torch.equal(op(x, blocks, n_out), exact.float().to(torch.bfloat16))


def test_only_whole_blocks_of_untied_bf16_weights_are_packed(op):
    """A tied head keeps the embedding's row-major weight (`OneRowLinear`), fp32 weights and Linears of partial blocks
    stay as they are."""
    from litllm.compile_decode import unpack_weights
    from litllm.cpu_layout import OneRowLinear

    model = GPT(_bf16_config(tie_embeddings=True)).to(torch.bfloat16).eval()
    unpack_weights(model)
    assert type(model.lm_head) is OneRowLinear and model.lm_head.weight is model.wte.weight
    assert all(type(m) is BlockedBf16Linear for m in model.blocks.modules() if hasattr(m, "in_features"))
    odd = GPT(_bf16_config(intermediate_size=80)).to(torch.bfloat16).eval()
    unpack_weights(odd)
    assert type(odd.blocks[0].mlp.proj) is OneRowLinear and type(odd.blocks[0].attn.qkv) is BlockedBf16Linear


def test_a_packed_linear_whose_blocks_moved_refuses_prompts(op):
    """oneDNN's view reads the blocks' memory: after a move (a copy by `.to()` / `_apply`) a prompt is refused with a
    clear error instead of reading freed memory; before it, prompt rows equal one-row calls' (the same bytes)."""
    from litllm.compile_decode import unpack_weights

    model = GPT(_bf16_config()).to(torch.bfloat16).eval()
    unpack_weights(model)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(3, qkv.in_features).to(torch.bfloat16)
    with torch.no_grad():
        rows = torch.cat([qkv(x[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(qkv(x).float(), rows.float(), atol=2e-2, rtol=2e-2)
        qkv._apply(lambda t: t.clone())
        with pytest.raises(RuntimeError, match="blocks moved"):
            qkv(x)


def test_the_eager_packed_bf16_layout_decodes_as_onednn_packed(op, monkeypatch):
    """The eager "packed-bf16" layout (`optimize_for_decoding`: `BlockedBf16Linear`s, a tied head left row-major):
    a prompt's logits are the oneDNN-packed layout's bit for bit (the same GEMM on the same bytes), a decode step's
    within bf16's rounding, and the KV-cache engine decodes the same greedy tokens. Where the op does not run, the
    layout is refused by name."""
    from litllm.cpu_layout import optimize_for_decoding
    from litllm.errors import LitLLMError

    torch.manual_seed(0)
    state = GPT(_bf16_config()).to(torch.bfloat16).state_dict()

    def model(layout):
        fresh = GPT(_bf16_config()).to(torch.bfloat16).eval()
        fresh.load_state_dict(state)
        assert optimize_for_decoding(fresh, layout=layout) == layout
        return fresh

    packed, blocked = model("onednn-packed"), model("packed-bf16")
    assert all(type(m) is BlockedBf16Linear for m in blocked.modules() if hasattr(m, "in_features"))
    assert optimize_for_decoding(blocked) == "packed-bf16"  # already done
    ids = torch.tensor([list(range(1, 9))])
    with torch.inference_mode():
        for m in (packed, blocked):
            m.set_kv_cache(1, 16)
        prompt = [m.decode(ids, torch.arange(8)[None], kv_len=8) for m in (packed, blocked)]
        assert torch.equal(*prompt)
        token, pos = prompt[0][:, -1:].argmax(-1), torch.tensor([[8]])
        step = [m.decode(token, pos, kv_len=9).float() for m in (packed, blocked)]
        torch.testing.assert_close(step[1], step[0], atol=2e-2 * step[0].abs().max(), rtol=0)
    greedy = [greedy_tokens(Engine(model(layout), None, 1, 64, threads=1), list(range(1, 9)))
              for layout in ("onednn-packed", "packed-bf16")]
    assert greedy[0] == greedy[1]
    monkeypatch.setenv("LITLLM_PACKED_BF16", "0")
    with pytest.raises(LitLLMError, match="packed-bf16"):
        model("packed-bf16")


def test_the_timed_layout_pick_tries_packed_bf16_only_where_the_op_is_built(op, monkeypatch):
    """`optimize_for_decoding` times "packed-bf16" beside the other layouts where the op's library is built already;
    where it is not, it neither builds it (an eager run does not wait for that) nor picks the layout."""
    from litllm import cpu_layout, packed_bf16

    made = []
    layout = cpu_layout.LAYOUTS["packed-bf16"]
    monkeypatch.setitem(cpu_layout.LAYOUTS, "packed-bf16", lambda linear: made.append(1) or layout(linear))
    cpu_layout.optimize_for_decoding(GPT(_bf16_config()).to(torch.bfloat16).eval())
    assert made
    made.clear()
    monkeypatch.setattr(packed_bf16, "library_built", lambda: False)
    assert cpu_layout.optimize_for_decoding(GPT(_bf16_config()).to(torch.bfloat16).eval()) != "packed-bf16"
    assert not made


@pytest.mark.slow
def test_a_compiled_bf16_step_on_packed_weights_decodes_as_eager_and_is_saved(op, monkeypatch, tmp_path):
    """The eager engine (oneDNN-packed `PackedLinear`s) and the compiled one (`BlockedBf16Linear`s on the same packed
    bytes, AOTInductor) decode the same greedy tokens from the same prompt, as the eager "packed-bf16" layout
    (`BlockedBf16Linear`s eagerly) does; the step is saved under the key a fresh model looks it up by before it is
    unpacked, in either eager layout, and loads."""
    from litllm.compile_decode import load_saved_step, saved_step_length, steps_folder, unpack_weights
    from litllm.cpu_layout import optimize_for_decoding

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    state = GPT(_bf16_config()).to(torch.bfloat16).state_dict()

    def model(layout="onednn-packed"):
        fresh = GPT(_bf16_config()).to(torch.bfloat16).eval()
        fresh.load_state_dict(state)
        optimize_for_decoding(fresh, layout=layout)
        return fresh

    def decode(engine):
        return greedy_tokens(engine, list(range(1, 9)))

    eager = decode(Engine(model(), None, 1, 64, threads=1))
    compiled = Engine(model(), None, 1, 64, threads=1, compile=True)
    assert isinstance(compiled.model.blocks[0].attn.qkv, BlockedBf16Linear)
    assert decode(compiled) == eager and compiled.step_source == "compiled"
    assert decode(Engine(model("packed-bf16"), None, 1, 64, threads=1)) == eager
    fresh = model()
    folder = steps_folder(fresh)
    assert steps_folder(model("packed-bf16")) == folder
    assert saved_step_length(fresh, 1, 64) == 64
    unpack_weights(fresh)
    assert steps_folder(fresh) == folder
    engine = Engine(fresh, None, 1, 64, threads=1)
    assert load_saved_step(engine) and engine.step_source == "loaded"
    assert decode(engine) == eager
