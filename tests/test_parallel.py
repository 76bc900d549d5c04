"""Tensor-parallel inference (`--devices N`, `litllm.parallel`) on the CPU over gloo: 2 processes give the same
tokens as 1 for `LLM`, `generate`, `chat`, `serve` and `evaluate`; each rank holds ~1/N of the weights and KV
cache; head counts that don't divide are refused; a rank that dies ends the run with one line.

The oracle is the single-process run (itself checked against transformers elsewhere); multi-process tests
spawn 2 ranks, so each shares one run across its assertions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import litllm_in_process, make_converted_checkpoint
import test_evaluate
from test_evaluate import GEN_TASK, MC_TASK, PPL_TASK

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), LITLLM_TP_TIMEOUT="60")
tasks_dir = test_evaluate.tasks_dir  # its lm-eval tasks over local files (a fixture)


def litllm(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litllm", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------------- the plan (no processes)
def test_fused_layers_split_piece_by_piece():
    from litllm.config import Config
    from litllm.parallel.plan import local_slices, shard_pieces

    c = Config(n_embd=64, n_head=8, n_query_groups=2, head_size=8, intermediate_size=96, padded_vocab_size=320,
               mlp_class_name="GatedMLP")
    qkv = shard_pieces("blocks.0.attn.qkv.weight", c, 2)
    assert qkv == (0, (64, 16, 16))
    # rank 1: its 4 query heads, then its key head, then its value head
    assert local_slices(qkv, 1, 2) == (0, [slice(32, 64), slice(72, 80), slice(88, 96)])
    assert local_slices(shard_pieces("blocks.1.mlp.fc.weight", c, 2), 0, 2) == (0, [slice(0, 48), slice(96, 144)])
    assert shard_pieces("blocks.1.mlp.proj.weight", c, 2) == (1, (96,))
    assert shard_pieces("blocks.1.attn.proj.bias", c, 2) is None  # added once, after the all-reduce
    assert shard_pieces("blocks.1.norm_1.weight", c, 2) is None
    assert shard_pieces("lm_head.weight", c, 2) == (0, (320,))
    assert shard_pieces("lm_head.weight", c, 3) is None  # 320 rows don't split in 3: replicated
    # Llama 4: its dense layers and experts are gated too
    llama4 = Config(n_embd=64, n_head=4, intermediate_size=112, mlp_class_name="Llama4MoE", n_expert=4,
                    n_expert_per_token=1, moe_intermediate_size=32, n_shared_expert=1, dense_mlp_layers=[0])
    assert shard_pieces("blocks.0.mlp.fc.weight", llama4, 2) == (0, (112, 112))
    assert shard_pieces("blocks.1.mlp.experts.3.fc.weight", llama4, 2) == (0, (32, 32))


def test_indivisible_heads_are_refused_in_one_line():
    from litllm.config import Config
    from litllm.errors import LitLLMError
    from litllm.parallel.plan import check_divisible

    c = Config(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)
    check_divisible(c, 2)
    with pytest.raises(LitLLMError, match=r"^--devices 4: .*n_query_groups \(key/value heads\) 2, not divisible "
                                          r"by 4: pick a divisor of 2$"):
        check_divisible(c, 4)


def test_mla_sinks_and_stacked_experts_split_by_heads_and_hidden_units():
    from litllm.config import Config
    from litllm.parallel.plan import local_slices, rank0_only, shard_pieces

    # tests/hf_models.py's tiny DeepSeek-V2 (no query latent): heads of 24 = 16 nope + 8 rope, values of 12,
    # a latent of 16
    mla = Config(n_embd=64, n_head=4, n_query_groups=4, head_size=24, kv_lora_rank=16, qk_rope_head_dim=8,
                 v_head_dim=12, intermediate_size=96, mlp_class_name="MoE", n_expert=8, n_expert_per_token=2,
                 moe_intermediate_size=32, n_shared_expert=2, padded_vocab_size=320)
    assert shard_pieces("blocks.1.attn.q.weight", mla, 2) == (0, (4 * 24,))
    assert local_slices(shard_pieces("blocks.1.attn.kv_b.weight", mla, 2), 1, 2) == (0, [slice(56, 112)])  # 2 heads
    assert shard_pieces("blocks.1.attn.proj.weight", mla, 2) == (1, (4 * 12,))
    for replicated in ("attn.q_a.weight", "attn.kv_a.weight", "attn.kv_norm.weight", "mlp.router.weight"):
        assert shard_pieces(f"blocks.1.{replicated}", mla, 2) is None
    assert shard_pieces("blocks.1.mlp.shared_experts.fc.weight", mla, 2) == (0, (64, 64))  # 2 shared experts of 32
    assert shard_pieces("blocks.1.mlp.experts.7.proj.weight", mla, 2) == (1, (32,))
    # gpt-oss: sinks with their heads; stacked experts (E, C, 2I) by columns (gate/up pairs stay together)
    oss = Config(n_embd=64, n_head=4, n_query_groups=2, head_size=16, attention_sinks=True, mlp_class_name="MoE",
                 n_expert=4, n_expert_per_token=2, intermediate_size=32, swiglu_limit=7.0, padded_vocab_size=320)
    assert local_slices(shard_pieces("blocks.0.attn.sinks", oss, 2), 1, 2) == (0, [slice(2, 4)])
    assert local_slices(shard_pieces("blocks.0.mlp.experts.gate_up.weight", oss, 2), 1, 2) == (2, [slice(32, 64)])
    assert shard_pieces("blocks.0.mlp.experts.gate_up.bias", oss, 2) == (1, (64,))
    assert shard_pieces("blocks.0.mlp.experts.down.weight", oss, 2) == (1, (32,))
    down_bias = "blocks.0.mlp.experts.down.bias"  # added in each rank's partial sum: rank 0's alone
    assert shard_pieces(down_bias, oss, 2) is None and rank0_only(down_bias)


def test_layers_the_plan_does_not_cover_are_refused_in_one_line():
    from litllm.adapter import add_adapter
    from litllm.config import Config
    from litllm.errors import LitLLMError
    from litllm.model import GPT
    from litllm.parallel.plan import check_supported

    config = Config(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, block_size=64, padded_vocab_size=320,
                    mlp_class_name="GatedMLP", intermediate_size=32)
    with torch.device("meta"):
        model = add_adapter(GPT(config), adapter_start_layer=1)  # LLaMA-Adapter's prefix: not split
    with pytest.raises(LitLLMError, match=r"^--devices 2: tensor parallelism does not cover block 1's attention "
                                          r"\(CausalSelfAttention with an adapter\)$"):
        check_supported(model, 2)


def collectives_of(run) -> list[str]:
    """The c10d functional collectives `run()` issues, in order (their waits left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            if op.namespace == "_c10d_functional" and "wait" not in op.__name__:
                calls.append(op.__name__.split(".")[0])
            return op(*args, **(kwargs or {}))

    with Spy():
        run()
    return calls


@pytest.fixture
def one_rank(tiny_checkpoint, tmp_path):
    """The tiny Llama as rank 0 of a 1-rank tensor-parallel group, in this process."""
    import torch.distributed as dist

    from litllm.parallel.loading import load_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield load_shard(tiny_checkpoint, 0, 1, "cpu", torch.float32)
    finally:
        dist.destroy_process_group()


def test_a_rank_decodes_on_plain_tensors_with_two_all_reduces_per_layer(one_rank, tiny_checkpoint):
    """A rank's model (one rank of 1, in this process) holds plain tensors, no DTensor, and a forward
    communicates only through its layers' collectives: one all-reduce for the embedding, two per block, one
    gather of the head's logits; its logits are the unsharded model's, bit for bit."""
    from litllm.inference import load_for_inference

    model = one_rank
    assert all(type(p.data) is torch.Tensor for p in model.parameters())
    idx = torch.tensor([[1, 5, 9, 300]])
    out = {}
    with torch.inference_mode():
        calls = collectives_of(lambda: out.update(logits=model(idx)))
    assert calls == ["all_reduce"] * (1 + 2 * model.config.n_layer) + ["all_gather_into_tensor"]
    with torch.inference_mode():
        assert torch.equal(out["logits"], load_for_inference(tiny_checkpoint, "cpu", "32-true")(idx))


def test_a_compiled_rank_step_is_one_graph_with_the_same_collectives(one_rank):
    """What torch.compile hands inductor for a rank's decode step (after the CPU weight layout and a compiled step's
    Linears: bf16 ones become `OneRowLinear`s, new modules) is one graph, without breaks, issuing the eager step's
    collectives in the same order; run, it gives the eager step's logits within bf16 rounding (an eager 16-bit step
    attends through SDPA's kernel, a traced one through its bmms: `single_query_attention`)."""
    from litllm.compile_decode import unpack_weights
    from litllm.compile_ledger import choose_decode_layout

    model = one_rank.to(torch.bfloat16)
    choose_decode_layout(model, None)
    unpack_weights(model)
    model.set_kv_cache(1, 32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(node.target).split(".")[1] for node in gm.graph.nodes if node.op == "call_function"
                       and "_c10d_functional" in str(node.target) and "wait" not in str(node.target)])
        return gm.forward

    def step(tokens, pos):
        return model.decode(tokens, input_pos=pos)[:, -1]

    tokens, pos = torch.tensor([[7]]), torch.tensor([[3]])
    with torch.inference_mode():
        eager_calls = collectives_of(lambda: step(tokens, pos))
        eager = step(tokens, pos)
        compiled = torch.compile(step, backend=backend, dynamic=False)(tokens, pos)
    assert len(graphs) == 1 and graphs[0] == eager_calls
    assert eager_calls == ["all_reduce"] * (1 + 2 * model.config.n_layer) + ["all_gather_into_tensor"]
    torch.testing.assert_close(compiled.float(), eager.float(), atol=2e-2, rtol=2e-2)


