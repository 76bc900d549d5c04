"""Sharded training checkpoints (`--train.state_dict_type sharded` under FSDP2): no gathering.

FSDP2 shards every parameter on dim 0 (`Shard(0)` DTensors): rank r holds a contiguous block of
rows. A sharded step checkpoint holds, beside the usual model/training-state files:
  {prefix}.rank-RRRRR-of-WWWWW.safetensors   rank r's rows of every saved weight (`p.to_local()`)
  optimizer.rank-RRRRR-of-WWWWW.pt           rank r's optimizer state (plain tensors, weights_only-loadable)
  sharded_index.json                         world size, weights prefix, each weight's global shape
                                             and every rank's row range ([start, end); null: whole, rank 0)
`prefix` is `lit_model` when every parameter trains, `trainable` otherwise (LoRA, adapters).
The same world size resumes shard for shard; any other layout (or a conversion to a model folder)
concatenates the row blocks in rank order into a full state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from litllm.errors import LitLLMError

INDEX_FILE = "sharded_index.json"


def weights_file(prefix: str, rank: int, world_size: int) -> str:
    return f"{prefix}.rank-{rank:05d}-of-{world_size:05d}.safetensors"


def optimizer_file(rank: int, world_size: int) -> str:
    return f"optimizer.rank-{rank:05d}-of-{world_size:05d}.pt"


def is_sharded(path: Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def _local(value: Any) -> Any:
    """A DTensor's local rows (must be sharded on dim 0 only); plain tensors and other values as they are."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(value, DTensor):
        if any(not (isinstance(p, Shard) and p.dim == 0) for p in value.placements):
            raise LitLLMError(f"sharded checkpoints need parameters sharded on dim 0, got placements {value.placements}")
        return value.to_local().detach().cpu().contiguous()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def write_local_shards(fabric, folder: Path, model_sd: dict, optimizer_sd: dict, prefix: str) -> dict:
    """Write this rank's weight and optimizer shards into `folder`; returns the index (collective)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    rank, world_size = fabric.global_rank, fabric.world_size
    names = sorted(model_sd)
    local = {name: _local(model_sd[name]) for name in names}
    # every rank's row count of every weight, so the index records the real layout (not a formula)
    rows = torch.tensor([local[n].shape[0] if local[n].dim() else 0 for n in names], dtype=torch.int64)
    all_rows = fabric.all_gather(rows.to(fabric.device)).reshape(world_size, len(names)).cpu()
    index: dict[str, Any] = {"format": 1, "world_size": world_size, "prefix": prefix, "tensors": {}}
    for i, name in enumerate(names):
        entry = {"shape": list(model_sd[name].shape)}
        if isinstance(model_sd[name], DTensor):
            ends = all_rows[:, i].cumsum(0).tolist()
            entry["rows"] = [[end - int(n), end] for end, n in zip(ends, all_rows[:, i].tolist())]
        else:
            entry["rows"] = None  # replicated (an unsharded tensor): rank 0's copy is the whole tensor
        index["tensors"][name] = entry
    kept = {n: t for n, t in local.items() if index["tensors"][n]["rows"] is not None or rank == 0}
    save_file(kept, str(folder / weights_file(prefix, rank, world_size)))
    plain_opt = {
        "state": {k: {s: _local(v) for s, v in st.items()} for k, st in optimizer_sd["state"].items()},
        "param_groups": optimizer_sd["param_groups"],
    }
    torch.save(plain_opt, folder / optimizer_file(rank, world_size))
    return index


def read_index(path: Path) -> dict:
    try:
        index = json.loads((Path(path) / INDEX_FILE).read_text())
        index["world_size"], index["tensors"], index["prefix"]
    except (OSError, ValueError, KeyError) as e:
        raise LitLLMError(f"{Path(path) / INDEX_FILE}: not a readable sharded-checkpoint index ({e})") from None
    return index


def _rank_files(path: Path, index: dict, rank: int) -> tuple[Path, Path]:
    world_size = index["world_size"]
    weights = Path(path) / weights_file(index["prefix"], rank, world_size)
    optimizer = Path(path) / optimizer_file(rank, world_size)
    for file in (weights, optimizer):
        if not file.is_file():
            raise LitLLMError(f"{file}: missing shard of a {world_size}-rank sharded checkpoint")
    return weights, optimizer


def full_model_state(path: Path, index: dict) -> dict[str, torch.Tensor]:
    """Concatenate every rank's row blocks, in rank order, into the full state dict."""
    from safetensors.torch import load_file

    shards = [load_file(str(_rank_files(path, index, r)[0])) for r in range(index["world_size"])]
    full = {}
    for name, entry in index["tensors"].items():
        if entry["rows"] is None:
            full[name] = shards[0][name]
        else:
            full[name] = torch.cat([shards[r][name] for r in range(index["world_size"])], dim=0)
        if list(full[name].shape) != entry["shape"]:
            raise LitLLMError(f"{path}: the shards of {name} make shape {list(full[name].shape)}, not {entry['shape']}")
    return full


