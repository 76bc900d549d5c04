"""Sharded training checkpoints (`--train.state_dict_type sharded` under FSDP2) with `torch.distributed.checkpoint`.

Every rank writes its own shards of the weights and the optimizer state, without a gather, into the
step folder's `sharded/` (DCP's layout: `__R_0.distcp` per rank, and `.metadata` with every tensor's
global shape and each shard's offsets). DCP reshards when it loads: the same device count reads its
own shards back, another count (or one process without a process group) reads just the pieces each
rank now holds. The state dict has one top key: `model` when every parameter trains, `trainable`
when only a method's parameters do (LoRA, adapters: the frozen base is re-read from its own file).

Only tensors go through DCP (its loader unpickles non-tensor values without `weights_only`); the
optimizer's param groups and other plain values are `sharded/optimizer_rest.pt`, read with
`weights_only=True`, and `.metadata` with an unpickler that resolves DCP's own classes only.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from litllm.errors import LitLLMError

SHARDED_DIR = "sharded"
REST_FILE = "optimizer_rest.pt"


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` and nothing else: only its own classes and torch's dtypes/sizes resolve."""

    def find_class(self, module: str, name: str):
        import enum

        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            value = getattr(importlib.import_module(module), name, None)
            if isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                return value
        if module == "torch":
            value = getattr(torch, name, None)
            if value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        if module == "torch.serialization" and name == "_get_layout":  # a layout by its name
            return torch.serialization._get_layout
        if (module, name) in (("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                              ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")):
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a checkpoint's .metadata")


def _reader(folder: Path):
    """DCP's file reader, with `.metadata` read by a restricted unpickler (no arbitrary code)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    reader = FileSystemReader(str(folder))

    def read_metadata(*_, **__):
        with open(Path(folder) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    reader.read_metadata = read_metadata
    return reader


def saved_key(path: Path) -> str:
    """`model` or `trainable`: what a sharded checkpoint holds. Fails clearly if `.metadata` is damaged
    or a shard file is missing or shorter than `.metadata` says (reads no tensor data)."""
    folder = Path(path) / SHARDED_DIR
    try:
        metadata = _reader(folder).read_metadata()
    except Exception as e:
        raise LitLLMError(f"{folder / '.metadata'}: not a readable sharded-checkpoint index ({_first_line(e)})") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = folder / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            raise LitLLMError(f"{file}: {'missing' if size is None else f'truncated ({size} of {end} bytes)'}: "
                              "a shard of this sharded checkpoint")
    return "model" if any(n.startswith("model.") for n in metadata.state_dict_metadata) else "trainable"


def _split(optimizer_sd: dict) -> tuple[dict, dict]:
    """Optimizer state dict -> (its tensors, for DCP; the rest: param groups, non-tensor state)."""
    tensors = {k: {s: v for s, v in st.items() if isinstance(v, torch.Tensor)} for k, st in optimizer_sd["state"].items()}
    rest = {k: {s: v for s, v in st.items() if not isinstance(v, torch.Tensor)} for k, st in optimizer_sd["state"].items()}
    return tensors, {"state": rest, "param_groups": optimizer_sd["param_groups"]}


def _state(module: nn.Module, optimizer, key: str, names: Optional[set]) -> tuple[dict, dict]:
    """(what DCP saves or fills: {key: weights, "optimizer": tensors}, the optimizer's other values)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from litllm.model_folder import has_tied_head, stored_state_dict

    weights = stored_state_dict(get_model_state_dict(module), has_tied_head(module))  # DTensors under FSDP2
    if names is not None:
        weights = {k: v for k, v in weights.items() if k in names}
    state: dict[str, Any] = {key: weights}
    rest: dict = {}
    if optimizer is not None:
        state["optimizer"], rest = _split(get_optimizer_state_dict(module, optimizer))
    return state, rest


def save(folder: Path, module: nn.Module, optimizer, names: Optional[set], rank: int) -> None:
    """Write every rank's shards into `folder/sharded` (collective: call on every rank).

    names: the trained parameters when only they are saved (None: every weight).
    """
    import torch.distributed.checkpoint as dcp

    state, rest = _state(module, optimizer, "model" if names is None else "trainable", names)
    dcp.save(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    if rank == 0:
        torch.save(rest, Path(folder) / SHARDED_DIR / REST_FILE)


def load(path: Path, module: nn.Module, optimizer, names: Optional[set]) -> None:
    """Restore weights and optimizer state from a sharded checkpoint, on any device count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from litllm.model_folder import has_tied_head, read_torch_file, untied

    folder = Path(path) / SHARDED_DIR
    key = saved_key(path)
    if (key == "model") != (names is None):
        raise LitLLMError(
            f"{folder}: holds {'every weight' if key == 'model' else 'only the trained parameters of a finetuning method'}, "
            f"but this run trains {'everything' if names is None else 'only a method’s parameters'}"
        )
    state, _ = _state(module, optimizer, key, names)
    rest = read_torch_file(folder / REST_FILE)
    try:
        # in place; each rank reads only the rows it holds (all of them in a process without a group)
        dcp.load(state, storage_reader=_reader(folder), no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # a missing key, a damaged or missing shard file
        raise LitLLMError(f"{folder}: does not match this run or is damaged ({_first_line(e)})") from None
    weights = untied(state[key], set(module.state_dict()), has_tied_head(module))
    set_model_state_dict(module, weights, options=StateDictOptions(strict=False))
    optimizer_sd = {
        "state": {k: {**rest["state"].get(k, {}), **st} for k, st in state["optimizer"].items()},
        "param_groups": rest["param_groups"],
    }
    try:
        set_optimizer_state_dict(module, optimizer, optimizer_sd)
    except (KeyError, ValueError, RuntimeError) as e:
        raise LitLLMError(f"{folder}: does not match this run's optimizer/parameters ({_first_line(e)})") from None


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full `model` weights of a sharded checkpoint, read in one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(path) / SHARDED_DIR
    metadata = _reader(folder).read_metadata()
    weights = {
        name.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
        for name, md in metadata.state_dict_metadata.items()
        if name.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    try:
        dcp.load({"model": weights}, storage_reader=_reader(folder), no_dist=True)
    except Exception as e:
        raise LitLLMError(f"{folder}: a shard is damaged or missing ({_first_line(e)})") from None
    return weights


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]