def test_a_shards_linears_say_their_own_sizes(one_rank):
    """After `parallelize`, each Linear's in/out features are its shard's (rank 1 of 2 here), not the full model's:
    the CPU layouts a compiled step takes build from them (a bf16 `BlockedBf16Linear` of the full size failed)."""
    from litllm.model import GPT
    from litllm.parallel.layers import _group
    from litllm.parallel.plan import parallelize

    with torch.device("meta"):
        model = GPT(one_rank.config)
    ranks_group = dict(_group)
    try:
        parallelize(model, 1, 2)
    finally:
        _group.update(ranks_group)  # (the process's collectives stay one_rank's)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all((m.out_features, m.in_features) == tuple(m.weight.shape) for m in linears)
    assert model.blocks[0].attn.qkv.out_features == one_rank.blocks[0].attn.qkv.out_features // 2


def test_a_compiled_step_issues_its_collectives_in_its_own_group(one_rank):
    """A rank's traced step (what AOTInductor saves) runs its collectives in the step's own process group, eager
    forwards (and the engine's broadcasts) in the run's: on gloo a saved step sharing the run's group deadlocked
    (`litllm.parallel.layers.step_group`)."""
    import torch.distributed as dist

    from litllm.parallel.layers import _group

    model = one_rank
    model.set_kv_cache(1, 32)
    groups = []

    def backend(gm, example_inputs):
        groups.extend(node.args[-1] for node in gm.graph.nodes
                      if "_c10d_functional" in str(node.target) and "wait" not in str(node.target))
        return gm.forward

    with torch.inference_mode():
        torch.compile(lambda t, p: model.decode(t, input_pos=p), backend=backend)(torch.tensor([[7]]),
                                                                                     torch.tensor([[3]]))
    assert _group["name"] == dist.group.WORLD.group_name != _group["step"] == model.tp_step_group
    assert groups and set(groups) == {_group["step"]}