def full_optimizer_state(path: Path, index: dict) -> dict:
    """The full (unsharded, name-keyed) optimizer state dict, as `get_optimizer_state_dict` gives it."""
    ranks = [
        torch.load(_rank_files(path, index, r)[1], map_location="cpu", weights_only=True)
        for r in range(index["world_size"])
    ]
    state = {}
    for name, entries in ranks[0]["state"].items():
        sharded = index["tensors"].get(name, {}).get("rows") is not None
        state[name] = {
            key: torch.cat([rank["state"][name][key] for rank in ranks], dim=0)
            if sharded and isinstance(value, torch.Tensor) and value.dim() > 0
            else value
            for key, value in entries.items()
        }
    return {"state": state, "param_groups": ranks[0]["param_groups"]}


def load_local_shards(fabric, path: Path, index: dict, module, optimizer) -> None:
    """Same world size: put this rank's saved rows into its DTensors, weights and optimizer state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    weights_path, optimizer_path = _rank_files(path, index, fabric.global_rank)
    saved = load_file(str(weights_path))
    options = StateDictOptions(full_state_dict=False, strict=False)
    expected = get_model_state_dict(module, options=options)
    missing = sorted(set(index["tensors"]) - set(expected))
    if missing:
        raise LitLLMError(f"{path}: weights don't match the model: unexpected {missing[:3]}")

    def like(reference, local: torch.Tensor, what: str):
        if isinstance(reference, DTensor):
            if tuple(local.shape) != tuple(reference.to_local().shape):
                raise LitLLMError(
                    f"{path}: {what} has local shape {tuple(local.shape)} on rank {fabric.global_rank}, "
                    f"this run's shard is {tuple(reference.to_local().shape)}"
                )
            local = local.to(device=reference.device, dtype=reference.dtype)
            return DTensor.from_local(
                local, reference.device_mesh, reference.placements, run_check=False,
                shape=reference.shape, stride=reference.stride(),
            )
        return local.to(device=reference.device, dtype=reference.dtype)

    model_sd = {}
    for name, entry in index["tensors"].items():
        local = saved[name] if name in saved else None
        if local is None:  # a replicated tensor: only rank 0 stored it; the others read it from rank 0's file
            local = load_file(str(Path(path) / weights_file(index["prefix"], 0, index["world_size"])))[name]
        model_sd[name] = like(expected[name], local, name)
    config = getattr(module, "config", None)
    if config is not None and config.tie_embeddings and "wte.weight" in model_sd:
        model_sd["lm_head.weight"] = model_sd["wte.weight"]
    set_model_state_dict(module, model_sd, options=options)

    opt_saved = torch.load(optimizer_path, map_location="cpu", weights_only=True)
    current = get_optimizer_state_dict(module, optimizer, options=options)
    try:
        for name, entries in opt_saved["state"].items():
            reference = expected[name]
            opt_saved["state"][name] = {
                key: like(reference, value, f"optimizer state {name}.{key}")
                if isinstance(value, torch.Tensor) and value.dim() > 0
                else value
                for key, value in entries.items()
            }
        if len(opt_saved["param_groups"]) != len(current["param_groups"]):
            raise ValueError("another number of parameter groups")
        set_optimizer_state_dict(module, optimizer, opt_saved, options=options)
    except (KeyError, ValueError, RuntimeError) as e:
        raise LitLLMError(f"{optimizer_path}: does not match this run's optimizer/parameters ({e})") from None
