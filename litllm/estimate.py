"""`litllm estimate COMMAND [that command's flags]`: peak memory per device, FLOPs and time, before launch.

COMMAND is `pretrain`, any `finetune_*`, `generate` or `serve` (weights + KV cache + temporaries).

    litllm estimate finetune_lora checkpoints/meta-llama/Llama-3.1-8B --config config_hub/finetune/llama-3.1-8b/lora.yaml
    litllm estimate pretrain --config config_hub/pretrain/tinyllama.yaml --device_memory 40GB --json

The command line (flag parsing, the table) is `litllm/estimate_cli.py`; this module is what it and the
pre-launch check of `pretrain`/`finetune_*` share (it imports neither command).

How: the run's own training step (`litllm.train.loop.build_train_model` + `train_step`, the method's
transform, activation checkpointing, the optimizer) runs on fake tensors (`torch._subclasses.FakeTensorMode`:
shapes and dtypes, no storage), and torch's `MemTracker` records what is alive at the step's peak, by
category (this is how torchtitan estimates memory). Nothing is loaded and no GPU is needed. The step runs
after a first optimizer step, so the optimizer state is there: it is the peak of every later step. The fake step
of a CPU fp32 run takes litllm's fused training ops where the real step would (`fused_cpu_ops`).

Formulas are used only where fake tensors can't reach:
- bitsandbytes weights (QLoRA's frozen base): `quantized_linear_bytes`, the packed weight plus its
  quantization state; the fake run keeps those Linears in the compute dtype and their bytes are swapped;
- bitsandbytes 8-bit optimizers (`optimizer_8bit_bytes`): AdamW runs in the fake step, its state is swapped;
- FSDP (`fsdp_per_device`): parameters, gradients and optimizer state are split N ways, plus the
  unsharded working set FSDP2 gathers (the root module, two blocks in flight, one block's gradients).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.precision import precision_dtypes as dtypes
from litllm.utils import temporarily

CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "logits_and_loss", "kv_cache", "temporaries")
FOUR_BIT = {"bnb.nf4": "nf4", "bnb.nf4-dq": "nf4", "bnb.fp4": "fp4"}
TRAIN_COMMANDS = {"pretrain": "pretrain", "finetune": "lora", "finetune_lora": "lora", "finetune_full": "full",
                  "finetune_adapter": "adapter", "finetune_adapter_v2": "adapter_v2",
                  "finetune_dpo": None, "finetune_grpo": None}  # None: the job's --method (lora or full)
# GRPO with --train.max_seq_length unset trains on the longest prompt + --max_new_tokens: prompts estimated this long
GRPO_PROMPT_TOKENS = 256
DECODE_COMMANDS = ("generate", "serve")


# ---------------------------------------------------------------------- what a run is
@dataclass
class TrainPlan:
    """Everything a training step's memory and time depend on (from a command's flags)."""

    config: Any
    method: str = "full"
    """"pretrain", "full", "lora", "adapter" or "adapter_v2"."""
    lora: Any = None
    adapter: Any = None
    quantize: Optional[str] = None
    precision: str = "32-true"
    micro_batch_size: int = 1
    seq_length: int = 512
    global_batch_size: int = 1
    world_size: int = 1
    strategy: str = "single"
    """Resolved: "single", "ddp" or "fsdp"."""
    activation_checkpointing: bool = False
    optimizer: Any = "AdamW"
    max_norm: Optional[float] = 1.0
    total_steps: Optional[int] = None
    rows_per_sample: int = 1
    """Rows one sample becomes in the forward pass: 2 for a DPO pair (chosen, rejected), GRPO's num_generations."""
    reference_copy: bool = False
    """A frozen copy of the initial model beside the policy (full DPO/GRPO with a reference model)."""
    rollout_tokens: int = 0
    """GRPO: positions per row of the KV cache its rollout holds (prompt + max_new_tokens); 0: no rollout."""
    device: str = "cuda"
    """The device type the run trains on: "cpu" runs the fake step as a CPU step here runs (`fused_cpu_ops`)."""
    notes: list[str] = field(default_factory=list)

    @property
    def accumulation(self) -> int:
        return max(1, self.global_batch_size // (self.world_size * self.micro_batch_size))


# ---------------------------------------------------------------------- bitsandbytes weights (formula)
def quantized_linear_bytes(out_features: int, in_features: int, mode: str, scale_bytes: int = 2) -> int:
    """Bytes a bitsandbytes or torchao layer holds for an (out, in) weight: packed values plus quantization state.

    4-bit (nf4/fp4): two values per byte, one fp32 absmax per block of 64 and a 16-entry fp32 code;
    `-dq` quantizes the absmaxes to uint8 with one fp32 absmax per 256 of them, a 256-entry fp32 code
    and an fp32 offset. int8: one byte per value plus one fp32 scale per output row. torchao: int8wo one
    byte per value, an fp32 scale and an int8 zero point per row; int4wo two values per byte and a scale
    and a zero point per group of 128 inputs, in the compute dtype (`scale_bytes` each).
    """
    n = out_features * in_features
    if mode == "bnb.int8" or mode == "bnb.int8-training":
        return n + 4 * out_features
    if mode == "torchao.int8wo":
        return n + 5 * out_features
    if mode == "torchao.int8dq":  # CPU: fbgemm's packed int8 values, an fp32 scale per row
        return n + 4 * out_features
    if mode == "torchao.int4wo":
        return math.ceil(n / 2) + 2 * scale_bytes * out_features * math.ceil(in_features / 128)
    if mode not in FOUR_BIT:
        raise LitLLMError(f"--quantize: unknown mode {mode!r}")
    blocks = math.ceil(n / 64)
    packed = math.ceil(n / 2)
    if mode == "bnb.nf4-dq":
        return packed + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + 4 * 16
    return packed + 4 * blocks + 4 * 16


def optimizer_8bit_bytes(numels: list[int]) -> int:
    """State of a bitsandbytes 8-bit Adam(W) for parameters of these sizes: two uint8 moments, a 256-entry
    fp32 code each and one fp32 absmax per block of 256; tensors under 4096 elements keep fp32 moments."""
    total = 0
    for n in numels:
        total += 2 * (n + 4 * 256 + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n
    return total


def _is_bnb_8bit(spec: Any) -> bool:
    from litllm.train.optimizer import parse_spec

    cls = parse_spec(spec)[0]
    return cls.__module__.startswith("bitsandbytes") and "8bit" in cls.__name__


def quantized_targets(model: nn.Module, skip=("lm_head",)) -> list[nn.Linear]:
    """The Linears `litllm.quantize.quantize_model(frozen_only=True)` replaces (frozen, not the head)."""
    return [m for name, m in model.named_modules()
            if type(m) is nn.Linear and name not in skip and name.rsplit(".", 1)[-1] not in skip
            and not m.weight.requires_grad]


# ---------------------------------------------------------------------- the measuring tool
def mem_tracker():
    """torch's MemTracker, made to work with frozen parameters (LoRA, QLoRA, adapters).

    Its module hooks call `register_hook` on every parameter, which fails on those that don't require
    grad; frozen parameters never get a gradient, so they are tracked without the hook. Only the
    global peak is kept (not every module's).
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class TrainMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            def hook(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(hook),
                            param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)),
                        )
            return memory

        def _update_peak_stats(self, peak_state) -> None:
            # only the global peak is used: skip the per-module peaks, which cost O(modules) per op
            # (a minute for an 8B model instead of seconds)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return TrainMemTracker()


def tracker_breakdown(snapshot: dict) -> dict[str, int]:
    """MemTracker's peak snapshot (one device) -> {category: bytes} in the estimate's categories."""
    (dev,) = snapshot.values() if len(snapshot) == 1 else (_merge(snapshot),)
    return {
        "weights": dev.get("Parameter", 0) + dev.get("Buffer", 0),
        "gradients": dev.get("Gradient", 0),
        "optimizer_state": dev.get("Optstate", 0),
        "activations": dev.get("Activation", 0),
        "temporaries": dev.get("Temp", 0) + dev.get("Other", 0),
        "total": dev.get("Total", 0),
    }


def _merge(snapshot: dict) -> dict:
    merged: dict[str, int] = {}
    for dev in snapshot.values():
        for k, v in dev.items():
            merged[k] = merged.get(k, 0) + v
    return merged


class StepFabric:
    """The few Fabric calls `train_step` makes, for one process without a process group (the fake run).

    Mixed precision: the forward runs under autocast, as Fabric's precision plugin does it.
    """

    world_size = 1
    device = torch.device("cpu")

    def __init__(self, precision: str = "32-true"):
        self.precision = precision

    def autocast(self):
        if self.precision.endswith("mixed"):
            return torch.autocast("cpu", dtype=dtypes(self.precision)[1])
        return nullcontext()

    def no_backward_sync(self, model, enabled: bool = True):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce(self, value: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        return value

    def clip_gradients(self, model, optimizer, max_norm: float, error_if_nonfinite: bool = False):
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)


# ---------------------------------------------------------------------- the fake training step
def _method(plan: TrainPlan):
    from litllm.train.loop import Method

    if plan.method in ("pretrain", "full"):
        return Method(name=plan.method)
    param_dtype, compute_dtype = dtypes(plan.precision)
    # the fake step never quantizes: bitsandbytes kernels don't run on fake tensors (see fake_train_step)
    if plan.method == "lora":
        from litllm.lora import lora_method

        return lora_method(plan.lora, param_dtype=param_dtype, compute_dtype=compute_dtype)
    if plan.method in ("adapter", "adapter_v2"):
        from litllm.adapter import adapter_method

        return adapter_method(plan.adapter, param_dtype=param_dtype, compute_dtype=compute_dtype)
    raise LitLLMError(f"estimate: no memory model for the method {plan.method!r}")


def fused_cpu_ops(plan: TrainPlan):
    """The context the fake step runs in: for a CPU run (`plan.device`), litllm's fused training ops
    (`litllm.fused_norms`, `litllm.fused_experts`) take the fake tensors where they would take the real step's
    (fp32, an AVX-512 CPU: `litllm.cpu_ops.fake_cpu_training`), so that the estimate keeps what those ops keep (their
    outputs as registered for fake tensors, `litllm.cpu_ops._register_training_fakes`) and not what the unfused ops
    would. Only where their library is built here already (the estimate does not wait a minute for a build; the
    run's first step builds it): else the model's own code, with a note. A GPU run's fake step: the model's code."""
    from litllm import cpu_ops

    if plan.device != "cpu" or dtypes(plan.precision)[1] != torch.float32 or not cpu_ops.has_avx512():
        return nullcontext()
    if not cpu_ops.library_built():
        note = ("litllm's fused CPU training ops are not built here yet: estimated for the unfused ops (the run "
                "builds them at its first step)")
        if note not in plan.notes:
            plan.notes.append(note)
        return nullcontext()
    cpu_ops.row_split_op()  # loads the library (and registers the ops' fake functions)
    return cpu_ops.fake_cpu_training()


def fake_train_step(plan: TrainPlan, micro_batch_size: Optional[int] = None,
                    activation_checkpointing: Optional[bool] = None) -> dict[str, int]:
    """Peak bytes of one steady-state training step on one device without sharding, by category."""
    from torch._subclasses import FakeTensorMode

    from litllm.train.loop import build_train_model, token_cross_entropy, train_step
    from litllm.train.optimizer import build_optimizer

    B = (micro_batch_size or plan.micro_batch_size) * plan.rows_per_sample
    T = plan.seq_length
    ac = plan.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    param_dtype, compute_dtype = dtypes(plan.precision)
    fabric = StepFabric(plan.precision)

    tracker = mem_tracker()

    def loss_fn(model, batch, ignore_index):
        tracker.reset_mod_stats()  # MemTracker's per-module stats cover one call: each micro-batch is one
        with fabric.autocast():
            return token_cross_entropy(model, batch, ignore_index)

    with fused_cpu_ops(plan), FakeTensorMode(allow_non_fake_inputs=True):
        # as Fabric's init_module: "-true" precisions build the weights in their dtype
        with _default_dtype(torch.float32 if plan.precision.endswith("mixed") else param_dtype):
            model = build_train_model(plan.config, _method(plan), activation_checkpointing=ac)
            model.max_seq_length = T  # the loop sizes the RoPE cache for the run, not the window
        quantized = quantized_targets(model) if plan.quantize else []
        for linear in quantized:  # the bitsandbytes layer computes in the compute dtype: no autocast copy
            linear.weight = nn.Parameter(linear.weight.detach().to(compute_dtype), requires_grad=False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        eight_bit = _is_bnb_8bit(plan.optimizer)
        # bitsandbytes' optimizer kernels don't run on fake tensors: AdamW stands in, its state is swapped below
        optimizer = build_optimizer("AdamW" if eight_bit else plan.optimizer, trainable)
        vocab = plan.config.vocab_size
        batches = [{"input_ids": torch.randint(0, vocab, (B, T)), "labels": torch.randint(0, vocab, (B, T))}
                   for _ in range(min(plan.accumulation, 2))]  # a second micro-batch meets the first's gradients
        for p in trainable:  # a first optimizer step creates the state every later step starts with
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.track_external(model, optimizer)
        with tracker:
            train_step(fabric, model, optimizer, batches, plan.max_norm, -100, loss_fn)
        parts = tracker_breakdown(tracker.get_tracker_snapshot("peak"))

        # logits + loss: the head and the loss alone, on the last hidden state
        head_tracker = mem_tracker()
        dtype = compute_dtype if plan.precision.endswith("mixed") else param_dtype
        hidden = torch.empty(B, T, plan.config.n_embd, dtype=dtype, requires_grad=True)
        head_loss = _HeadLoss(model)  # a parent module: MemTracker refuses repeated top-level calls (chunks)
        head_tracker.track_external(head_loss, hidden)
        with head_tracker:
            with fabric.autocast():
                loss = head_loss(hidden, batches[0]["labels"])
            loss.backward()
        head = tracker_breakdown(head_tracker.get_tracker_snapshot("peak"))
        head_bytes = max(0, head["total"] - head["weights"] - head["gradients"] - _nbytes(hidden))

    if eight_bit:
        adamw = sum(2 * _nbytes(p) for p in trainable)
        parts["optimizer_state"] += optimizer_8bit_bytes([p.numel() for p in trainable]) - adamw
    if quantized:
        parts["quantized_bytes"] = _swap_quantized(parts, quantized, plan.quantize, compute_dtype)
    # the logits share of the peak, taken out of activations and temporaries (it is part of them)
    share = min(head_bytes, parts["activations"] + parts["temporaries"])
    take = min(share, parts["temporaries"])
    parts["temporaries"] -= take
    parts["activations"] -= share - take
    parts["logits_and_loss"] = share
    parts["kv_cache"] = rollout_kv_bytes(plan, micro_batch_size)
    if plan.reference_copy:  # frozen, in the compute dtype, no gradients (GPT.from_checkpoint(dtype=compute_dtype))
        parts["weights"] += sum(p.numel() for p in model.parameters()) * compute_dtype.itemsize
    parts["structure"] = _structure(model, plan, param_dtype, compute_dtype)
    parts["total"] = sum(parts[k] for k in CATEGORIES)
    return parts


def rollout_kv_bytes(plan: TrainPlan, micro_batch_size: Optional[int] = None) -> int:
    """Bytes of the KV cache a GRPO rollout holds on one device: (prompts x num_generations) rows of
    `rollout_tokens` positions, `kv_cache_values_per_token` values each, in the model's weight dtype. It lives
    only while sampling, before the step's forward: counting it on top of the activations is an upper bound."""
    if not plan.rollout_tokens:
        return 0
    param_dtype, compute_dtype = dtypes(plan.precision)
    dtype = compute_dtype if plan.quantize else param_dtype  # QLoRA loads the (unquantized) embedding in compute dtype
    rows = (micro_batch_size or plan.micro_batch_size) * plan.rows_per_sample
    return rows * plan.rollout_tokens * plan.config.kv_cache_values_per_token() * dtype.itemsize


def _swap_quantized(parts: dict[str, int], linears: list[nn.Linear], mode: str, dtype: torch.dtype) -> int:
    """Swap the compute-dtype copies of `linears` in `parts` for bitsandbytes' packed weights (and their
    state); each layer dequantizes its weight for the matmul, one at a time. Returns the packed bytes."""
    dense = sum(_nbytes(m.weight) for m in linears)
    packed = sum(quantized_linear_bytes(m.out_features, m.in_features, mode, dtype.itemsize) for m in linears)
    parts["weights"] += packed - dense
    parts["temporaries"] += max(m.weight.numel() for m in linears) * dtype.itemsize
    return packed


class _HeadLoss(nn.Module):
    """The output head and the loss (`GPT.head_loss`: chunked, or fused with the head), as GPT.forward runs them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.lm_head  # (the head alone as a submodule: the tracker counts its weight, no other)
        self.head_loss = model.head_loss

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.head_loss(hidden, targets, ignore_index=-100)


def _default_dtype(dtype: torch.dtype):
    return temporarily(torch.get_default_dtype, torch.set_default_dtype, dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _structure(model: nn.Module, plan: TrainPlan, param_dtype, compute_dtype) -> dict[str, int]:
    """Sizes FSDP's working set depends on: the root's own parameters, the largest block's, its trainable ones."""
    gather = compute_dtype if plan.precision == "bf16-mixed" else param_dtype
    quantized = {id(m.weight) for m in quantized_targets(model)} if plan.quantize else set()

    def sizes(params):
        params = [p for p in params if id(p) not in quantized]
        return (sum(p.numel() for p in params) * gather.itemsize,
                sum(p.numel() * p.element_size() for p in params if p.requires_grad))

    block_ids = {id(p) for b in model.blocks for p in b.parameters()}
    root = sizes(p for p in model.parameters() if id(p) not in block_ids)
    blocks = [sizes(b.parameters()) for b in model.blocks]
    block = max(blocks)
    return {"root_unsharded": root[0], "root_grads": root[1], "block_unsharded": block[0], "block_grads": block[1],
            "whole_unsharded": root[0] + sum(b[0] for b in blocks)}


def fsdp_per_device(parts: dict[str, int], world_size: int) -> dict[str, int]:
    """One device's share under FSDP2 (one shard unit per Block plus the root), from the unsharded step.

    Sharded: the floating-point weights, their gradients and the optimizer state (1/N each; packed
    quantized weights stay whole on every device). Unsharded while in use: the root's parameters (FSDP2
    keeps the root gathered from forward to backward), the current and the prefetched block, and one
    block's full gradients before their reduce-scatter; or, if larger, during a GRPO rollout (a KV cache in
    `parts`), every parameter.
    """
    if world_size <= 1:
        return dict(parts)
    s = parts["structure"]
    quantized = parts.get("quantized_bytes", 0)
    out = dict(parts)
    out["weights"] = (parts["weights"] - quantized) // world_size + quantized
    out["gradients"] = parts["gradients"] // world_size
    out["optimizer_state"] = parts["optimizer_state"] // world_size
    working = s["root_unsharded"] + 2 * s["block_unsharded"] + s["block_grads"]
    if parts.get("kv_cache"):  # a GRPO rollout decodes on the whole weights, gathered on every device
        working = max(working, s["whole_unsharded"])
    out["temporaries"] = parts["temporaries"] + working
    out["total"] = sum(out[k] for k in CATEGORIES)
    return out


# ---------------------------------------------------------------------- inference (generate, serve)
def fake_decode(config, precision: str, quantize: Optional[str], batch_size: int, kv_length: int,
                prompt_length: int, prefill_chunk: Optional[int] = None, devices: int = 1) -> dict[str, int]:
    """Peak bytes of decoding as `litllm.engine.Engine` does it, on fake tensors: the KV cache for
    `batch_size` slots of `kv_length` positions, one prompt of `prompt_length` prefilled into one slot
    `prefill_chunk` tokens per forward (the last chunk, which attends to the most keys, is the one run),
    then a decode step of every slot. Categories: weights, kv_cache, temporaries (the rest are 0).
    `devices` > 1: one rank of tensor parallelism over that many devices (`litllm.parallel`): a model of one
    rank's heads, hidden units and vocabulary rows (`rank_config`)."""
    from torch._subclasses import FakeTensorMode

    from litllm.engine import PREFILL_CHUNK
    from litllm.model import GPT
    from litllm.quantize import HEAD_MODES, QUANTIZES_HEAD

    chunk = min(prompt_length, prefill_chunk or PREFILL_CHUNK)
    if devices > 1:
        from litllm.parallel.plan import rank_config

        config = rank_config(config, devices)

    dtype = dtypes(precision)[1]
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), _default_dtype(dtype):
        model = GPT(config)
        model.max_seq_length = kv_length
        model.eval().requires_grad_(False)
        quantized = quantized_targets(model) if quantize else []
        model.set_kv_cache(batch_size, kv_length)
        caches = [block.attn.kv_cache for block in model.blocks]
        kv = sum(_nbytes(c.k) + _nbytes(c.v) for c in caches)
        tracker = mem_tracker()
        tracker.track_external(model)
        with tracker:
            for block, cache in zip(model.blocks, caches):  # the engine prefills one slot through views of its row
                block.attn.kv_cache = cache.rows(0, 1)
            ids = torch.zeros(1, chunk, dtype=torch.long)
            model.decode(ids, input_pos=torch.arange(prompt_length - chunk, prompt_length), kv_len=prompt_length,
                         logits_to_keep=1)
            for block, cache in zip(model.blocks, caches):
                block.attn.kv_cache = cache
            tracker.reset_mod_stats()
            tokens = torch.zeros(batch_size, 1, dtype=torch.long)
            model.decode(tokens, input_pos=torch.full((batch_size, 1), kv_length - 1), kv_len=kv_length)[:, -1, : config.vocab_size]
        peak = tracker_breakdown(tracker.get_tracker_snapshot("peak"))
    parts = {k: 0 for k in CATEGORIES}
    parts["kv_cache"] = kv
    parts["weights"] = peak["weights"] - kv
    parts["temporaries"] = peak["total"] - peak["weights"]
    if quantized:
        _swap_quantized(parts, quantized, quantize, dtype)
    if quantize in QUANTIZES_HEAD:  # the head too, in its own mode (`litllm.quantize.quantize_model`)
        head = model.lm_head
        # a head tied to the embedding becomes a quantized copy beside it: the embedding's bytes stay
        dense = 0 if config.tie_embeddings else _nbytes(head.weight)
        parts["weights"] += quantized_linear_bytes(head.out_features, head.in_features,
                                                   HEAD_MODES.get(quantize, quantize), dtype.itemsize) - dense
    parts["total"] = sum(parts[k] for k in CATEGORIES)
    return parts


@dataclass
class DecodePlan:
    config: Any
    precision: str = "bf16-true"
    quantize: Optional[str] = None
    batch_size: int = 1
    kv_length: int = 2048
    prompt_length: int = 2047
    prefill_chunk: Optional[int] = None  # None: the engine's default
    notes: list[str] = field(default_factory=list)
    devices: int = 1  # tensor parallelism: the estimate is per device
    draft_config: Any = None  # speculative decoding's draft model (`--draft_model`): one more model and KV cache


def _fake_decode(plan: DecodePlan) -> dict[str, int]:
    parts = fake_decode(plan.config, plan.precision, plan.quantize, plan.batch_size, plan.kv_length,
                        plan.prompt_length, plan.prefill_chunk, plan.devices)
    if plan.draft_config is not None:
        # the draft loads unquantized in --precision beside the model, with a KV cache of the same length; the two
        # run one after the other, so only the larger one's temporaries are live at once
        draft = fake_decode(plan.draft_config, plan.precision, None, plan.batch_size, plan.kv_length,
                            plan.prompt_length, plan.prefill_chunk)
        parts["weights"] += draft["weights"]
        parts["kv_cache"] += draft["kv_cache"]
        parts["temporaries"] = max(parts["temporaries"], draft["temporaries"])
        parts["total"] = sum(parts[k] for k in CATEGORIES)
    return parts


def decode_plan_from_command(command: str, kwargs: dict[str, Any]) -> DecodePlan:
    """A `DecodePlan` from `generate`'s or `serve`'s parsed arguments."""
    notes: list[str] = []
    config = _finetune_config(Path(kwargs["checkpoint_dir"]), notes)
    precision = kwargs.get("precision") or "bf16-true"
    if kwargs.get("precision") is None:
        notes.append("--precision unset: estimated for bf16-true, the default on GPUs")
    window = config.block_size
    devices = (kwargs.get("devices") or 1) * (kwargs.get("num_nodes") or 1)
    if devices > 1:
        from litllm.parallel.plan import check_divisible

        check_divisible(config, devices)
        notes.append(f"tensor parallel over {devices} devices: per device, 1/{devices} of the heads, hidden units, "
                     f"vocabulary rows and KV cache, plus the replicated norms")
    plan = _decode_plan(command, kwargs, config, precision, window, notes)
    plan.devices = devices
    return plan


def _decode_plan(command: str, kwargs: dict[str, Any], config, precision: str, window: int,
                 notes: list[str]) -> DecodePlan:
    if command == "generate":
        prompt = _prompt_tokens(Path(kwargs["checkpoint_dir"]), kwargs.get("prompt") or "", kwargs.get("prompt_style"),
                                kwargs.get("sys_prompt"), notes)
        new = min(kwargs.get("max_new_tokens") or 50, max(1, window - prompt))
        draft = None
        if kwargs.get("draft_model"):
            draft = _finetune_config(Path(kwargs["draft_model"]), notes)
            notes.append("--draft_model: its weights and KV cache are counted in")
        return DecodePlan(config, precision, kwargs.get("quantize"), 1, prompt + new, prompt, notes=notes,
                          draft_config=draft)
    length = kwargs.get("max_seq_length")
    if length is None:
        length = window
        notes.append(f"--max_seq_length unset: estimated at the model's window ({window}); serve shrinks it to fit "
                     "the KV cache in half the free memory")
    return DecodePlan(config, precision, kwargs.get("quantize"), kwargs.get("max_batch_size", 16), length,
                      max(1, length - 1), kwargs.get("prefill_chunk"),
                      notes=notes + ["the prefill is the longest prompt a slot takes (max_seq_length - 1)"])


def _prompt_tokens(checkpoint_dir: Path, prompt: str, prompt_style: Optional[str], sys_prompt: Optional[str],
                   notes: list[str]) -> int:
    """The prompt's length as `generate` encodes it: formatted with the prompt style, then tokenized."""
    try:
        from litllm.prompts import PromptStyle
        from litllm.tokenizer import Tokenizer

        style = PromptStyle.from_checkpoint(checkpoint_dir, prompt_style)
        return max(1, len(style.encode(Tokenizer(checkpoint_dir), style.apply(prompt, sys_prompt=sys_prompt))))
    except Exception:
        notes.append("no tokenizer in the folder: the prompt's length is taken as 1 token per 4 bytes")
        return max(1, len(prompt.encode()) // 4 + 1)


def estimate_decoding(plan: DecodePlan, command: str, device_memory: Optional[int] = None) -> Estimate:
    parts = _fake_decode(plan)
    peak = parts["total"]
    fits = None if device_memory is None else peak <= device_memory
    est = Estimate(
        command=command, model=plan.config.name, method="inference", precision=plan.precision,
        world_size=plan.devices, strategy="tensor" if plan.devices > 1 else "single", micro_batch_size=plan.batch_size, seq_length=plan.kv_length, activation_checkpointing=False,
        quantize=plan.quantize, breakdown={k: int(parts[k]) for k in CATEGORIES}, peak_memory_bytes=int(peak),
        tokens_per_step=plan.batch_size, flops_per_step=2.0 * _matmul_params(plan.config) * plan.batch_size,
        peak_flops=None, mfu=0.0, seconds_per_step=None, total_steps=None, seconds_total=None,
        device_memory_bytes=device_memory, fits=fits, notes=list(plan.notes),
    )
    if fits is False:
        def add(change: str, **overrides) -> bool:
            peak = _fake_decode(replace(plan, **overrides))["total"]
            est.fixes.append({"change": change, "peak_memory_bytes": peak, "fits": peak <= device_memory})
            return peak <= device_memory

        if plan.quantize is None and plan.devices == 1:
            add("--quantize bnb.nf4", quantize="bnb.nf4")
        _add_more_devices(plan, add)
        if command == "serve":
            for b in dict.fromkeys((plan.batch_size // 2, plan.batch_size // 4, 1)):  # in order, each once
                if 1 <= b < plan.batch_size and add(f"--max_batch_size {b}", batch_size=b):
                    break
            short = max(2, plan.kv_length // 4)
            add(f"--max_seq_length {short}", kv_length=short, prompt_length=short - 1)
    return est


def _add_more_devices(plan: DecodePlan, add) -> None:
    """The fewest devices (2, 4, 8, ... up to 64, dividing the heads) that make decoding fit, as a fix."""
    from litllm.errors import LitLLMError
    from litllm.parallel.plan import check_divisible

    n = plan.devices * 2
    while n <= 64:
        try:
            check_divisible(plan.config, n)
        except LitLLMError:
            return
        if add(f"--devices {n} (tensor parallel)", devices=n):
            return
        n *= 2


def _matmul_params(config) -> int:
    from litllm.train.flops import matmul_parameters

    return matmul_parameters(config)


# ---------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """What `litllm estimate` reports for a training run (bytes per device, FLOPs, seconds)."""

    command: str
    model: str
    method: str
    precision: str
    world_size: int
    strategy: str
    micro_batch_size: int
    seq_length: int
    activation_checkpointing: bool
    quantize: Optional[str]
    breakdown: dict[str, int]
    peak_memory_bytes: int
    tokens_per_step: int
    flops_per_step: float
    peak_flops: Optional[float]
    mfu: float
    seconds_per_step: Optional[float]
    total_steps: Optional[int]
    seconds_total: Optional[float]
    device_memory_bytes: Optional[int]
    fits: Optional[bool]
    fixes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_memory_bytes": {f"device{i}": self.peak_memory_bytes for i in range(self.world_size)}}


def peak_memory(plan: TrainPlan, **overrides) -> dict[str, int]:
    """{category: bytes} and "total" for one device of this plan (overrides: TrainPlan fields)."""
    plan = replace(plan, **overrides) if overrides else plan
    parts = fake_train_step(plan)
    if plan.strategy == "fsdp":
        parts = fsdp_per_device(parts, plan.world_size)
    elif plan.strategy == "ddp" and plan.world_size > 1:
        parts["temporaries"] += parts["gradients"]  # DDP's all-reduce buckets: one more copy of the gradients
    parts["total"] = sum(parts[k] for k in CATEGORIES)
    return parts


def train_flops(plan: TrainPlan, trainable_fraction: float) -> float:
    from litllm.train.flops import flops_per_token

    rows = plan.global_batch_size * plan.rows_per_sample
    return flops_per_token(plan.config, plan.seq_length, trainable_fraction) * rows * plan.seq_length


def _trainable_fraction(plan: TrainPlan) -> float:
    if plan.method in ("pretrain", "full"):
        return 1.0
    from litllm.utils import meta_device

    with meta_device():
        from litllm.train.loop import build_train_model

        model = build_train_model(plan.config, _method(plan))
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


def estimate_training(plan: TrainPlan, command: str = "", device_memory: Optional[int] = None,
                      peak_flops: Optional[float] = None, mfu: float = 0.4, fixes: bool = True) -> Estimate:
    parts = peak_memory(plan)
    peak = parts["total"]
    flops = train_flops(plan, _trainable_fraction(plan))
    seconds = None
    if peak_flops:
        # activation checkpointing recomputes each block's forward: ~1/3 more work at the same utilisation
        work = flops * (4 / 3 if plan.activation_checkpointing else 1)
        seconds = work / (mfu * peak_flops * plan.world_size)
    fits = None if device_memory is None else peak <= device_memory
    est = Estimate(
        command=command, model=plan.config.name, method=plan.method, precision=plan.precision,
        world_size=plan.world_size, strategy=plan.strategy, micro_batch_size=plan.micro_batch_size,
        seq_length=plan.seq_length, activation_checkpointing=plan.activation_checkpointing, quantize=plan.quantize,
        breakdown={k: int(parts[k]) for k in CATEGORIES}, peak_memory_bytes=int(peak),
        tokens_per_step=plan.global_batch_size * plan.rows_per_sample * plan.seq_length, flops_per_step=flops,
        peak_flops=peak_flops,
        mfu=mfu, seconds_per_step=seconds, total_steps=plan.total_steps,
        seconds_total=seconds * plan.total_steps if seconds and plan.total_steps else None,
        device_memory_bytes=device_memory, fits=fits, notes=list(plan.notes),
    )
    if fits is False and fixes:
        est.fixes = suggest_fixes(plan, device_memory)
    return est


def suggest_fixes(plan: TrainPlan, device_memory: int) -> list[dict[str, Any]]:
    """Concrete changes that make the run fit, each with its new peak per device."""
    out = []

    def add(change: str, **overrides):
        new = peak_memory(plan, **overrides)["total"]
        out.append({"change": change, "peak_memory_bytes": int(new), "fits": new <= device_memory})
        return new

    per_device = plan.global_batch_size // plan.world_size
    sizes = [m for m in range(plan.micro_batch_size - 1, 0, -1) if per_device % m == 0]
    for m in sizes:  # largest first: the first that fits is the answer
        if peak_memory(plan, micro_batch_size=m)["total"] <= device_memory:
            add(f"--train.micro_batch_size {m} (same global batch, more accumulation)", micro_batch_size=m)
            break
    if not plan.activation_checkpointing:
        add("--activation_checkpointing true", activation_checkpointing=True)
    if plan.quantize is None:
        if plan.method in ("lora", "adapter", "adapter_v2"):
            add("--quantize bnb.nf4 (QLoRA)", quantize="bnb.nf4")
        elif plan.method == "full":
            from litllm.lora import LoRASettings

            add("finetune_lora --quantize bnb.nf4 (QLoRA, default LoRA settings)", method="lora",
                lora=LoRASettings(), quantize="bnb.nf4")
    for n in (2, 4, 8, 16, 32, 64):
        if n > plan.world_size and plan.global_batch_size % (n * plan.micro_batch_size) == 0:
            new = add(f"--devices {n} --strategy fsdp", world_size=n, strategy="fsdp")
            if new <= device_memory:
                break
    return out


# ---------------------------------------------------------------------- from a command's job
def plan_from_job(command: str, job: Any, config=None, for_gpu: bool = True) -> TrainPlan:
    """A `TrainPlan` from a training command's job (`litllm.finetune.FinetuneJob`, `litllm.pretrain.PretrainJob`:
    the same flags and --config recipes).

    config: the model's Config (required for `pretrain`; finetuning reads it from the job's checkpoint_dir).
    for_gpu: an unset --precision is a GPU's default (bf16-mixed); False: this machine's (32-true on a CPU).
    """
    if command not in TRAIN_COMMANDS:
        raise LitLLMError(f"estimate: unknown command {command!r}; expected one of {', '.join(TRAIN_COMMANDS)}")
    notes: list[str] = []
    if config is None:
        if command == "pretrain":
            raise LitLLMError("estimating pretrain needs the model's Config")
        config = _finetune_config(Path(job.checkpoint_dir), notes)
    train, run = job.train, job.run
    devices = run.devices
    if devices == "auto":
        devices = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    world_size = int(devices) * int(run.num_nodes)
    strategy = run.strategy
    if strategy == "auto":
        strategy = "single" if world_size == 1 else "fsdp"
    precision = run.precision or _default_precision(run.accelerator, for_gpu, notes)
    device = "cpu" if run.accelerator == "cpu" or (run.accelerator == "auto" and not for_gpu) else "cuda"
    seq_length = train.max_seq_length or config.block_size
    grpo = getattr(job, "grpo", None) if command == "finetune_grpo" else None
    if grpo is not None and train.max_seq_length is None:
        seq_length = GRPO_PROMPT_TOKENS + grpo.max_new_tokens
        notes.append(f"--train.max_seq_length unset: estimated for prompts of {GRPO_PROMPT_TOKENS} tokens + "
                     f"--max_new_tokens {grpo.max_new_tokens}; set it to your longest prompt + --max_new_tokens")
    elif train.max_seq_length is None:
        notes.append(f"--train.max_seq_length unset: estimated at the model's block_size ({seq_length}); the run "
                     "uses the data's longest sample if shorter")
    seq_length = min(seq_length, config.block_size)
    train.gradient_accumulation_iters(world_size)  # the command's own check, the same message
    total_steps = None
    if train.max_steps is not None or train.max_tokens is not None:
        total_steps = train.total_steps(seq_length, None if train.epochs is None else 10**18, 1)
        if train.epochs is not None and train.epochs != _default_train(type(job)).epochs:  # set by the user
            notes.append("--train.epochs also set: the total time counts max_steps/max_tokens only")
    else:
        notes.append("the run's length is in epochs: set --train.max_steps or --train.max_tokens for its total time")
    return TrainPlan(
        config=config, method=TRAIN_COMMANDS[command] or job.method, lora=getattr(job, "lora", None),
        adapter=getattr(job, "adapter", None), quantize=getattr(job, "quantize", None), precision=precision,
        micro_batch_size=train.micro_batch_size, seq_length=seq_length,
        global_batch_size=train.per_device_batch_size(world_size) * world_size, world_size=world_size, strategy=strategy,
        activation_checkpointing=bool(run.activation_checkpointing), optimizer=job.optimizer,
        max_norm=train.max_norm, total_steps=total_steps, device=device, notes=notes,
        **_reference_and_rows(command, job, seq_length),
    )


def _reference_and_rows(command: str, job: Any, seq_length: int) -> dict[str, Any]:
    """The TrainPlan fields of DPO's and GRPO's extra rows, rollout and reference model (LoRA's reference is the
    same model with its adapters off: nothing extra)."""
    full = getattr(job, "method", None) == "full"
    if command == "finetune_dpo":
        reference = full and job.preference.loss != "simpo" and not job.precompute_reference
        return {"rows_per_sample": 2, "reference_copy": reference}
    if command == "finetune_grpo":
        return {"rows_per_sample": job.grpo.num_generations, "reference_copy": full and job.grpo.beta > 0,
                "rollout_tokens": seq_length}
    return {}


def _default_precision(accelerator: str, for_gpu: bool, notes: list[str]) -> str:
    """The precision of a run with --precision unset (noted in `notes`)."""
    from litllm.train.fabric import default_precision

    precision = default_precision(accelerator)
    if precision == "32-true" and for_gpu:
        notes.append("--precision unset: estimated for bf16-mixed, the default on GPUs")
        return "bf16-mixed"  # the default on the GPUs an estimate is for
    if precision == "32-true":
        notes.append("--precision unset: estimated for 32-true, what the run uses here (no GPU); "
                     "--gpu NAME or --precision bf16-mixed estimates a GPU run")
    return precision


def _default_train(job_class: type):
    """The job's default `TrainArgs` (what an unset `--train.*` flag holds)."""
    import dataclasses

    return next(f.default_factory() for f in dataclasses.fields(job_class) if f.name == "train")


def _finetune_config(checkpoint_dir: Path, notes: list[str]):
    """The model's config from its folder; without the folder (not downloaded yet), from the preset of its name."""
    from litllm.config import Config

    if (checkpoint_dir / "model_config.yaml").is_file():
        return Config.from_checkpoint(checkpoint_dir)
    try:
        config = Config.from_name(checkpoint_dir.name)
    except Exception:
        raise LitLLMError(
            f"{checkpoint_dir}: no model_config.yaml, and {checkpoint_dir.name!r} is no known model name "
            "(litllm list_models): download the model or point at a folder with model_config.yaml"
        ) from None
    notes.append(f"{checkpoint_dir} not found: estimated for the {config.name} preset")
    return config


def parse_memory(text: str) -> int:
    """`80GB` (10^9), `40GiB` (2^30), `512MB`, or a number of GB -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise LitLLMError(f"--device_memory: expected a size like 80GB or 40GiB, got {text!r}")
    value, unit = float(match[1]), (match[2] or "GB").upper().rstrip("B")
    powers = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(value * powers[unit])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------------- before launch
def warn_if_too_large(command: str, job: Any, fabric, config) -> Optional[Estimate]:
    """One call in `pretrain` and `finetune_*` setup, before launch: on a GPU, print a warning naming
    a fix when the predicted peak exceeds the device's memory. Never raises; does nothing on CPU, for
    commands it doesn't know, or with LITLLM_NO_ESTIMATE=1. `job`: the command's job; `config`: the model's."""
    import os

    if command not in TRAIN_COMMANDS or os.environ.get("LITLLM_NO_ESTIMATE") == "1":
        return None
    try:
        if fabric.device.type != "cuda":
            return None
        memory = torch.cuda.get_device_properties(fabric.device).total_memory
        plan = plan_from_job(command, job, config)
        est = estimate_training(plan, command, memory, fixes=False)
        if est.fits is False:
            fix = next((f for f in suggest_fixes(plan, memory) if f["fits"]), None)
            advice = f" Try {fix['change']} (predicted {gb(fix['peak_memory_bytes'])})." if fix else ""
            fabric.print(
                f"Warning: the predicted peak memory is {gb(est.peak_memory_bytes)} per device, more than this "
                f"GPU's {gb(memory)}: the run will likely run out of memory.{advice} Details: `litllm estimate "
                f"{command} <the same flags>` (tutorials/oom.md)."
            )
        return est
    except Exception as e:  # an estimate must never stop a run
        fabric.print(f"Warning: memory estimate skipped ({type(e).__name__}: {e})")
        return None