def test_sequential_placement_puts_consecutive_blocks_on_consecutive_devices():
    from litllm.errors import LitLLMError
    from litllm.parallel.plan import layer_placement

    assert layer_placement(5, ["cuda:0", "cuda:1"]) == ["cuda:0"] * 3 + ["cuda:1"] * 2
    assert layer_placement(4, list("abcd")) == list("abcd")
    with pytest.raises(LitLLMError, match="4 devices but only 2 blocks"):
        layer_placement(2, list("abcd"))


def test_bad_devices_fail_before_starting_anything(tiny_checkpoint):
    proc = litllm("generate", str(tiny_checkpoint), "--device", "cpu", "--devices", "3", timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("error: --devices 3: ") and "not divisible by 3" in lines[-1]
    assert "rank" not in proc.stderr.decode()  # refused before any worker started
    proc = litllm("generate", str(tiny_checkpoint), "--device", "cpu", "--devices", "2", "--quantize", "bnb.nf4",
                  timeout=120)
    refusal = proc.stderr.decode().strip().splitlines()[-1]
    assert proc.returncode == 1 and refusal.startswith("error: --quantize bnb.nf4 with --devices 2: ")
    assert "bitsandbytes" in refusal and "drop --quantize" in refusal and "rank" not in proc.stderr.decode()
    proc = litllm("generate", str(tiny_checkpoint), "--device", "cpu", "--devices", "1", "--num_nodes", "2",
                  timeout=120)
    assert proc.returncode == 1 and "error: --num_nodes 2: start the command on every node with torchrun or srun" \
        in proc.stderr.decode()


# ---------------------------------------------------------------------- LLM: 1 process vs 2
FAMILIES = ["llama", pytest.param("qwen3", marks=pytest.mark.slow), pytest.param("mixtral", marks=pytest.mark.slow)]
# multi-head latent attention (with and without a query latent) and DeepSeek's grouped router with shared experts;
# gpt-oss's sinks and stacked, biased experts; Llama 4's input-scaled experts and shared expert beside dense layers.
# (GLM-4.5 is the grouped router under plain attention: pieces these runs already split the same way.)
MORE_FAMILIES = [pytest.param(family, marks=pytest.mark.slow)
                 for family in ("deepseek_v3", "deepseek_v2", "gpt_oss", "llama4")]


@pytest.fixture(scope="module")
def all_llm_runs(request, tmp_path_factory) -> dict:
    """{family: its runs, or the error that stopped the launch before it} for every family the session's selected
    tests ask `llm_runs` for, from one launch of tests/parallel_check.py (the families one after the other)."""
    from parallel_check import MARK

    families = list(dict.fromkeys(item.callspec.params["llm_runs"] for item in request.session.items
                                  if "llm_runs" in getattr(item, "fixturenames", ())))
    folders = {family: tiny_checkpoint_of(family, tmp_path_factory) for family in families}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_check.py"), *map(str, folders.values())],
                          capture_output=True, timeout=300 + 150 * len(families), env=ENV)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    done = {json.loads(line)["checkpoint"]: json.loads(line) for line in stdout.splitlines() if line.startswith("{")}
    # what the process printed on stderr while each checkpoint ran (rank 0 marks where each one starts)
    printed = dict(part.split("\n", 1) for part in stderr.split(MARK)[1:] if "\n" in part)
    runs = {}
    for family, folder in folders.items():
        if str(folder) in done:
            runs[family] = dict(done[str(folder)], stderr=printed.get(str(folder), ""), folder=folder)
        else:
            runs[family] = f"parallel_check.py exited with {proc.returncode} before {family} was done:\n" \
                           f"{stderr[-3000:]}"
    return runs


