"""Loading one tensor-parallel rank's shard of a model folder.

The model is built on the meta device and sharded there (`plan.parallelize`: plain tensors shaped as this rank's
shares); each parameter's local shard is then allocated on the rank's device and filled from `lit_model.safetensors` with safetensors'
lazy slicing (`safe_open(...).get_slice`), reading only this rank's rows or columns: a rank's host
memory peaks at about its shard, 1/N of the sharded weights plus the replicated ones. Persistent buffers (a
grouped router's correction bias) are replicated and read whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.parallel.plan import local_slices, parallelize, rank0_only, shard_pieces
from litllm.utils import meta_device


def load_shard(checkpoint_dir: Path, rank: int, n: int, device: str, dtype: torch.dtype) -> nn.Module:
    """The GPT of `checkpoint_dir` sharded over n ranks, with this rank's weights on `device` in `dtype`."""
    from litllm.config import Config
    from litllm.model import GPT
    from litllm.model_folder import WEIGHTS_FILE, check_model_folder, open_safetensors

    checkpoint_dir = check_model_folder(checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    with meta_device():
        model = GPT(config)
    full_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    parallelize(model, rank, n)
    model.to(dtype)  # still meta: each shard is then allocated once, in its final dtype
    model.to_empty(device=device)
    with open_safetensors(checkpoint_dir / WEIGHTS_FILE) as f, torch.no_grad():
        stored = set(f.keys())
        for name, tensor in _stored_tensors(model):
            key = name if name in stored or not config.tie_embeddings else "wte.weight"
            if key not in stored:
                raise LitLLMError(f"{checkpoint_dir / WEIGHTS_FILE}: {name} is missing (expected by model_config.yaml)")
            local = read_local(f.get_slice(key), shard_pieces(name, config, n), rank, n, full_shapes[name], key)
            tensor.data.copy_(local if rank == 0 or not rank0_only(name) else torch.zeros_like(local))
    model.lm_head.weight = model.wte.weight if config.tie_embeddings else model.lm_head.weight
    model.build_rope_cache(torch.device(device))
    return model.eval().requires_grad_(False)


def _stored_tensors(model: nn.Module):
    """(name, tensor) of every parameter (a tied head once) and persistent buffer: what the file holds."""
    yield from model.named_parameters(remove_duplicate=True)
    persistent = model.state_dict(keep_vars=True).keys()
    yield from ((name, buffer) for name, buffer in model.named_buffers() if name in persistent)


def read_local(tensor_slice, pieces: Optional[tuple], rank: int, n: int, shape: tuple, key: str) -> torch.Tensor:
    """This rank's part of one stored tensor: all of it when replicated, else its share of each piece."""
    stored = tuple(tensor_slice.get_shape())
    if stored != shape:
        raise LitLLMError(f"lit_model.safetensors: {key} has shape {list(stored)}, model_config.yaml gives {list(shape)}")
    if pieces is None:
        return tensor_slice[:]
    dim, ranges = local_slices(pieces, rank, n)
    parts = [tensor_slice[(slice(None),) * dim + (r,)] for r in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
