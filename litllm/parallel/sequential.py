"""`--strategy sequential`: a model too big for one GPU, without collectives. One process; consecutive blocks
on consecutive devices (`plan.layer_placement`), the embedding on the first and the final norm and head on the
last, each block's KV cache on its block's device. Activations hop device to device once per block boundary;
only one device computes at a time (LitGPT's `generate_sequentially`), so it is slower than tensor parallelism
but needs nothing but enough memory in all.
"""

from __future__ import annotations

from pathlib import Path
import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.parallel.plan import layer_placement


def sequential_devices(devices: int, device: str) -> list[str]:
    """The devices of a sequential run: cuda:0..N-1 (on the CPU, N times `cpu`: the placement's code path)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.device_count() < devices:
            raise LitLLMError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA devices")
        return [f"cuda:{i}" for i in range(devices)]
    if kind != "cpu":
        raise LitLLMError(f"--strategy sequential runs on cuda (or cpu, for testing), not {device}")
    return ["cpu"] * devices


def load_sequential(checkpoint_dir: Path, devices: int, device: str, dtype: torch.dtype) -> nn.Module:
    """The model of `checkpoint_dir` in `dtype` with its blocks spread over `devices` devices of `device`'s kind."""
    from litllm.adapter import load_adapter_model

    targets = sequential_devices(devices, device)
    model = load_adapter_model(checkpoint_dir, "cpu", dtype).eval()  # moved block by block below
    return place_sequentially(model, targets)


def place_sequentially(model: nn.Module, targets: list[str]) -> nn.Module:
    """Move `model`'s parts onto `targets` in place (see the module docstring) and make its forward hop between them."""
    placement = layer_placement(len(model.blocks), targets)
    first, last = torch.device(targets[0]), torch.device(targets[-1])
    tied = model.lm_head.weight is model.wte.weight
    model.wte.to(first)
    if tied and first != last:  # the head needs its own copy on the last device
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().to(last), requires_grad=False)
    for block, target in zip(model.blocks, placement):
        block.to(target)
        block.register_forward_pre_hook(_inputs_to(torch.device(target)), with_kwargs=True)
    model.norm_f.to(last)
    model.lm_head.to(last)
    model.build_rope_cache(first)
    model.register_forward_hook(lambda module, args, out: out.to(first))  # logits (or loss) where the inputs are
    set_kv_cache = model.set_kv_cache

    def set_kv_cache_per_block(*args, **kwargs):
        set_kv_cache(*args, **kwargs)
        for block, target in zip(model.blocks, placement):
            block.attn.kv_cache.to(target)

    model.set_kv_cache = set_kv_cache_per_block
    model.block_devices = placement
    return model


def _inputs_to(device: torch.device):
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    def hook(module, args, kwargs):
        return move(tuple(args)), {k: move(v) for k, v in kwargs.items()}

    return hook