@pytest.fixture(scope="module", params=FAMILIES + MORE_FAMILIES)
def llm_runs(request, all_llm_runs):
    """{"single": ..., "sharded": ...}: the same LLM calls on 1 and on 2 ranks (tests/parallel_check.py)."""
    runs = all_llm_runs[request.param]
    assert isinstance(runs, dict), runs
    return runs


_folders: dict[str, Path] = {}


def tiny_checkpoint_of(family: str, tmp_path_factory) -> Path:
    """A tiny converted model of `family`, made once per test session."""
    if family not in _folders:
        _folders[family] = make_converted_checkpoint(tmp_path_factory.mktemp(f"tp_{family}"), family)
    return _folders[family]


@pytest.fixture(params=FAMILIES)
def folder(request, tiny_checkpoint, tmp_path_factory) -> Path:
    """The shared tiny Llama, a tiny Qwen3 or a tiny Mixtral (one per family and session)."""
    return tiny_checkpoint if request.param == "llama" else tiny_checkpoint_of(request.param, tmp_path_factory)


@pytest.mark.parametrize("call", ["greedy", "batch", "seeded", "seeded_batch", "stream", "chat", "json"])
def test_two_ranks_give_the_same_tokens_as_one(llm_runs, call):
    assert llm_runs["sharded"][call] == llm_runs["single"][call]
    assert llm_runs["single"][call]  # something was generated


