"""`litllm finetune_grpo`, its rewards and the `Prompts` data module, on a tiny converted model (CPU, fp32, in-process).

Rewards: built-ins score what they claim; a user's function loads from a file or a module and a broken one stops the
run with one line naming it. Data: both record shapes, extra fields reach the rewards, bad records name file and
index. Command: LoRA (num_iterations 2, beta > 0) and full runs log TRL's metric names; resume from a checkpoint taken
between a generation's iterations is bit-exact; final/ generates and converts; --fast_dev_run; a tiny model learns
(the mean reward rises, fixed seed); 2 DDP processes give the losses of one process (batch-scaled rewards), 2 FSDP
processes those of 2 DDP processes and resume bit for bit. The rollout sampler follows the engine's distribution;
the rollout's merged LoRA decodes as the live layers; rows that stopped leave the head without changing a completion;
scoring a group's prompt once gives the row-by-row log-probs and gradients.
(litllm's numbers against TRL's: tests/test_grpo_oracle.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from conftest import (assert_final_folder_generates_and_matches_hf, assert_resumed_run_is_uninterrupted,
                      assert_same_tensors, json_file)
from litllm.data.prompts import Prompts
from litllm.errors import LitLLMError
from litllm.finetune import finetune_grpo
from litllm.grpo.rewards import accuracy, final_answer, format_reward, length_reward, load_rewards, score
from litllm.train.args import EvalArgs, TrainArgs

ROOT = Path(__file__).resolve().parents[1]
REWARD_FILE = '''
def vowels(prompts, completions, answer, **kwargs):
    """The share of the completion's characters that are 'e' (a smooth target a tiny model can learn)."""
    assert len(answer) == len(completions)
    return [c.count("e") / max(1, len(c)) for c in completions]


def low_ids(prompts, completions, completion_ids, **kwargs):
    """The share of the completion's tokens with an id below 100: a target a tiny random model can learn fast."""
    return [sum(t < 100 for t in ids) / len(ids) for ids in completion_ids]


def broken(prompts, completions, **kwargs):
    raise ValueError("no score today")


def short(prompts, completions, **kwargs):
    return [0.0]