def test_a_plain_forward_is_broadcast_too(llm_runs):
    torch.testing.assert_close(torch.tensor(llm_runs["sharded"]["logits"]), torch.tensor(llm_runs["single"]["logits"]))


# what every rank holds whole: norms, routers (and their biases), biases added after an all-reduce (or, for
# gpt-oss's stacked experts, held by rank 0), MLA's low-rank down-projections
REPLICATED = re.compile(r"norm|\.router\.|\.q_a\.|\.kv_a\.|proj\.bias|\.down\.bias")


def test_each_rank_holds_half_the_weights_and_kv_cache(llm_runs):
    one, two = llm_runs["single"]["bytes"], llm_runs["sharded"]["bytes"]
    replicated = sum(size for name, size in llm_runs["single"]["sizes"].items() if REPLICATED.search(name))
    assert two["replicated"] == replicated > 0
    assert two["weights"] == (one["weights"] - replicated) // 2 + replicated
    mla = any(".kv_b." in name for name in llm_runs["single"]["sizes"])
    assert two["kv_cache"] * (1 if mla else 2) == one["kv_cache"] > 0  # MLA: every rank caches the whole latent
    assert "Tensor parallel over 2 ranks: each holds" in llm_runs["stderr"]


def test_estimate_gives_what_a_rank_holds(llm_runs):
    """`litllm estimate serve --devices 2` sizes one rank: its weights and KV cache as measured on a real rank."""
    from litllm.config import Config
    from litllm.estimate import fake_decode

    config = Config.from_checkpoint(llm_runs["folder"])
    two = fake_decode(config, "32-true", None, 2, 32, 31, None, devices=2)
    one = fake_decode(config, "32-true", None, 2, 32, 31, None)
    assert two["kv_cache"] == llm_runs["sharded"]["bytes"]["kv_cache"]
    # the estimate's weights also count the buffers, the same on every rank: the RoPE tables and a grouped
    # router's correction bias (fp32)
    buffers = one["weights"] - llm_runs["single"]["bytes"]["weights"]
    moe_layers = sum(config.is_moe(i) for i in range(config.n_layer))
    assert buffers == 2 * 32 * config.rope_n_elem * 4 + config.moe_correction_bias * moe_layers * config.n_expert * 4
    assert two["weights"] - buffers == llm_runs["sharded"]["bytes"]["weights"]


def test_estimate_cli_per_device_and_more_devices_as_a_fix(tiny_checkpoint):
    proc = litllm("estimate", "serve", str(tiny_checkpoint), "--max_batch_size", "4", "--max_seq_length", "64",
                  "--precision", "32-true", "--devices", "2", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    two = json.loads(proc.stdout)
    proc = litllm("estimate", "serve", str(tiny_checkpoint), "--max_batch_size", "4", "--max_seq_length", "64",
                  "--precision", "32-true", "--device_memory", "0.4MB", timeout=120)
    assert "--devices 2 (tensor parallel)" in proc.stdout.decode()
    assert two["world_size"] == 2 and two["strategy"] == "tensor"
    assert two["breakdown"]["kv_cache"] == 2 * 2 * 4 * 1 * 64 * 16 * 4  # 2 layers x k,v x 4 slots x 1 of 2 kv heads
    proc = litllm("estimate", "serve", str(tiny_checkpoint), "--devices", "3", timeout=120)
    assert proc.returncode == 1 and proc.stderr.decode().startswith("error: --devices 3: ")


# ---------------------------------------------------------------------- the commands
def reference_generate(checkpoint: Path, prompt: str, n: int, **flags) -> str:
    import contextlib
    import io

    from litllm.generate import generate

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        generate(checkpoint, prompt=prompt, max_new_tokens=n, device="cpu", precision="32-true", **flags)
    return out.getvalue()


def test_generate_on_two_ranks(folder):
    args = ["--max_new_tokens", "12", "--num_samples", "2", "--temperature", "0.9", "--seed", "11"]
    proc = litllm("generate", str(folder), "--prompt", "Tell me about llamas", "--device", "cpu",
                  "--devices", "2", *args)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    expected = reference_generate(folder, "Tell me about llamas", 12, num_samples=2, temperature=0.9, seed=11)
    assert proc.stdout.decode() == expected
    assert "Tensor parallel over 2 ranks: each holds" in proc.stderr.decode()


def test_compiled_decode_on_two_ranks_gives_the_unsharded_eager_tokens(tiny_checkpoint, tmp_path):
    """`--compile true` with `--devices 2`: each rank compiles its own decode step (collectives inside) ahead of time
    and saves it, and the greedy tokens are one device's eager ones; a second run loads the saved steps (no
    compile) and gives them again, decoding long enough that the deadlock the saved steps once hit on gloo
    (`litllm.parallel.layers.step_group`: after a few tokens) would show."""
    n = 40
    args = ["--prompt", "Tell me about llamas", "--max_new_tokens", str(n), "--temperature", "0", "--device", "cpu"]
    # each rank compiles its own step at once: under load one may finish minutes after the other, which waits
    env = dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), LITLLM_TP_TIMEOUT="600")
    expected = reference_generate(tiny_checkpoint, "Tell me about llamas", n, temperature=0, compile=False)
    for says in ("Compiled the decode step", "Loaded the saved compiled decode step"):
        proc = subprocess.run([sys.executable, "-m", "litllm", "generate", str(tiny_checkpoint), *args, "--devices",
                               "2", "--compile", "true"], capture_output=True, timeout=400, env=env)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert says in proc.stderr.decode()
        assert proc.stdout.decode() == expected
        saved = sorted((tmp_path / "cache" / "decode_steps").glob("*/*.pt2"))
        assert len(saved) == 2  # one step per rank (its place is in the folder's key), saved by the first run
        if says.startswith("Compiled"):
            written = [path.stat().st_mtime_ns for path in saved]
    assert [path.stat().st_mtime_ns for path in saved] == written  # the second run loaded them, wrote nothing
    # each rank laid its shard out and recorded it under its own place (world size, rank, its step's group)
    choices = json.loads((tmp_path / "cache" / "decode_choices.json").read_text())
    assert sorted(part for key in choices for part in key.split("|") if part.startswith("tensor parallel")) == [
        "tensor parallel rank 0 of 2, group 1", "tensor parallel rank 1 of 2, group 1"]


@pytest.mark.parametrize("slow_rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_rank_that_compiles_longer_than_the_timeout_is_waited_for(tiny_checkpoint, tmp_path, slow_rank):
    """Each rank builds its own compiled step, and under load one may finish minutes after the other: the first waits
    at the group's store, not in a collective whose `LITLLM_TP_TIMEOUT` (here 10 s) it would pass (before, the run
    stopped: "lost a peer"). Under torchrun every rank runs this script, whose step "compiles" (the eager step,
    collectives inside) 25 s longer on `slow_rank`; the greedy tokens are one device's eager ones."""
    script = (
        "import os, time\n"
        "from litllm import LLM, compile_decode\n"
        "def slow_compile(engine):\n"
        f"    if int(os.environ['RANK']) == {slow_rank}:\n"
        "        time.sleep(25)\n"
        "    engine.step_source = 'compiled'\n"
        "    return engine._decode_logits\n"
        "compile_decode.compile_engine_step = slow_compile\n"
        f"llm = LLM.load({str(tiny_checkpoint)!r}, device='cpu', devices=2)\n"
        "llm.compile = True\n"
        "print(llm.generate('Tell me about llamas', max_new_tokens=12), flush=True)\n"
    )
    (tmp_path / "run.py").write_text(script)
    env = dict(ENV, LITLLM_TP_TIMEOUT="10", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "run.py")], capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    from litllm import LLM

    expected = LLM.load(tiny_checkpoint, device="cpu").generate("Tell me about llamas", max_new_tokens=12)
    assert proc.stdout.decode().strip() == expected.strip()