'''


def _prompts(n: int = 24) -> list[dict]:
    return [{"prompt": f"Say the number {i}", "answer": str(i)} for i in range(n)]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return json_file(tmp_path_factory, _prompts(), "prompts.json")


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


# ---------------------------------------------------------------------- the rollout's sampler
def test_rollout_sampler_follows_the_engine_distribution():
    """The rollout engine's inverse-CDF draw samples softmax(logits / T) restricted to top-k / the nucleus, as the
    engine's `sample` does (frequencies), never a token of probability 0 (even at the ends of [0, 1)), and marks rows
    whose logits are not finite."""
    from litllm.engine import sampling_probs
    from litllm.grpo.rollout import inverse_cdf_sample

    row = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    n = 20000
    for temperature, top_k, top_p in ((0.7, None, 1.0), (1.0, 3, 1.0), (1.0, None, 0.8)):
        probs = sampling_probs(row[None], temperature, top_k, top_p)[0]  # (6,)
        uniforms = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        draws = inverse_cdf_sample(probs.expand(n, -1), uniforms)
        freq = torch.bincount(draws, minlength=6).float() / n
        assert torch.allclose(freq, probs, atol=0.015)
        assert (freq[probs == 0] == 0).all()
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(3, -1)
    ends = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_sample(probs, ends).tolist() == [1, 3, 3]
    bad = torch.tensor([[0.5, float("nan")], [0.5, 0.5]])
    assert inverse_cdf_sample(bad, torch.tensor([0.1, 0.7], dtype=torch.float64)).tolist() == [-1, 1]


def test_merged_lora_decodes_as_the_live_layers_and_leaves_them_untouched(base):
    """Inside `merged_lora` the no-grad logits equal the live LoRA model's up to rounding and a rollout samples the
    same completions; a forward that records gradients runs the live adapters (the same LoRA gradients); afterwards
    every parameter and the model's outputs are bit for bit what they were."""
    import contextlib

    from litllm.grpo import rollout
    from litllm.lora import add_lora
    from litllm.model import GPT

    torch.manual_seed(0)
    model = add_lora(GPT.from_checkpoint(base), r=4, alpha=8, dropout=0.0, projection=True, head=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a live, non-zero update
        p.requires_grad_("lora_" in name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def lora_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    with torch.no_grad():
        live = model(x)
    live_grads = lora_grads()
    with rollout.merged_lora(model):
        with torch.no_grad():
            decoded = model(x)
        assert lora_grads().keys() == live_grads.keys()
        for k, g in lora_grads().items():
            assert torch.equal(g, live_grads[k]), k
        lora_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
        with torch.no_grad():
            lora_b.zero_()  # the decode weights were made on entry: unchanged
            assert torch.equal(model(x), decoded)
            lora_b.copy_(before[next(k for k in before if "lora_B" in k)])
    torch.testing.assert_close(decoded, live, rtol=0, atol=1e-4)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), live)

    def sample(weights) -> list[list[int]]:
        rollout.merged_lora, original = weights, rollout.merged_lora
        try:
            return rollout.sample_completions(model, [x[0].tolist(), x[1, :5].tolist()], 3, 8,
                                              {"temperature": 1.0, "top_p": 1.0, "top_k": None}, range(6), [])[0]
        finally:
            rollout.merged_lora = original

    assert sample(rollout.merged_lora) == sample(contextlib.nullcontext)


def test_rollout_heads_only_the_rows_still_decoding(base, monkeypatch):
    """Rows that stop early leave the batch's output head and sampling: every completion is the one the engine samples
    when the head runs on all rows (rows stop at different steps: stop tokens drawn from an unstopped rollout)."""
    from litllm.engine import Engine
    from litllm.grpo import rollout
    from litllm.model import GPT

    model = GPT.from_checkpoint(base)
    prompts, sampling = [[5, 9, 2, 7], [11, 3]], {"temperature": 1.0, "top_p": 1.0, "top_k": None}

    def sample(stops):
        return rollout.sample_completions(model, prompts, 4, 12, sampling, range(8), stops)

    unstopped = sample([])[0]
    stops = [unstopped[0][3], unstopped[5][6]]
    completions, truncated, _ = sample(stops)
    lengths = {len(c) for c in completions}
    assert len(lengths) > 1 and any(truncated) and not all(truncated)  # some rows stopped early, at several steps
    heads = []

    def every_row(engine, tokens, pos, kv_len):  # the head on all rows, then the running ones kept
        live = torch.tensor([r is not None and r.decoding for r in engine._rows])
        heads.append(int(live.sum()))
        return Engine._decode_logits(engine, tokens, pos, kv_len)[live]

    monkeypatch.setattr(rollout.RolloutEngine, "_decode_logits", every_row)
    assert sample(stops)[:2] == (completions, truncated)
    assert min(heads) < 8


@pytest.mark.slow  # compiles a tiny model's step: ~30-60 s here
def test_compiled_rollout_samples_the_eager_rollouts_tokens_with_the_current_weights(base, monkeypatch, tmp_path):
    """A rollout on the compiled decode step (saved AOTInductor package; LoRA merged into buffers it takes by name)
    samples the eager rollout's tokens, rows stopping at several steps; after an optimizer step on the LoRA weights
    and an in-place change of a base weight (full finetuning's update), the next rollout loads the saved step with
    the current tensors and again samples what the eager rollout does, which the update changed; so does a smaller
    rollout on the step of the larger one."""
    from litllm.grpo import rollout
    from litllm.lora import add_lora
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = add_lora(GPT.from_checkpoint(base), r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_("lora_" in name)
    modules = [(name, type(module)) for name, module in model.named_modules()]
    sources = []
    build = rollout.rollout_engine

    def spy(*args):
        engine = build(*args)
        sources.append(getattr(engine, "step_source", "eager") if engine._compiled else "eager")
        return engine

    monkeypatch.setattr(rollout, "rollout_engine", spy)
    prompts, sampling = [[5, 9, 2, 7], [11, 3]], {"temperature": 1.0, "top_p": 1.0, "top_k": None}

    def sample(compile: Optional[bool], stops=()):
        return rollout.sample_completions(model, prompts, 4, 12, sampling, range(8), list(stops), compile)[:2]

    unstopped = sample(False)[0]
    stops = [unstopped[0][3], unstopped[5][6]]
    eager = sample(False, stops)
    assert len({len(c) for c in eager[0]}) > 1  # rows stop at several steps
    assert sample(None, stops) == eager  # None (where compiling doesn't pay): a saved step only, none yet
    assert sample(True, stops) == eager
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    model(torch.tensor([prompts[0] * 3])).logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        model.blocks[0].mlp.proj.weight.mul_(3.0)  # a base weight updated in place (full finetuning)
    updated = sample(False, stops)
    assert updated != eager
    assert sample(True, stops) == updated
    assert sample(None, stops) == updated  # now one is saved: loaded
    one_prompt = [rollout.sample_completions(model, prompts[:1], 4, 12, sampling, range(4), stops, compile, 8)[:2]
                  for compile in (False, True)]  # a smaller batch: on the 8-row step, 4 rows idle
    assert one_prompt[1] == one_prompt[0] == (updated[0][:4], updated[1][:4])
    assert sources == ["eager", "eager", "eager", "compiled", "eager", "loaded", "loaded", "eager", "loaded"]
    assert not any(n.endswith(rollout.MERGED_BUFFER) for n, _ in model.named_buffers())
    assert [(name, type(module)) for name, module in model.named_modules()] == modules  # plain Linears again


def test_a_policy_whose_step_does_not_export_decodes_eagerly_with_one_note(base, monkeypatch, tmp_path, capsys):
    """A policy that does not export as one graph (AOTInductor's path gives up): its rollouts decode eagerly, the same
    tokens, one note, and no export is tried again in the run."""
    from litllm import compile_decode
    from litllm.grpo import rollout
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    tries = []
    monkeypatch.setattr(compile_decode, "_compile_and_save", lambda path, engine: tries.append(path))  # None
    model = GPT.from_checkpoint(base)
    prompts, sampling = [[5, 9, 2, 7], [11, 3]], {"temperature": 1.0, "top_p": 1.0, "top_k": None}
    eager = rollout.sample_completions(model, prompts, 4, 6, sampling, range(8), [])[:2]
    for _ in range(2):
        assert rollout.sample_completions(model, prompts, 4, 6, sampling, range(8), [], True)[:2] == eager
    assert len(tries) == 1
    assert capsys.readouterr().err.count("does not export as one graph: the rollouts decode eagerly") == 1


def test_a_compiled_rollout_leaves_the_policys_modules_as_they_were(base, monkeypatch, tmp_path):
    """The compiled step's decode layout (`unpack_weights`: 16-bit Linears as `OneRowLinear`s, fp32 ones as
    `RowSplitLinear`s, on the same weights) lasts for the rollout only: afterwards the training policy has its own
    modules again (plain Linears under its LoRA layers) and the same Parameters (the optimizer's)."""
    from litllm import compile_decode
    from litllm.grpo import rollout
    from litllm.lora import add_lora
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_decode, "_compile_and_save", lambda path, engine: None)  # no compile: eager after
    model = add_lora(GPT.from_checkpoint(base), r=4, alpha=8, dropout=0.0).to(torch.bfloat16)  # OneRowLinears
    modules = [(name, module, type(module)) for name, module in model.named_modules()]
    parameters = list(model.parameters())
    during = []
    build = rollout.rollout_engine

    def spy(*args):
        engine = build(*args)
        during.extend(type(m).__name__ for m in model.modules())
        return engine

    monkeypatch.setattr(rollout, "rollout_engine", spy)
    rollout.sample_completions(model, [[5, 9, 2, 7]], 2, 4, {"temperature": 1.0, "top_p": 1.0, "top_k": None},
                               range(2), [], True)
    assert [(name, module, type(module)) for name, module in model.named_modules()] == modules
    assert all(a is b for a, b in zip(model.parameters(), parameters)) and len(list(model.parameters())) == len(parameters)
    assert "OneRowLinear" in during  # the rollout decoded on the layout


def test_rollouts_compile_where_it_pays_on_one_cpu_process_else_decode_eagerly(monkeypatch):
    """`--compile_rollouts`: as given, by default where the run's rollout decode steps pay for compiling (or as
    $LITLLM_COMPILE says); eager with more than one process, off the CPU or on a quantized base, with one note when
    compiling was asked for."""
    from types import SimpleNamespace

    from litllm.compile_ledger import COMPILE_ENV, PAYS_AFTER_TOKENS
    from litllm.grpo.method import rollout_compile

    notes = []

    def fabric(world_size=1, device="cpu"):
        return SimpleNamespace(world_size=world_size, device=torch.device(device), print=notes.append)

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    pays = PAYS_AFTER_TOKENS["cpu"]
    assert rollout_compile(None, fabric(), False, pays) and rollout_compile(None, fabric(), False, None)
    assert rollout_compile(None, fabric(), False, pays - 1) is None  # where it doesn't pay: a saved step, if any
    assert rollout_compile(True, fabric(), False, 1) and not rollout_compile(False, fabric(), False, 10 * pays)
    assert not notes
    assert not rollout_compile(None, fabric(world_size=2), False, None)  # not asked: no note
    assert not notes
    for fab, quantized, why in [(fabric(world_size=2), False, "more than one process"),
                                (fabric(device="meta"), False, "on meta"), (fabric(), True, "quantized")]:
        assert not rollout_compile(True, fab, quantized, None)
        note = notes.pop()
        assert not notes and note.startswith("note: --compile_rollouts: the rollouts decode eagerly") and why in note
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert rollout_compile(None, fabric(), False, 10 * pays) is False
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert rollout_compile(None, fabric(), False, 1)
    assert not rollout_compile(None, fabric(world_size=2), False, None) and "more than one process" in notes.pop()


# ---------------------------------------------------------------------- each prompt scored once per group
@pytest.mark.parametrize("overrides, checkpointed", [
    ({}, False),
    ({}, True),  # activation checkpointing recomputes the blocks in the backward, with the packed masks
    ({"sliding_window_size": 3, "sliding_window_period": 2, "attention_logit_softcapping": 5.0}, False),
    ({"attention_chunk_size": 5}, False),
], ids=["llama", "checkpointed", "sliding-softcap", "chunked"])
def test_shared_prompt_logps_and_gradients_equal_the_row_by_row_ones(overrides, checkpointed):
    """A group's G completions scored over one pass of their prompt (`shared_prompt_logps`) give the row-by-row
    log-probs and parameter gradients (fp32 rounding), for prompts and completions of different lengths, local layers
    (windows, chunks) and activation checkpointing; `worth_sharing` packs long prompts' short completions only."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from conftest import tiny_config
    from litllm.grpo.loss import completion_logps
    from litllm.grpo.prefix import shared_prompt_logps, worth_sharing
    from litllm.grpo.rollout import pack
    from litllm.model import GPT

    torch.manual_seed(0)
    model = GPT(tiny_config(**overrides))
    model.reset_parameters()
    if checkpointed:
        model.blocks = torch.nn.ModuleList(checkpoint_wrapper(b) for b in model.blocks)
    g, G = torch.Generator().manual_seed(1), 3
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 9, 3)]
    completions = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (4, 7, 1, 7, 2, 6, 3, 7, 5)]
    input_ids, prompt_lens, mask = pack(prompts, completions, G)
    weights = torch.randn(mask.shape, generator=g)

    def logps_and_grads(score):
        model.zero_grad()
        logps = score()
        (logps * weights).sum().backward()
        return logps, {name: p.grad.clone() for name, p in model.named_parameters()}

    rows, row_grads = logps_and_grads(lambda: completion_logps(model, input_ids, mask, prompt_lens, 0.7))
    shared, shared_grads = logps_and_grads(
        lambda: shared_prompt_logps(model, model, input_ids, mask, prompt_lens, 0.7, G))
    assert (rows[mask == 0] == 0).all() and (rows[mask == 1] < 0).all()
    torch.testing.assert_close(shared, rows, rtol=0, atol=1e-5)
    for name, grad in row_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    long_prompts = pack([list(range(40))] * 2, [[1] * 8] * 8, 4)
    long_completions = pack([[1, 2]] * 2, [[1] * 60] * 8, 4)
    assert worth_sharing(model.config, long_prompts[2], long_prompts[1], 4)
    assert not worth_sharing(model.config, long_completions[2], long_completions[1], 4)
    assert not worth_sharing(model.config, long_prompts[2], long_prompts[1], 1)


# ---------------------------------------------------------------------- rewards
def test_builtin_rewards():
    assert final_answer("so <answer> 42 </answer>") == "42"
    assert final_answer("the sum is \\boxed{\\frac{1}{2}} ok") == "\\frac{1}{2}"
    assert final_answer("3 apples and 1,250 pears") == "1,250"
    assert accuracy(None, ["It is 4.", "<answer>4.0</answer>", "$1,250", "5", [{"role": "assistant", "content": "4"}]],
                    answer=["4", "4", "1250", "4", "4"]) == [1.0, 1.0, 1.0, 0.0, 1.0]
    fmt = format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>")
    assert fmt(None, ["<think>a\nb</think> <answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]
    assert length_reward(4)(None, ["", "", ""], completion_ids=[[1] * 3, [1] * 6, [1] * 20]) == [0.0, -0.5, -1.0]
    with pytest.raises(LitLLMError, match="'answer' field"):
        accuracy(None, ["4"])


def test_user_rewards_load_and_fail_with_one_line_naming_them(reward_file, monkeypatch):
    rewards = load_rewards([f"{reward_file}:vowels", "format"], [2.0, 1.0])
    assert [r.name for r in rewards] == ["vowels", "format"] and rewards[0].weight == 2.0
    table = score(rewards, ["p", "p"], ["eee", "<think></think><answer>1</answer>"], [[1], [2]], {"answer": ["1", "1"]})
    assert table.shape == (2, 2) and table[0, 0] == 1.0 and table[1, 1] == 1.0
    monkeypatch.syspath_prepend(str(reward_file.parent))
    assert load_rewards(["my_rewards:vowels"])[0].fn.__name__ == "vowels"  # package.module:function
    for spec, message in ((f"{reward_file}:broken", "raised ValueError: no score today"),
                          (f"{reward_file}:short", "returned 1 values for 2 completions")):
        with pytest.raises(LitLLMError, match=f"--reward {spec}: {message}"):
            score(load_rewards([spec]), ["p", "p"], ["a", "b"], [[1], [2]], {})
    for spec, message in (("nope", "expected one of accuracy"), (f"{reward_file}:missing", "has no function 'missing'"),
                          ("missing.py:f", "file missing.py not found")):
        with pytest.raises(LitLLMError, match=message):
            load_rewards([spec])
    with pytest.raises(LitLLMError, match="--reward_weights: 1 weight"):
        load_rewards(["accuracy", "format"], [1.0])


# ---------------------------------------------------------------------- data
def _module(path: Path, base, **kwargs) -> Prompts:
    from litllm.tokenizer import Tokenizer

    data = Prompts(json_path=path, val_split_fraction=0.0, **kwargs)
    data.max_new_tokens = 8
    data.connect(Tokenizer(base), batch_size=2, max_seq_length=256)
    data.setup()
    return data


def test_prompt_and_chat_records_and_their_fields(base, tmp_path):
    path = tmp_path / "p.jsonl"
    records = [{"prompt": "Say 3", "answer": "3"}, {"messages": [{"role": "user", "content": "Say 4"}], "answer": "4",
                                                   "level": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    data = _module(path, base, prompt_style="chatml")
    from litllm.tokenizer import Tokenizer

    decoded = [Tokenizer(base).decode(s["prompt_ids"]) for s in data.train_dataset.samples]
    assert decoded[0].endswith("user\nSay 3\nassistant\n") and decoded[1].endswith("user\nSay 4\nassistant\n")
    prompts, fields = data.record_fields("train", [1, 0])
    assert prompts == [records[1]["messages"], "Say 3"] and fields == {"answer": ["4", "3"], "level": [2, None]}
    assert data.longest_sample() == max(len(s["prompt_ids"]) for s in data.train_dataset.samples) + 8


@pytest.mark.parametrize("record, message", [
    ({"answer": "1"}, "record 1: expected exactly one of 'prompt'"),
    ({"prompt": 3}, "record 1: 'prompt' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "record 1: the last message"),
    ({"prompt": "x", "completions": "y"}, "record 1: field 'completions' is reserved"),
    ({"prompt": "x " * 300}, "record 1: the prompt has"),
])
def test_bad_records_name_the_file_and_index(base, tmp_path, record, message):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([_prompts(1)[0], record]))
    with pytest.raises(LitLLMError, match=f"{path.name}.*{message}"):
        _module(path, base)


# ---------------------------------------------------------------------- the command
def _kwargs(prompts_file, reward_file, method="lora", **extra) -> dict:
    kwargs = dict(
        method=method, accelerator="cpu", precision="32-true", reward=[f"{reward_file}:vowels", "length"],
        reward_weights=[1.0, 0.1], length_target=6, num_generations=4, max_new_tokens=8,
        data=Prompts(json_path=prompts_file, prompt_style="default", val_split_fraction=0.1),
        train=TrainArgs(global_batch_size=2, micro_batch_size=1, max_steps=6, lr_warmup_steps=0, save_interval=3),
        eval=EvalArgs(interval=3, max_iters=1),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2 if method == "lora" else 1e-3,
                                                                     "weight_decay": 0.0}},
    )
    kwargs.update(extra)
    return kwargs


RUNS = {
    "lora": dict(lora_dropout=0.1, lora_mlp=True, num_iterations=2, beta=0.04, loss_type="grpo"),
    "full": dict(loss_type="bnpo", epsilon_high=0.28),
}


@pytest.fixture(scope="module")
def runs(base, prompts_file, reward_file, tmp_path_factory, one_thread) -> dict:
    results = {}
    for name, extra in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        results[name] = (out, finetune_grpo(base, out_dir=out, **_kwargs(prompts_file, reward_file, name, **extra)))
    return results


def _metrics(out: Path) -> list[dict]:
    from litllm.train.loggers import read_csv_rows

    return read_csv_rows(out / "logs" / "csv" / "metrics.csv")


@pytest.mark.parametrize("name", list(RUNS))
def test_runs_log_trl_metric_names_and_completion_samples(runs, name):
    out, result = runs[name]
    assert result.step == 6
    rows = [r for r in _metrics(out) if r.get("loss")]
    expected = {"reward", "reward_std", "frac_reward_zero_std", "rewards/vowels/mean", "rewards/length/mean",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "rollout/tokens_per_sec"}
    assert expected | ({"kl"} if name == "lora" else set()) <= set(rows[0]), set(rows[0])
    assert all(0 <= float(r["completions/mean_length"]) <= 8 for r in rows)
    val = [r for r in _metrics(out) if r.get("val_reward")]
    assert val
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])


def test_final_folder_generates_and_converts_to_hf(runs, tmp_path):
    pytest.importorskip("transformers")
    for name in RUNS:
        assert_final_folder_generates_and_matches_hf(runs[name][1].final_dir, tmp_path / name)
    assert (runs["lora"][1].final_dir / "lit_lora.safetensors").is_file()


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_between_iterations_is_bit_exact(runs, base, prompts_file, reward_file, tmp_path, name):
    """Step 3 of the LoRA run is iteration 0 of a generation (num_iterations 2): the checkpoint carries its rollout."""
    straight_out, straight = runs[name]
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(straight_out / "step-00000003", resumed_out / "step-00000003")
    resumed = finetune_grpo(base, out_dir=resumed_out, resume="auto", **_kwargs(prompts_file, reward_file, name,
                                                                                **RUNS[name]))
    assert_resumed_run_is_uninterrupted(resumed_out, resumed, straight_out, straight, first_step=4)


@pytest.mark.slow  # compiles the tiny model's decode step for the train and validation rollouts: ~1-2 min here
def test_a_run_on_compiled_rollouts_equals_the_eager_run_and_resumes_bit_exact(runs, base, prompts_file, reward_file,
                                                                               tmp_path, monkeypatch):
    """Full finetuning with `--compile_rollouts true`: the rollouts decode on the saved compiled step with the
    weights the optimizer updated, so every step's loss and the final weights equal the eager run's bit for bit (the
    loss is computed eagerly from the same tokens); resumed from step 3 (the saved steps loaded), too."""
    from litllm.compile_decode import STEPS_FOLDER

    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    straight_out, straight = runs["full"]
    kwargs = _kwargs(prompts_file, reward_file, "full", compile_rollouts=True, **RUNS["full"])
    for name, resume in (("compiled", None), ("resumed", "auto")):
        out = tmp_path / name
        out.mkdir()
        if resume:
            shutil.copytree(tmp_path / "compiled" / "step-00000003", out / "step-00000003")
        result = finetune_grpo(base, out_dir=out, **({"resume": resume} if resume else {}), **kwargs)
        assert list(cache.glob(f"{STEPS_FOLDER}/*/*.pt2"))  # it decoded on a saved compiled step
        assert result.step == straight.step
        assert all(result.losses[step] == straight.losses[step] for step in range(4 if resume else 1, 7))
        assert_same_tensors(out / "final" / "lit_model.safetensors", straight_out / "final" / "lit_model.safetensors")


def test_qlora_samples_through_the_quantized_base(base, prompts_file, reward_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    kwargs = _kwargs(prompts_file, reward_file, quantize="bnb.nf4", lora_mlp=True)
    kwargs["train"] = TrainArgs(global_batch_size=2, micro_batch_size=1, max_steps=2, lr_warmup_steps=0, save_interval=None)
    result = finetune_grpo(base, out_dir=out, **kwargs)
    rows = [r for r in _metrics(out) if r.get("reward")]
    assert result.step == 2 and len(rows) == 2 and float(rows[-1]["completions/mean_length"]) > 0
    assert (result.final_dir / "lit_lora.safetensors").is_file()


def test_fast_dev_run(base, prompts_file, reward_file, tmp_path, capsys):
    """Also: every completion truncated and masked out of the loss (dapo) trains on nothing, without failing."""
    out = tmp_path / "out"
    finetune_grpo(base, out_dir=out, fast_dev_run=True,
                  **_kwargs(prompts_file, reward_file, **RUNS["lora"], mask_truncated_completions=True))
    assert not out.exists()
    assert "resumed from it" in capsys.readouterr().out


def test_bad_arguments_fail_clearly_and_write_nothing(base, prompts_file, reward_file, tmp_path):
    out = tmp_path / "out"
    cases = [
        (dict(data=None), "--data Prompts"),
        (dict(method="full", quantize="bnb.nf4"), "--quantize needs --method lora"),
        (dict(reward=[]), "--reward: give at least one"),
        (dict(num_generations=1), "--num_generations must be >= 2"),
        (dict(loss_type="ppo"), "--loss_type"),
        (dict(scale_rewards="global"), "--scale_rewards"),
    ]
    for extra, message in cases:
        with pytest.raises(LitLLMError, match=message):
            finetune_grpo(base, out_dir=out, **{**_kwargs(prompts_file, reward_file), **extra})
    assert not out.exists()
    broken = _kwargs(prompts_file, reward_file, reward=[f"{reward_file}:broken"], reward_weights=None)
    with pytest.raises(LitLLMError, match=f"--reward {reward_file}:broken: raised ValueError"):
        finetune_grpo(base, out_dir=out, **broken)
    assert not out.exists()  # the reward failed in the first step: no logs left behind


def test_cli_error_is_one_line(base, prompts_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "litllm", "finetune_grpo", str(base), "--data", "Prompts",
                           "--data.json_path", str(prompts_file), "--reward", "nope"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --reward nope") and "Traceback" not in proc.stderr


def test_reward_flags_repeat_into_one_job(base, prompts_file, monkeypatch):
    """`--reward a --reward b` (TRL's spelling) binds both, in order, into the job `launch` receives."""
    import litllm.finetune as finetune
    from litllm.__main__ import main

    captured = {}
    monkeypatch.setattr(finetune, "launch", lambda job: captured.setdefault("job", job))
    main(["finetune_grpo", str(base), "--data", "Prompts", "--data.json_path", str(prompts_file), "--reward",
          "accuracy", "--reward=format", "--reward_weights", "1", "--reward_weights", "0.5", "--num_generations", "4"])
    job = captured["job"]
    assert isinstance(job, finetune.GRPOJob) and (job.reward, job.reward_weights) == (["accuracy", "format"], [1.0, 0.5])
    assert job.grpo.num_generations == 4 and [r.weight for r in job.rewards()] == [1.0, 0.5]


@pytest.mark.slow
def test_a_tiny_model_learns_to_raise_its_reward(base, prompts_file, reward_file, tmp_path, one_thread):
    """LoRA GRPO on the share of low token ids in its completions (fixed seed): the mean reward of the last steps is
    far above the first ones'."""
    out = tmp_path / "out"
    kwargs = _kwargs(prompts_file, reward_file, reward=[f"{reward_file}:low_ids"], reward_weights=None,
                     num_generations=8, max_new_tokens=12, lora_r=8, lora_alpha=16, lora_mlp=True, lora_head=True,
                     train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_steps=20, lr_warmup_steps=0,
                                     save_interval=None),
                     eval=EvalArgs(interval=1000, max_iters=1))
    kwargs["optimizer"]["init_args"]["lr"] = 3e-2
    finetune_grpo(base, out_dir=out, **kwargs)
    rewards = [float(r["reward"]) for r in _metrics(out) if r.get("reward")]
    assert len(rewards) == 20
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.5 and last > first + 0.3, rewards


def _cli_run(base, prompts_file, out: Path, devices: int, strategy: str, *extra: str) -> list[tuple]:
    """(loss, reward, grad_norm) of each step of `litllm finetune_grpo` on `devices` CPU processes (on several, a
    fresh interpreter: the launcher spawns the ranks; on one, the CLI's entry point in this process, which spares an
    interpreter with torch and Lightning)."""
    import os

    from conftest import litllm_in_process
    from litllm.train.loggers import read_csv_rows

    args = [
        "finetune_grpo", str(base), "--out_dir", str(out), "--accelerator", "cpu",
        "--devices", str(devices), "--strategy", strategy, "--precision", "32-true",
        "--data", "Prompts", "--data.json_path", str(prompts_file), "--data.prompt_style", "default",
        "--num_generations", "4", "--max_new_tokens", "6", "--train.global_batch_size", "2",
        "--train.micro_batch_size", "1",
        "--train.save_interval", "100", "--eval.interval", "100", *extra,
    ]
    if devices == 1:
        proc = litllm_in_process(args, cwd=out.parent)
    else:
        proc = subprocess.run([sys.executable, "-m", "litllm", *args], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=out.parent, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_csv_rows(out / "logs" / "csv" / "metrics.csv") if r.get("loss")]
    return [(float(r["loss"]), float(r["reward"]), float(r["grad_norm"])) for r in rows]


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process(base, prompts_file, reward_file, tmp_path):
    """2 CPU processes x 1 prompt per step = 1 process x 2 micro-batches of 1 prompt: the same prompts, completions
    (seeded per prompt), global token normalisation and `--scale_rewards batch` std (over both micro-batches in one
    process, all-gathered from both ranks in two), so the same losses, rewards and gradient norms (up to the order
    of float sums) over 3 steps."""
    lora = ("--reward", f"{reward_file}:vowels", "--reward", "length", "--length_target", "4", "--train.max_steps", "3",
            "--scale_rewards", "batch", "--lora_mlp", "true", "--lora_dropout", "0", "--optimizer.lr", "0.01")
    losses = {devices: _cli_run(base, prompts_file, tmp_path / f"out{devices}", devices,
                                "ddp" if devices > 1 else "auto", *lora) for devices in (1, 2)}
    assert len(losses[1]) == len(losses[2]) == 3
    assert sum(grad_norm > 1e-4 for _, _, grad_norm in losses[1]) >= 2, losses  # (the losses themselves are ~0)
    for one, two in zip(losses[1], losses[2]):
        assert all(abs(a - b) <= 1e-5 for a, b in zip(one, two)), losses


@pytest.mark.slow
def test_two_fsdp_processes_equal_two_ddp_processes(base, prompts_file, reward_file, tmp_path):
    """FSDP2 on 2 CPU processes: each rank gathers the whole weights for its own rollout (decoding a different
    number of steps than the other rank's, without collectives), reshards, and trains; with the same prompts per
    rank as DDP it gives DDP's losses, rewards and gradient norms, and the same weights after 4 steps (full
    finetuning, so both start from the checkpoint's weights; num_iterations 2 and beta > 0: the old and the
    reference log-probs are sharded forwards too). Resumed from step 1 (between the two iterations of a generation:
    each rank's buffered rollout comes back from the checkpoint), FSDP continues bit for bit."""
    full = ("--reward", f"{reward_file}:low_ids", "--method", "full", "--train.max_steps", "4", "--num_iterations", "2",
            "--beta", "0.04", "--scale_rewards", "batch", "--optimizer", "SGD", "--optimizer.lr", "0.1",
            "--optimizer.momentum", "0.9", "--train.save_interval", "1")
    losses, weights = {}, {}
    for strategy in ("ddp", "fsdp", "resumed"):
        out = tmp_path / strategy
        if strategy == "resumed":
            out.mkdir()
            shutil.copytree(tmp_path / "fsdp" / "step-00000001", out / "step-00000001")
        extra = ("--resume", "auto") if strategy == "resumed" else ()
        losses[strategy] = _cli_run(base, prompts_file, out, 2, "ddp" if strategy == "ddp" else "fsdp", *full, *extra)
        weights[strategy] = load_file(str(out / "final" / "lit_model.safetensors"))
    assert losses["resumed"] == losses["fsdp"][1:]
    assert all(torch.equal(weights["resumed"][k], v) for k, v in weights["fsdp"].items())
    assert len(losses["ddp"]) == len(losses["fsdp"]) == 4
    assert all(grad_norm > 1e-4 for _, _, grad_norm in losses["ddp"]), losses
    for ddp, fsdp in zip(losses["ddp"], losses["fsdp"]):
        assert all(abs(a - b) <= 1e-5 for a, b in zip(ddp, fsdp)), losses
    initial = load_file(str(base / "lit_model.safetensors"))
    assert any(not torch.equal(initial[k], weights["ddp"][k]) for k in initial)  # the steps moved the weights
    assert set(weights["ddp"]) == set(weights["fsdp"])
    for name, value in weights["ddp"].items():
        assert torch.allclose(weights["fsdp"][name], value, rtol=0, atol=1e-5), name