@pytest.mark.slow
def test_chat_on_two_ranks(folder):
    turns = b"Hi!\nTell me more\n/exit\n"
    flags = ["--prompt_style", "default", "--temperature", "0", "--max_new_tokens", "6", "--device", "cpu"]
    one = litllm_in_process(["chat", str(folder), *flags], stdin=turns.decode())  # the oracle: 1 process
    two = litllm("chat", str(folder), *flags, "--devices", "2", stdin=turns)
    said = f"{two.stderr.decode()[-3000:]}\nstdout:\n{two.stdout.decode()[-1000:]}"
    assert one.returncode == two.returncode == 0, said
    assert two.stdout.count(b">> Model: ") == 2
    assert two.stdout.decode() == one.stdout


@pytest.mark.slow
def test_serve_on_two_ranks(folder, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Server

    prompts = ["What food do llamas eat?", "Hi", "def fibonacci(n):", "The quick brown fox"]
    expected = [reference_generate(folder, p, 10, prompt_style="default", temperature=0.0)[:-1]
                for p in prompts]
    server = Server(folder, tmp_path / "server.log", "--max_batch_size", "2", "--device", "cpu",
                    "--devices", "2")
    try:
        client = server.client()

        def complete(i: int) -> str:
            if i % 2:  # half the clients stream
                chunks = client.completions.create(model=folder.name, prompt=prompts[i], max_tokens=10,
                                                   temperature=0, stream=True)
                return "".join(c.choices[0].text for c in chunks if c.choices)
            return client.completions.create(model=folder.name, prompt=prompts[i], max_tokens=10,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(4) as pool:  # 4 concurrent clients on 2 slots: continuous batching
            assert list(pool.map(complete, range(4))) == expected
        seeded = [client.completions.create(model=folder.name, prompt=prompts[0], max_tokens=8,
                                            temperature=1.0, seed=5).choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1] == reference_generate(folder, prompts[0], 8, prompt_style="default",
                                                            temperature=1.0, top_k=None, seed=5)[:-1]
    finally:
        assert server.stop(signal.SIGTERM) == 0
    log = (tmp_path / "server.log").read_text()
    assert "Tensor parallel over 2 ranks" in log and "error" not in log.lower()


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_with_one_line(tiny_checkpoint):
    script = (
        "import os, signal, sys\n"
        "from litllm import LLM\n"
        f"llm = LLM.load({str(tiny_checkpoint)!r}, device='cpu', devices=2)\n"
        "os.kill(llm.model.tp_channel.ranks.children[0].pid, signal.SIGKILL)\n"
        "llm.generate('Hi', max_new_tokens=50)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, env=ENV)
    assert proc.returncode != 0 and b"not reached" not in proc.stdout
    errors = [line for line in proc.stderr.decode().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: tensor-parallel rank 1 ")


def test_sequential_strategy_gives_the_same_tokens(tiny_checkpoint):
    from litllm import LLM

    one = LLM.load(tiny_checkpoint, device="cpu")
    spread = LLM.load(tiny_checkpoint, device="cpu", devices=2, strategy="sequential")
    assert spread.model.block_devices == ["cpu", "cpu"]  # 2 blocks: one per device
    prompts = ["What food do llamas eat?", "Hi"]
    assert spread.generate(prompts, max_new_tokens=10) == one.generate(prompts, max_new_tokens=10)
    assert spread.generate("Hi", max_new_tokens=8, temperature=1.0, seed=3) == \
        one.generate("Hi", max_new_tokens=8, temperature=1.0, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["llama", "qwen3", "mixtral"], indirect=True)
def test_evaluate_on_two_ranks(folder, tasks_dir, tmp_path):
    from litllm.evaluate import evaluate

    tasks = f"{MC_TASK},{GEN_TASK},{PPL_TASK}"
    one = evaluate(folder, tasks=tasks, include_path=tasks_dir, out_dir=tmp_path / "one", batch_size=2,
                   limit=4, device="cpu", precision="32-true", log_samples=True)
    proc = litllm("evaluate", str(folder), "--tasks", tasks, "--include_path", str(tasks_dir),
                  "--out_dir", str(tmp_path / "two"), "--batch_size", "2", "--limit", "4", "--device", "cpu",
                  "--precision", "32-true", "--log_samples", "true", "--devices", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for task in (MC_TASK, GEN_TASK, PPL_TASK):
        for metric, value in one["results"][task].items():
            if isinstance(value, float):
                assert two["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
            else:
                assert two["results"][task][metric] == value, (task, metric)

    def answers(out_dir: Path) -> list:
        rows = (out_dir / f"samples_{GEN_TASK}.jsonl").read_text().splitlines()
        return [json.loads(row)["resps"] for row in rows]

    assert answers(tmp_path / "two") == answers(tmp_path / "one") and answers(tmp_path / "one")


@pytest.mark.slow
def test_generate_under_torchrun(tiny_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "litllm",
         "generate", str(tiny_checkpoint), "--prompt", "Hi", "--max_new_tokens", "10", "--temperature", "0",
         "--device", "cpu", "--devices", "2"],
        capture_output=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode() == reference_generate(tiny_checkpoint, "Hi", 10, temperature=0.0)


def test_slurm_serve_template_passes_the_allocation(tmp_path):
    """config_hub/slurm/serve.sbatch with stand-ins for srun and scontrol: what it would launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$MASTER_ADDR $MASTER_PORT $*" > {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ $2 == hostnames ]] && echo gpu-a gpu-b || '
                                      'echo "NodeName=gpu-a NodeAddr=10.0.0.7 State=IDLE"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="4", SLURM_JOB_NODELIST="gpu-[a-b]")
    script = str(ROOT / "config_hub" / "slurm" / "serve.sbatch")
    proc = subprocess.run(["bash", script, "checkpoints/big", "--port", "9000"], capture_output=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "clients: http://10.0.0.7:9000/v1" in proc.stdout.decode()
    assert (tmp_path / "srun.args").read_text().split() == [
        "10.0.0.7", str(15000 + 4242), "--ntasks-per-node=4", "--kill-on-bad-exit=1", "litllm", "serve",
        "checkpoints/big", "--port", "9000", "--devices", "4", "--num_nodes", "2", "--host", "0.0.0.0"]
    proc = subprocess.run(["bash", script, "checkpoints/big", "--devices", "2"], capture_output=True, env=env)
    assert proc.returncode == 2 and proc.stderr.decode().startswith("error: --devices comes from the allocation")


@pytest.mark.slow
def test_workers_leave_when_rank_0_dies(tiny_checkpoint):
    import time

    script = (
        "import time\n"
        "from litllm import LLM\n"
        f"llm = LLM.load({str(tiny_checkpoint)!r}, device='cpu', devices=2)\n"
        "print(llm.model.tp_channel.ranks.children[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    try:
        worker = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    status = Path(f"/proc/{worker}/status")
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in status.read_text():  # exited, not reaped yet (by whichever process adopted it)
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the worker outlived rank 0 by a minute")


def test_torchao_with_devices_is_refused_for_what_it_is():
    """`--quantize torchao.* --devices N` is refused in one line that says why (it named bitsandbytes' packed blocks)."""
    from litllm.errors import LitLLMError
    from litllm.parallel.runtime import load_sharded

    with pytest.raises(LitLLMError, match=r"^--quantize torchao.int8wo with --devices 2: .*the shards are not quantized "
                                          r"yet; drop --quantize") as refusal:
        load_sharded(Path("unused"), 2, 1, "cpu", quantize="torchao.int8wo")
    assert "bitsandbytes" not in str(refusal.value)
